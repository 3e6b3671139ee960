"""--generator-url against a loopback vLLM (tests/vllm_stub.py) that samples with the tiny model:
token-id prompts, the sampled ids stored as returned, iteration k's adapter loaded under a name of
its own and sampled from, restarts, and server faults as exit status 2. The reference for every
sample is sampling.decode run here, one sample at a time, on the model the server should have used."""
import json
import socket

import pytest
import torch

import collect
import evaluate
import refine as R
import train
from conftest import tiny_llama, tiny_tokenizer
from vllm_stub import VLLMStub
import lora
import sampling
import config
import generator
import rollout

MSGS = [[{"role": "user", "content": "what is 2+3?"}], [{"role": "user", "content": "what is 7*6?"}]]
PREFILL = "x = ("


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def model_dir(tmp_path):
    """A model dir with the tokenizer and config.json but no weights: sampling remotely must load
    the tokenizer alone (loading the model from here fails)."""
    d = tmp_path / "tiny-model"
    tiny_tokenizer().save_pretrained(d)
    tiny_llama().config.save_pretrained(d)
    return d


def make_adapter(path, seed):
    """A LoRA adapter of tiny_llama with random B (zero B would leave the model unchanged)."""
    m = lora.add_lora(tiny_llama(), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g))
    lora.save_adapter(m, path, base_model_name="tiny")
    return path


def reference(mdl, prompt, max_new_tokens, temperature, seed, j, top_p=1.0):
    """Sample j of a request with `seed`, as vLLM seeds it (seed + j), decoded here alone."""
    gen = torch.Generator().manual_seed(seed + j)
    return sampling.decode(mdl, [prompt], 1, max_new_tokens, temperature, top_p, 2, 0, gen)[0]


def cfg_for(url, model_dir):
    return dict(config.defaults(), generator_url=url, generator_name="base", model=str(model_dir))


def completion_requests(stub):
    return [b for m, p, b in stub.requests if p == "/v1/completions"]


def load_requests(stub):
    return [b for m, p, b in stub.requests if p == "/v1/load_lora_adapter"]


@pytest.mark.parametrize("token_ids", [True, False])  # False: an older vLLM, ids only in the logprobs
def test_sample_remote_sends_token_ids_and_returns_the_sampled_ids(tok, token_ids):
    with VLLMStub(tiny_llama, tok, token_ids=token_ids) as stub:
        out = generator.sample_remote(stub.url, "base", MSGS, 3, 48, 1.0, 1.0, 7, PREFILL, tok)
    prompts = [sampling.prompt_ids(tok, m, PREFILL) for m in MSGS]
    (body,) = completion_requests(stub)
    assert body["prompt"] == prompts and body["seed"] == 7 and body["n"] == 3 and body["model"] == "base"
    assert body["logprobs"] is not None and body["return_tokens_as_token_ids"] and body["return_token_ids"]
    # nothing but temperature and top-p, whatever the served model's generation_config says
    assert body["top_k"] == -1 and body["repetition_penalty"] == 1.0 and body["min_p"] == 0.0
    base, specials, stopped = tiny_llama(), 0, 0
    for p, per in zip(prompts, out):
        assert len(per) == 3
        for j, s in enumerate(per):
            ids, lps = reference(base, p, 48, 1.0, 7, j)
            assert s["token_ids"] == ids and s["prompt_ids"] == p
            assert s["logprobs"] == pytest.approx(lps, abs=1e-6)
            assert s["text"] == tok.decode(ids, skip_special_tokens=True)
            assert s["finish_reason"] == ("stop" if ids[-1] == 2 else "length")
            specials += sum(t in (0, 1, 3) for t in ids)
            stopped += ids[-1] == 2
    # ids that re-tokenizing the text would lose (special tokens, the stop token) are there
    assert specials > 0 and stopped > 0


def test_sample_remote_refuses_a_server_without_token_ids(tok):
    with VLLMStub(tiny_llama, tok, token_ids=False, id_tokens=False) as stub:
        with pytest.raises(generator.GeneratorError, match="return_tokens_as_token_ids"):
            generator.sample_remote(stub.url, "base", MSGS, 2, 8, 1.0, 1.0, 0, PREFILL, tok)


