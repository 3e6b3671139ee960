"""One numeric path for pi_theta, pi_old and pi_ref (any precision, CPU bf16 included), and
activation checkpointing that changes memory, never gradients."""
import json

import pytest
import torch

import attention
import model
import train
from conftest import tiny_llama, tiny_tokenizer
import kernels
import lora
import losses
import sampling
import config

PROMPT = [{"role": "user", "content": "what is 2+3?"}]
COMPLETIONS = ["5", "6 6", "41 + 1", "1 2", "77", "3 * 3 = 9", "x", "2 2 2 2"]


def lora_model(dtype=torch.float32, seed=0):
    mdl = tiny_llama(seed).to(dtype)
    lora.add_lora(mdl, r=4, alpha=8)
    torch.manual_seed(seed + 1)
    for m in lora.lora_modules(mdl).values():  # a trained adapter: pi_old != base
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return mdl


def write_groups(path, tok, scores_per_group):
    """Several groups of one prompt with completions of unequal length, so that how sequences are
    cut into micro-batches changes the batch shapes."""
    rows = []
    for g, scores in enumerate(scores_per_group):
        comps = COMPLETIONS[g::len(scores_per_group)][:len(scores)]
        adv = losses.advantages(scores)
        members = [{"sample": 10 * g + i, "completion": c, "score": s, "advantage": a,
                    "completion_ids": tok(c, add_special_tokens=False)["input_ids"] + [2]}
                   for i, (c, s, a) in enumerate(zip(comps, scores, adv))]
        rows.append({"problem_id": f"p{g}", "prompt": PROMPT, "prefill": "", "members": members})
    path.mkdir(parents=True, exist_ok=True)
    (path / "groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ref", ["old", "base"])
