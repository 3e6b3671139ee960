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


def reference(mdl, prompt, max_new_tokens, temperature, seed, j=0, top_p=1.0):
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
    bodies = completion_requests(stub)  # one n=1 request per sample, each with its own seed
    seeds = {(i, j): generator.sample_seed(7, i, j) for i in range(2) for j in range(3)}
    assert sorted((b["seed"], tuple(b["prompt"])) for b in bodies) == sorted(
        (s, tuple(prompts[i])) for (i, j), s in seeds.items())
    for body in bodies:
        assert body["n"] == 1 and body["model"] == "base" and body["max_tokens"] == 48
        assert body["logprobs"] is not None and body["return_tokens_as_token_ids"] and body["return_token_ids"]
        # nothing but temperature and top-p, whatever the served model's generation_config says
        assert body["top_k"] == -1 and body["repetition_penalty"] == 1.0 and body["min_p"] == 0.0
        assert body["presence_penalty"] == 0.0 and body["frequency_penalty"] == 0.0
    base, specials, stopped = tiny_llama(), 0, 0
    for i, (p, per) in enumerate(zip(prompts, out)):
        assert len(per) == 3
        for j, s in enumerate(per):
            ids, lps = reference(base, p, 48, 1.0, seeds[i, j])
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
    seeds = [generator.sample_seed(3, 0, j) for j in range(4)]
    with_adapter = [reference(lora.load_adapter(tiny_llama(), a1), p, 12, 1.0, s)[0] for s in seeds]
    base = [reference(tiny_llama(), p, 12, 1.0, s)[0] for s in seeds]
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
    assert len(reqs) == 4 and all(r["model"] == load["lora_name"] for r in reqs)
    returned = {q["seed"]: r["choices"][0]["token_ids"] for q, r in stub.answered}
    by_seed = {q["seed"]: q for q in reqs}
    rows = rollouts(run, 1)
    assert len(rows) == 4
    pids = [p["id"] for p in rollout.problems_for(dict(config.defaults(), problems=2), 1)]
    mdl = lora.load_adapter(tiny_llama(), adapter)
    for r in rows:
        i = pids.index(r["problem_id"])  # one problem per chunk (--gen-batch 1): prompt 0 of chunk i
        seed = generator.sample_seed(config.seed_of(0, 1, i), 0, r["sample"])
        assert r["completion_ids"] == returned[seed]
        # the naive reference: the adapter's model decodes the request's prompt with the request's seed
        q = by_seed[seed]
        ids, _ = reference(mdl, q["prompt"], 10, q["temperature"], q["seed"], 0, q["top_p"])
        assert r["completion_ids"] == ids and q["prompt"] == r["prompt_ids"]
    assert not (model_dir / "model.safetensors").exists()  # the weights were never needed


def test_rollouts_keep_the_prompt_ids_the_server_sampled_after(tmp_path, tok, model_dir):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok) as stub:
        run_collect(run, stub.url, model_dir, 1)
    sent = {tuple(r["prompt"]) for r in completion_requests(stub)}
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
        propose = R.proposer(generator.sampler(cfg, run, 1, max_new_tokens=cfg["refine_tokens"]), cfg["bench"],
                             cfg["temperature"])
        out = propose(MSGS[:1], 2, 5)[0]
        (load,) = load_requests(stub)
        assert completion_requests(stub)[-1]["model"] == load["lora_name"]
        # the two samples are concurrent n=1 requests, so the stub may answer them in either order
        assert sorted(s["token_ids"] for s in out) == sorted(r["choices"][0]["token_ids"] for r in stub.replies[-2:])
        # iteration 0's meta-agent is the base model, under its served name; nothing more is loaded
        R.proposer(generator.sampler(cfg, run, 0, max_new_tokens=cfg["refine_tokens"]), cfg["bench"],
                   cfg["temperature"])(MSGS[:1], 1, 0)
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
    assert [b["model"] for b in completion_requests(stub)] == ["base"] * 2 + [load["lora_name"]] * 2


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


# ---- issue 24: independent samples, hit-cap from the ids, a stub as strict as vLLM ----

def sampled(out):
    return [tuple(s["token_ids"]) for per in out for s in per]