def test_iteration_k_loads_its_adapter_under_a_fresh_name_and_samples_with_it(tmp_path, tok, model_dir):
    run = tmp_path / "runA"
    a1 = make_adapter(run / "iter_1" / "adapter", seed=1)
    a2 = make_adapter(run / "iter_2" / "adapter", seed=2)
    with VLLMStub(tiny_llama, tok) as stub:
        cfg = cfg_for(stub.url, model_dir)
        assert generator.serve_generator(cfg, run, 0) == "base" and not load_requests(stub)
        n1, n2 = generator.serve_generator(cfg, run, 1), generator.serve_generator(cfg, run, 2)
        assert [b["lora_path"] for b in load_requests(stub)] == [str(a1.resolve()), str(a2.resolve())]
        assert [b["lora_name"] for b in load_requests(stub)] == [n1, n2]
        assert n1.startswith("runA-") and n1.endswith("-iter1") and n2.endswith("-iter2") and n1 != n2 != "base"
        out = generator.sample_remote(stub.url, n1, MSGS[:1], 4, 12, 1.0, 1.0, 3, PREFILL, tok)[0]
    assert completion_requests(stub)[-1]["model"] == n1
    p = sampling.prompt_ids(tok, MSGS[0], PREFILL)
    with_adapter = [reference(lora.load_adapter(tiny_llama(), a1), p, 12, 1.0, 3, j)[0] for j in range(4)]
    base = [reference(tiny_llama(), p, 12, 1.0, 3, j)[0] for j in range(4)]
    assert [s["token_ids"] for s in out] == with_adapter != base


def test_names_differ_between_runs_and_adapter_versions(tmp_path):
    a = make_adapter(tmp_path / "runA" / "iter_1" / "adapter", seed=1)
    b = make_adapter(tmp_path / "runB" / "iter_1" / "adapter", seed=1)  # same bytes, another run
    name = generator.adapter_name(tmp_path / "runA", 1, a)
    assert name == generator.adapter_name(tmp_path / "runA", 1, a)
    assert name != generator.adapter_name(tmp_path / "runB", 1, b)
    make_adapter(a, seed=5)  # retrained in place: another adapter, another name
    assert name != generator.adapter_name(tmp_path / "runA", 1, a)


def test_restart_reuses_a_name_only_when_the_server_loaded_it_from_our_adapter(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    adapter = make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        cfg = cfg_for(stub.url, model_dir)
        name = generator.serve_generator(cfg, run, 1)
        assert generator.serve_generator(cfg, run, 1) == name  # "already loaded", from this path: ours
        assert stub.loras == {name: str(adapter.resolve())} and len(load_requests(stub)) == 2
    with VLLMStub(tiny_llama, tok) as stub:
        stub.loras[name] = "/elsewhere/adapter"  # the name is taken by something we cannot vouch for
        with pytest.raises(generator.GeneratorError, match="already has an adapter named"):
            generator.serve_generator(cfg_for(stub.url, model_dir), run, 1)


@pytest.mark.parametrize("server", ["no runtime lora", "refuses", "down"])
def test_adapter_load_failure_is_an_error_naming_the_url(tmp_path, tok, model_dir, server):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok, lora=server != "no runtime lora",
                  refuse="LoRA rank 4 is greater than max_lora_rank 2") as stub:
        url = stub.url
        if server == "down":
            url = f"http://127.0.0.1:{closed_port()}/v1"
        with pytest.raises(generator.GeneratorError) as e:
            generator.serve_generator(cfg_for(url, model_dir), run, 1)
    assert url in str(e.value)
    assert {"no runtime lora": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "refuses": "max_lora_rank 2",
            "down": "no answer"}[server] in str(e.value)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_collect(run, url, model_dir, it):
    collect.main(["--run", str(run), "--iter", str(it), "--model", str(model_dir), "--generator-url", url,
                  "--generator-name", "base", "--executor", "none", "--problems", "2", "--m", "2",
                  "--gen-batch", "1", "--max-new-tokens", "10", "--threads", "1"])


def rollouts(run, it):
    return [json.loads(line) for line in (run / f"iter_{it}" / "rollouts.jsonl").read_text().splitlines()]