@pytest.mark.parametrize("prompt_kv", ["repeat", "shared"])
def test_first_step_sees_pi_theta_equal_pi_old_exactly(tmp_path, monkeypatch, dtype, ref, prompt_kv):
    """theta == theta_old at the first step of an iteration: every token's log-ratio must be 0,
    exactly, not approximately, whatever the precision, the micro-batching and the prompt's K/V
    path (and the KL to pi_ref = pi_old 0 as well)."""
    tok = tiny_tokenizer()
    mdl = lora_model(dtype)
    if prompt_kv == "shared":
        attention.use(mdl, "shared")
    write_groups(tmp_path / "iter_0", tok, [[1.0, 0.0, 0.5], [0.0, 1.0], [1.0, 0.0, 0.0]])
    seen = []
    terms = kernels.grpo_token_terms

    def spy(logp, old_logp, ref_logp, *a):
        seen.append(((logp - old_logp).detach().clone(), (logp - ref_logp).detach().clone()))
        return terms(logp, old_logp, ref_logp, *a)

    monkeypatch.setattr(kernels, "grpo_token_terms", spy)
    # lr 0 keeps theta == theta_old for every step; a budget that cuts steps into several micro-batches
    c = dict(config.defaults(), seed=0, model="tiny", ref=ref, lr=0.0, epochs=1, groups_per_step=2, token_budget=40)
    train.update(tmp_path, 0, c, mdl, tok)
    assert len(seen) >= 3
    for d_old, d_ref in seen:
        assert torch.equal(d_old, torch.zeros_like(d_old))
        if ref == "old":
            assert torch.equal(d_ref, torch.zeros_like(d_ref))
        else:  # the adapter is not zero: the base model really differs
            assert d_ref.abs().max() > 0
    log = [json.loads(l) for l in (tmp_path / "iter_0" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["clip_frac"] == 0.0 and log[0]["ratio"] == 1.0
    if ref == "old":
        assert log[0]["kl"] == 0.0


def test_scoredpo_first_step_loss_is_log2_when_theta_is_ref(tmp_path):
    """pi_ref = base in Score-DPO: at iteration 0 (B = 0) theta == ref, so every pair's margin is
    exactly 0 and the first step's loss is exactly log 2 -- in bf16 too."""
    tok = tiny_tokenizer()
    mdl = lora.add_lora(tiny_llama().to(torch.bfloat16), r=4, alpha=8)
    write_groups(tmp_path / "iter_0", tok, [[1.0, 0.0, 0.5], [0.0, 1.0]])
    c = dict(config.defaults(), seed=0, model="tiny", loss="scoredpo", lr=0.0, epochs=1, groups_per_step=1,
             token_budget=40, pairs_per_problem=3)
    train.update(tmp_path, 0, c, mdl, tok)
    log = [json.loads(l) for l in (tmp_path / "iter_0" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0, dtype=torch.float64)).item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_changes_no_gradient(dtype):
    """Per-layer activation checkpointing through the shared-prompt forward (the prompt's KV cache
    is replayed, not re-appended, when a layer is recomputed) gives the same loss and the same LoRA
    gradients bit for bit; both equal the naive per-sequence forward (no shared prompt, no
    checkpointing) up to rounding."""
    tok = tiny_tokenizer()
    mdl = lora_model(dtype)
    params = lora.lora_parameters(mdl)
    p = sampling.prompt_ids(tok, PROMPT)
    seqs = [{"ids": p + tok(c, add_special_tokens=False)["input_ids"] + [2], "n_prompt": len(p)} for c in COMPLETIONS[:5]]
    weights = torch.linspace(-1, 1, sum(len(s["ids"]) - s["n_prompt"] for s in seqs))

    def grads(fn):
        for q in params:
            q.requires_grad_(True)
            q.grad = None
        h, W, y = fn()
        lp = kernels.fused_logprobs(h, W, y)
        (lp * weights).sum().backward()
        return lp.detach(), [q.grad.clone() for q in params]

    def naive():  # one full forward per sequence, no cache, no checkpointing
        hs, ys = [], []
        for s in seqs:
            ids = torch.tensor([s["ids"]])
            comp = torch.zeros_like(ids)
            comp[0, s["n_prompt"]:] = 1
            with model.precision(mdl):
                h, W, y = model.completion_hidden(mdl, ids, torch.ones_like(ids), comp)
            hs.append(h)
            ys.append(y)
        return torch.cat(hs).to(W.dtype), W, torch.cat(ys)

    lp0, g0 = grads(lambda: train.forward_hidden(mdl, seqs, ckpt=False))
    lp1, g1 = grads(lambda: train.forward_hidden(mdl, seqs, ckpt=True))
    assert torch.equal(lp0, lp1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    lpn, gn = grads(naive)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(lp0, lpn, atol=tol * 10)
    for a, b in zip(g0, gn):
        assert (a - b).norm() <= tol * b.norm() + 1e-6


def test_dtype_knob_rejects_unknown_values():
    assert model.resolve_dtype("auto", "cpu") == torch.float32
    assert model.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(model.ModelError, match="--dtype"):
        model.resolve_dtype("int8", "cpu")


def test_gqa_attention_equals_repeated_kv_attention():
    """The folded grouped-query attention against the naive one: K/V repeated per query head,
    softmax(q k^T * scale + mask) v, in float64."""
    torch.manual_seed(0)
    B, Hkv, n_rep, T, S, D = 3, 2, 4, 5, 9, 8
    q = torch.randn(B, Hkv * n_rep, T, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64)
    mask = torch.rand(B, 1, T, S) > 0.3
    mask[..., 0] = True  # every query sees at least one key

    class Attn(torch.nn.Module):
        num_key_value_groups = n_rep
        is_causal = True

    out, _ = attention.gqa_attention(Attn(), q, k, v, mask, scaling=0.5)
    kr, vr = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = (q @ kr.transpose(-1, -2)) * 0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vr
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-12)


def test_gqa_attention_in_the_training_forward():
    tok = tiny_tokenizer()
    mdl = lora_model()
    p = sampling.prompt_ids(tok, PROMPT)
    seqs = [{"ids": p + tok(c, add_special_tokens=False)["input_ids"] + [2], "n_prompt": len(p)} for c in COMPLETIONS[:4]]
    h0, _, _ = train.forward_hidden(mdl, seqs)
    attention.use(mdl, "gqa")
    assert mdl.config._attn_implementation == "spogw_gqa"
    h1, _, _ = train.forward_hidden(mdl, seqs)
    assert torch.allclose(h0, h1, atol=1e-5)


def test_bench_gpu_quick_on_cpu():
    """bench.py gpu's own code path, on a tiny shape: the first step it reports is exact."""
    import argparse

    import bench_gpu
    for prompt_kv in ("repeat", "shared"):
        args = argparse.Namespace(device="cpu", dtype="bf16", models=[], reps=1, no_gqa=False, quick=True, json=True,
                                  prompt_kv=prompt_kv)
        (row,) = bench_gpu.run(args)
        assert row["max_abs_logratio"] == 0.0 and row["first_step_kl"] == 0.0 and row["first_step_ratio"] == 1.0
        assert row["sample_tok_s"] > 0 and row["step_s_ckpt"] > 0 and row["prompt_kv"] == prompt_kv


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_gpu_without_cuda_exits_2():
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr


def test_run_notes_warn_about_an_idle_gpu_and_estimate_only_what_was_measured(monkeypatch):
    c = dict(config.defaults())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    notes = config.run_notes(c, 3)
    assert any(n.startswith("warning: CUDA is available") for n in notes)
    assert any(n.startswith("estimated time") for n in notes)
    notes = config.run_notes(dict(c, device="cuda", model="Qwen/Qwen2.5-7B-Instruct"), 3)
    assert not any(n.startswith(("estimated time", "warning")) for n in notes)
    notes = config.run_notes(dict(c, bench="mixed"), 3)  # arith's per-unit costs say nothing about mixed
    assert not any(n.startswith("estimated time") for n in notes) and any("no time estimate" in n for n in notes)


def test_the_estimate_is_scaled_by_this_machines_matmul():
    """A core half as fast as the reference's doubles the estimate; the calibration leaves torch's
    thread count as it found it."""
    c = dict(config.defaults())
    minutes = lambda here: float(next(n for n in config.run_notes(c, 3, here=here)
                                      if n.startswith("estimated time")).split("~")[1].split(" ")[0])
    ref = config.REF_MATMUL_FLOP_S
    assert minutes(ref) == round(config.estimate_minutes(c, 3))
    assert abs(minutes(ref / 2) - 2 * config.estimate_minutes(c, 3)) <= 0.5
    threads = torch.get_num_threads()
    assert config.one_thread_matmul() > 1e8 and torch.get_num_threads() == threads