def test_identical_prompts_in_one_chunk_sample_independently(tok):
    """vLLM seeds every prompt of a request alike and child i of n with seed + i, so one request for
    a chunk made sample i of two identical prompts the same draw; each sample needs its own seed."""
    with VLLMStub(tiny_llama, tok) as stub:
        out = generator.sample_remote(stub.url, "base", [MSGS[0], MSGS[0]], 2, 24, 1.0, 1.0, 7, PREFILL, tok)
        again = generator.sample_remote(stub.url, "base", [MSGS[0], MSGS[0]], 2, 24, 1.0, 1.0, 7, PREFILL, tok)
        other = generator.sample_remote(stub.url, "base", [MSGS[0], MSGS[0]], 2, 24, 1.0, 1.0, 8, PREFILL, tok)
    assert len(set(sampled(out))) == 4  # four draws, not two drawn twice
    assert sampled(again) == sampled(out) and set(sampled(other)).isdisjoint(sampled(out))  # per seed


def test_greedy_sampling_of_several_samples_is_accepted(tok):
    """vLLM refuses n > 1 at temperature 0 ("n must be 1 when using greedy sampling"); the local
    sampler does not, so the remote one must not either."""
    with VLLMStub(tiny_llama, tok) as stub:
        out = generator.sample_remote(stub.url, "base", MSGS[:1], 2, 12, 0.0, 1.0, 0, PREFILL, tok)[0]
    p = sampling.prompt_ids(tok, MSGS[0], PREFILL)
    greedy = sampling.decode(tiny_llama(), [p], 1, 12, 0.0, 1.0, 2, 0)[0][0]
    assert [s["token_ids"] for s in out] == [greedy, greedy]


def eos_at(stub_kwargs, tok, model_dir, stop, cap=48, seeds=range(12)):
    """(seed, L): a seed whose first sample of MSGS[0] ends on `stop` after L >= 2 tokens, under `cap`."""
    with VLLMStub(tiny_llama, tok, **stub_kwargs) as stub:
        for seed in seeds:
            s = generator.sample_remote(stub.url, "base", MSGS[:1], 1, cap, 1.0, 1.0, seed, PREFILL, tok,
                                        frozenset(stub.stops))[0][0]
            if s["token_ids"][-1] == stop and len(s["token_ids"]) >= 2:
                return seed, len(s["token_ids"])
    pytest.fail(f"no sample of the tiny model ended on {stop} within {cap} tokens")


def test_hit_cap_is_decided_from_the_ids_not_the_finish_reason(tok, model_dir):
    """Older vLLM V1 tested the length before the eos, so an eos landing exactly on max_tokens came
    back as finish_reason "length": that completion ended, it did not run into the cap."""
    seed, L = eos_at({}, tok, model_dir, 2)
    with VLLMStub(tiny_llama, tok, length_first=True) as stub:
        sample = generator.sampler(cfg_for(stub.url, model_dir), None, 0, max_new_tokens=L)
        s = sample(MSGS[:1], 1, 1.0, seed, PREFILL)[0][0]
        assert s["token_ids"][-1] == 2 and len(s["token_ids"]) == L and s["finish_reason"] == "length"
        assert not s["hit_cap"]
        cut = generator.sampler(cfg_for(stub.url, model_dir), None, 0, max_new_tokens=L - 1)(MSGS[:1], 1, 1.0, seed, PREFILL)
        assert cut[0][0]["hit_cap"] and cut[0][0]["token_ids"][-1] != 2  # one token short: really capped


def write_generation_config(d, **fields):
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "pad_token_id": 0, **fields}))


def test_every_generation_config_eos_stops_and_ends_a_completion_as_locally(tok, model_dir):
    """vLLM stops on every eos id of generation_config.json, not only the tokenizer's; spogw must count
    such an ending as one (no hit_cap, the stop token out of the text) exactly as the local sampler does."""
    x = tok.convert_tokens_to_ids("e")
    write_generation_config(model_dir, eos_token_id=[2, x])
    seed, L = eos_at({"model_dir": model_dir}, tok, model_dir, x, seeds=range(40))
    with VLLMStub(tiny_llama, tok, model_dir=model_dir, length_first=True) as stub:
        s = generator.sampler(cfg_for(stub.url, model_dir), None, 0, max_new_tokens=L)(MSGS[:1], 1, 1.0, seed, PREFILL)[0][0]
    assert s["token_ids"][-1] == x and len(s["token_ids"]) == L and not s["hit_cap"]
    assert s["text"] == tok.decode(s["token_ids"][:-1], skip_special_tokens=True)  # as sampling.sample's text
    local = tiny_llama()
    local.generation_config.eos_token_id = [2, x]
    assert sampling.stop_ids(local, tok) == {2, x}  # the local sampler's stops: the same set