def test_collect_samples_iteration_1_from_its_adapter_and_stores_the_returned_ids(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    adapter = make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        run_collect(run, stub.url, model_dir, 1)
    (load,) = load_requests(stub)
    reqs = completion_requests(stub)
    assert len(reqs) == 2 and all(r["model"] == load["lora_name"] for r in reqs)
    returned = {(i, j): ch["token_ids"] for i, r in enumerate(stub.replies) for j, ch in enumerate(r["choices"])}
    rows = rollouts(run, 1)
    assert len(rows) == 4
    pids = [p["id"] for p in rollout.problems_for(dict(config.defaults(), problems=2), 1)]
    mdl = lora.load_adapter(tiny_llama(), adapter)
    for r in rows:
        i = pids.index(r["problem_id"])  # one problem per chunk and request, in order
        assert r["completion_ids"] == returned[(i, r["sample"])]
        # the naive reference: the adapter's model decodes the request's prompt with the request's seed
        q = reqs[i]
        ids, _ = reference(mdl, q["prompt"][0], 10, q["temperature"], q["seed"], r["sample"], q["top_p"])
        assert r["completion_ids"] == ids
    assert not (model_dir / "model.safetensors").exists()  # the weights were never needed


def test_rollouts_keep_the_prompt_ids_the_server_sampled_after(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        run_collect(run, stub.url, model_dir, 1)
    sent = {tuple(r["prompt"][0]) for r in completion_requests(stub)}
    rows = rollouts(run, 1)
    assert all(tuple(r["prompt_ids"]) in sent for r in rows) and len({tuple(r["prompt_ids"]) for r in rows}) == 2


def test_collect_with_the_server_down_exits_2_and_keeps_the_rows(tmp_path, tok, model_dir, capsys):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        run_collect(run, stub.url, model_dir, 1)
    path = run / "iter_1" / "rollouts.jsonl"
    full = sorted(path.read_text().splitlines())
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))  # killed after 2 rows
    (run / "iter_1" / "stats.json").unlink()
    before = path.read_bytes()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(SystemExit) as e:
        run_collect(run, url, model_dir, 1)
    assert e.value.code == 2 and url in capsys.readouterr().err
    assert path.read_bytes() == before
    with VLLMStub(tiny_llama, tok) as stub:  # a fresh server: the adapter is loaded again, same name
        run_collect(run, stub.url, model_dir, 1)
    assert len(load_requests(stub)) == 1
    assert sorted(path.read_text().splitlines()) == full  # seeded: the resumed run samples the same


def test_refine_meta_agent_samples_under_its_iterations_name(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        cfg = dict(cfg_for(stub.url, model_dir), **config.defaults(("refine",)))
        propose = R.proposer(cfg, generator.sampler(cfg, run, 1, max_new_tokens=cfg["refine_tokens"]))
        out = propose(MSGS[:1], 2, 5)[0]
        (load,) = load_requests(stub)
        assert completion_requests(stub)[-1]["model"] == load["lora_name"]
        assert [s["token_ids"] for s in out] == [ch["token_ids"] for ch in stub.replies[-1]["choices"]]
        # iteration 0's meta-agent is the base model, under its served name; nothing more is loaded
        R.proposer(cfg, generator.sampler(cfg, run, 0, max_new_tokens=cfg["refine_tokens"]))(MSGS[:1], 1, 0)
        assert completion_requests(stub)[-1]["model"] == "base" and len(load_requests(stub)) == 1


def test_train_driver_samples_each_iteration_from_its_own_adapter(tmp_path, tok):
    d = tmp_path / "tiny-full"  # the trainer needs the weights; the stub serves the same tiny_llama()
    tiny_tokenizer().save_pretrained(d)
    tiny_llama().save_pretrained(d)
    run = tmp_path / "run"
    with VLLMStub(tiny_llama, tok) as stub:
        train.main(["--iter", "2", "--run", str(run), "--model", str(d), "--generator-url", stub.url,
                "--generator-name", "base", "--executor", "none", "--problems", "1", "--m", "2", "--gen-batch", "1",
                "--max-new-tokens", "8", "--threads", "1", "--lora-r", "4", "--no-eval"])
    (load,) = load_requests(stub)
    assert load["lora_path"] == str((run / "iter_1" / "adapter").resolve())
    assert [b["model"] for b in completion_requests(stub)] == ["base", load["lora_name"]]


def test_refine_evaluation_samples_the_iterations_adapter_with_the_tokenizer_only(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        evaluate.main(["--mode", "refine", "--run", str(run), "--iter", "1", "--model", str(model_dir),
                       "--generator-url", stub.url, "--generator-name", "base", "--executor", "none", "--turns", "1",
                       "--eval-candidates", "1", "--val-problems", "1", "--max-repairs", "0", "--limit", "1",
                       "--refine-tokens", "8", "--threads", "1"])
    (load,) = load_requests(stub)
    assert load["lora_path"] == str((run / "iter_1" / "adapter").resolve())
    assert [b["model"] for b in completion_requests(stub)] == [load["lora_name"]]