def test_a_server_that_stops_where_spogw_would_not_is_an_error(tok, model_dir, tmp_path):
    """A server whose generation_config has an eos spogw's --model lacks samples another distribution
    (it ends where the local sampler would go on): refused, naming the URL, not trained on."""
    served = tmp_path / "served"
    served.mkdir()
    x = tok.convert_tokens_to_ids("e")
    write_generation_config(served, eos_token_id=[2, x])
    seed, _ = eos_at({"model_dir": served}, tok, served, x, seeds=range(40))
    with VLLMStub(tiny_llama, tok, model_dir=served) as stub:
        with pytest.raises(generator.GeneratorError, match="stop") as e:
            generator.sampler(cfg_for(stub.url, model_dir), None, 0, max_new_tokens=48)(MSGS[:1], 1, 1.0, seed, PREFILL)
    assert stub.url in str(e.value)


def test_generation_config_sampling_defaults_never_reach_the_samples(tok, model_dir):
    """vLLM fills every sampling field a request leaves out from generation_config.json (Qwen2.5:
    top_k 20, repetition_penalty 1.05); the local sampler applies temperature and top-p only, so the
    generator sends the rest as off. The control request shows the stub applies such defaults."""
    write_generation_config(model_dir, eos_token_id=2, top_k=3, min_p=0.2, repetition_penalty=1.5,
                            temperature=0.3, top_p=0.5)
    with VLLMStub(tiny_llama, tok, model_dir=model_dir) as stub:
        out = generator.sample_remote(stub.url, "base", MSGS[:1], 3, 24, 1.0, 1.0, 5, PREFILL, tok)[0]
        bodies = completion_requests(stub)
        p = sampling.prompt_ids(tok, MSGS[0], PREFILL)
        refs = [reference(tiny_llama(), p, 24, 1.0, b["seed"], j)[0] for b in bodies for j in range(b["n"])]
        control = dict(bodies[0], n=1)
        for k in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            control.pop(k)
        _, reply = stub.complete(control)
    assert sorted(s["token_ids"] for s in out) == sorted(refs) and len(refs) == 3
    assert reply["choices"][0]["token_ids"] != refs[0]


def test_a_prompt_past_max_model_len_is_an_error_naming_the_url(tok):
    with VLLMStub(tiny_llama, tok, max_model_len=40) as stub:
        with pytest.raises(generator.GeneratorError) as e:
            generator.sample_remote(stub.url, "base", MSGS[:1], 1, 32, 1.0, 1.0, 0, PREFILL, tok)
    assert stub.url in str(e.value) and "maximum context length is 40" in str(e.value)
    assert "--max-model-len" in str(e.value) and "--max-new-tokens" in str(e.value)


@pytest.mark.parametrize("flat", [False, True])  # vLLM >= 0.10.1: {"error": {...}}; before: flat
def test_both_error_body_shapes_give_the_servers_message(tmp_path, tok, model_dir, flat):
    run = tmp_path / "run"
    make_adapter(run / "iter_1" / "adapter", seed=1)
    with VLLMStub(tiny_llama, tok, flat_errors=flat, refuse="LoRA rank 4 is greater than max_lora_rank 2") as stub:
        with pytest.raises(generator.GeneratorError) as load:
            generator.serve_generator(cfg_for(stub.url, model_dir), run, 1)
        with pytest.raises(generator.GeneratorError) as missing:
            generator.sample_remote(stub.url, "nope", MSGS[:1], 1, 8, 1.0, 1.0, 0, PREFILL, tok)
    assert stub.url in str(load.value) and "max_lora_rank 2" in str(load.value) and "{" not in str(load.value)
    assert stub.url in str(missing.value) and "The model `nope` does not exist." in str(missing.value)
    assert "{" not in str(missing.value)
