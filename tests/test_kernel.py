"""The fused log-prob kernels (kernels.py) against float64 naive references.

    python -m pytest -x -q tests/test_kernel.py
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import bench_gpu  # noqa: E402
import kernels  # noqa: E402
from kernels import CHUNK_BYTES, ChunkBuffers, auto_chunk, fused_grpo_loss, fused_logprobs  # noqa: E402
from losses import grpo_loss, kl_token_mask, token_weights  # noqa: E402
from model import completion_hidden  # noqa: E402


def completion_logprobs(model, input_ids, attention_mask, completion_mask, chunk_size=None):
    """Per-token log-probs [N] of the completion tokens through the fused kernel."""
    hidden, weight, targets = completion_hidden(model, input_ids, attention_mask, completion_mask)
    return fused_logprobs(hidden, weight.to(hidden.dtype), targets, chunk_size)


def make(N, V, H, dtype=torch.float32, seed=0, w_grad=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_(w_grad)
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, y


def naive_logp(h, W, y):
    """The reference: full float64 logits, log_softmax, gather."""
    return torch.log_softmax(h.double() @ W.double().t(), -1).gather(1, y[:, None]).squeeze(1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def grads(f, *xs):
    out = f()
    torch.autograd.backward(out[0] if isinstance(out, tuple) else out)
    gs = [None if x.grad is None else x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    return out, gs


@pytest.mark.parametrize("N,V,H,chunk", [(1, 7, 5, 4), (37, 101, 16, 8), (64, 257, 32, 64), (50, 1000, 24, 1024)])
@pytest.mark.parametrize("w_grad", [False, True])
def test_fused_logprobs_matches_float64(N, V, H, chunk, w_grad):
    h, W, y = make(N, V, H, w_grad=w_grad)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1))  # a non-trivial upstream grad
    fused = fused_logprobs(h, W, y, chunk_size=chunk)
    assert fused.dtype == torch.float32 and fused.shape == (N,)
    ref = naive_logp(h, W, y)
    torch.testing.assert_close(fused.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    # gradients of sum(up * logp)
    (fused_logprobs(h, W, y, chunk_size=chunk) * up).sum().backward()
    dh, dW = h.grad.clone(), None if W.grad is None else W.grad.clone()
    h.grad = W.grad = None
    (naive_logp(h, W, y) * up.double()).sum().backward()
    assert rel(dh, h.grad) < 1e-5
    if w_grad:
        assert dW is not None and rel(dW, W.grad) < 1e-5
    else:
        assert dW is None and W.grad is None  # frozen LM head: no dW is ever computed


def test_gradcheck_double():
    h, W, y = make(5, 11, 3, dtype=torch.float64, w_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused_logprobs(a, b, y, chunk_size=2), (h, W))
    old = naive_logp(h, W, y).detach() + 0.01 * torch.randn(5, dtype=torch.float64)  # rho near 1: smooth region
    ref = old - 0.3
    adv = torch.tensor([1.0, -0.5, 0.7, 2.0, -1.0], dtype=torch.float64)
    tw = torch.full((5,), 0.2, dtype=torch.float64)
    km = (adv > 0).double()
    assert torch.autograd.gradcheck(
        lambda a, b: fused_grpo_loss(a, b, y, old, ref, adv, tw, km, chunk_size=2)[0], (h, W))


def test_gradcheck_double_frozen_head():
    """The frozen-head path (dlogp/dh formed in the forward) against finite differences, several chunks."""
    h, W, y = make(7, 11, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fused_logprobs(a, W, y, chunk_size=3), (h,))


def count_kernel_work(monkeypatch):
    """Counts of head-sized matmuls by kind: "logits" (h W^T of a chunk) and "dh" ((onehot - p) W)."""
    n = {"logits": 0, "dh": 0}
    logits, chunk_grads = kernels.ChunkBuffers.logits, kernels._chunk_grads_

    def counted_logits(self, *a):
        n["logits"] += 1
        return logits(self, *a)

    def counted_chunk_grads(*a):
        n["dh"] += 1
        return chunk_grads(*a)

    monkeypatch.setattr(kernels.ChunkBuffers, "logits", counted_logits)
    monkeypatch.setattr(kernels, "_chunk_grads_", counted_chunk_grads)
    return n


def test_frozen_head_backward_recomputes_nothing(monkeypatch):
    """Head frozen: one logits and one dh matmul per chunk, both in the forward; backward only scales
    [N x H] rows. No_grad (pi_old, pi_ref) skips the dh matmul; a trainable head recomputes the logits."""
    h, W, y = make(50, 97, 8)
    n = count_kernel_work(monkeypatch)
    with torch.no_grad():
        ref = fused_logprobs(h, W, y, chunk_size=16)
    assert n == {"logits": 4, "dh": 0}
    logp = fused_logprobs(h, W, y, chunk_size=16)
    assert torch.equal(logp, ref) and n == {"logits": 8, "dh": 4}  # forming dh changes no log-prob
    logp.sum().backward()
    assert n == {"logits": 8, "dh": 4}
    W.requires_grad_(True)
    fused_logprobs(h, W, y, chunk_size=16).sum().backward()
    assert n == {"logits": 16, "dh": 8}  # 4 forward, 4 recomputed in backward


def test_frozen_head_keeps_no_vocab_sized_tensor():
    """What the frozen-head path keeps for backward is [N x H] (the point of the kernel: O(chunk x V)
    scratch, nothing [N x V] alive between forward and backward)."""
    N, V, H = 40, 500, 8
    h, W, y = make(N, V, H)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logp = fused_logprobs(h, W, y, chunk_size=16)
    assert saved == [(N, H)]
    logp.sum().backward()
    assert h.grad.shape == (N, H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_dh_equals_trainable_head_dh(dtype):
    """Both paths form (onehot - p) W the same way, so with upstream 1 their dh agree bit for bit, and
    with any upstream g to the rounding of one fp32 product."""
    h, W, y = make(45, 300, 16, dtype=dtype)
    up = torch.randn(45, generator=torch.Generator().manual_seed(2))
    d = {}
    for w_grad in (False, True):
        for name, u in (("ones", torch.ones(45)), ("up", up)):
            W.requires_grad_(w_grad)
            (fused_logprobs(h, W, y, chunk_size=16) * u).sum().backward()
            d[w_grad, name], h.grad, W.grad = h.grad.clone(), None, None
    assert d[False, "ones"].dtype == dtype and torch.equal(d[False, "ones"], d[True, "ones"])
    assert rel(d[False, "up"], d[True, "up"]) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_bf16_frozen_head_gradients_of_confident_tokens():
    """The frozen-head path per bucket of the target's p up to 0.99999: its bf16 dh is within 2x the error
    of plain bf16 autograd, like the trainable-head path in test_bf16_gradients_of_confident_tokens."""
    rows = bench_gpu.grad_error_buckets(H=64, V=1000, per_bucket=32, chunk_size=16)
    frozen = bench.frozen_dh_errors(H=64, V=1000, per_bucket=32, chunk_size=16)
    assert [(f["lo"], f["hi"], f["n"]) for f in frozen] == [(r["lo"], r["hi"], r["n"]) for r in rows]
    for r, f in zip(rows, frozen):
        assert 0 < f["frozen_dh"] <= 2 * r["plain_dh"], (f, r)


def test_bf16_close_to_float64():
    h, W, y = make(70, 300, 32, dtype=torch.bfloat16, w_grad=True)
    logp = fused_logprobs(h, W, y, chunk_size=16)
    assert logp.dtype == torch.float32
    # bf16 inputs are exact in float64, so the only error is the bf16 matmul (8-bit mantissa,
    # fp32 accumulate) and the bf16 gradients. Stated tolerances: max error 4e-3 x max|logp| on values
    # (measured 1.4e-3), 1e-2 relative on gradients (measured 4e-3)
    ref = naive_logp(h, W, y)
    assert (logp.double() - ref).abs().max() < 4e-3 * ref.abs().max()
    logp.sum().backward()
    dh, dW = h.grad.clone(), W.grad.clone()
    assert dh.dtype == dW.dtype == torch.bfloat16
    h.grad = W.grad = None
    ref.sum().backward()
    assert rel(dh, h.grad) < 1e-2 and rel(dW, W.grad) < 1e-2


def test_bf16_gradients_of_confident_tokens():
    """Per bucket of the target's p up to 0.99999: each kernel's bf16 dh and dW are within 2x the error
    of plain bf16 autograd (bf16 logits, fp32 log_softmax), both against float64 at the same inputs."""
    rows = bench_gpu.grad_error_buckets(H=64, V=1000, per_bucket=32, chunk_size=16)
    assert [(r["lo"], r["hi"]) for r in rows] == list(zip(bench_gpu.GRAD_BUCKETS[:-1], bench_gpu.GRAD_BUCKETS[1:]))
    for r in rows:
        assert r["n"] >= 16, r
        for k in ("dh", "dw"):
            assert 0 < r[f"plain_{k}"] < 0.1, r  # bf16 is measurably inexact, and the reference is right
            for v in ("fused_logprobs", "fused_grpo"):
                assert r[f"{v}_{k}"] <= 2 * r[f"plain_{k}"], (v, k, r)


def test_bucket_inputs_hit_their_buckets():
    h, W, y, p = bench_gpu.bucket_inputs(16, 50, 8, seed=1)
    assert h.dtype == torch.float64 and torch.equal(h, h.bfloat16().double()) and torch.equal(W, W.bfloat16().double())
    torch.testing.assert_close(p, naive_logp(h, W, y).exp())
    counts = torch.histogram(p, torch.tensor(bench_gpu.GRAD_BUCKETS, dtype=torch.float64)).hist
    assert (counts >= 4).all(), counts


@pytest.mark.parametrize("V", [32000, 128256, 152064, 256000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_auto_chunk_fits_budget(V, dtype, device):
    c = auto_chunk(V, device, dtype)
    buf = ChunkBuffers(c, torch.empty(V, 8, dtype=dtype, device="meta"))  # the kernels' real scratch, no memory
    scratch = buf.acc.nbytes + (0 if buf.low is None else buf.low.nbytes)
    assert scratch <= CHUNK_BYTES == 256 * 10**6
    assert c & (c - 1) == 0 and (128 if device == "cuda" else 64) <= c <= 1024
    assert c == 1024 or 2 * scratch > CHUNK_BYTES  # the largest chunk that fits
    assert auto_chunk(V, torch.device(device), str(dtype)) == c


def test_auto_chunk_examples():
    assert auto_chunk(152064, "cuda", torch.bfloat16) == 256  # 7B head: 234 MB of scratch, 1.07x naive time on an H200
    assert auto_chunk(32000, "cuda", torch.bfloat16) == 1024
    assert auto_chunk(10**6, "cuda", torch.bfloat16) == 128  # floor: the matmuls stay efficient
    assert auto_chunk(2 * 10**6, "cpu", torch.float32) == 64  # 32 rows would fit, but the CPU floor is 64


def test_chunk_zero_or_none_is_auto(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 64 * 1000 * 4)  # fp32 V=1000: 64 rows, so N=300 is 5 chunks
    rows, init = [], kernels.ChunkBuffers.__init__
    monkeypatch.setattr(kernels.ChunkBuffers, "__init__", lambda self, r, w: rows.append(r) or init(self, r, w))
    h, W, y = make(300, 1000, 8)
    assert auto_chunk(1000, "cpu", torch.float32) == 64
    ref = fused_logprobs(h, W, y, 64)
    assert torch.equal(fused_logprobs(h, W, y, 0), ref) and torch.equal(fused_logprobs(h, W, y), ref)
    z = torch.zeros(300)
    a = fused_grpo_loss(h, W, y, ref, ref, z + 1, z + 1, z, chunk_size=None)[0]
    assert torch.equal(a, fused_grpo_loss(h, W, y, ref, ref, z + 1, z + 1, z, chunk_size=64)[0])
    assert rows == [64] * 5
    fused_logprobs(h, W, y, 100)
    assert rows[-1] == 100


def grpo_case(N=45, n_seq=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    seg = torch.sort(torch.randint(0, n_seq, (N,), generator=g)).values
    seg[:n_seq] = torch.arange(n_seq)  # every sequence has a token
    seg = torch.sort(seg).values
    adv = torch.tensor([1.2, -0.8, 0.0, 0.5, -0.9], dtype=torch.float64)[:n_seq]
    return seg, adv, g


@pytest.mark.parametrize("kl,agg", [("masked", "token"), ("full", "seq"), ("none", "token")])
@pytest.mark.parametrize("w_grad", [False, True])
def test_fused_grpo_equals_grpo_on_naive_logprobs(kl, agg, w_grad):
    N, V, H = 45, 203, 16
    h, W, y = make(N, V, H, w_grad=w_grad)
    seg, adv, g = grpo_case(N)
    base = naive_logp(h, W, y).detach().float()
    # old/ref spread so that some tokens are clipped on both sides
    old = base + 0.4 * torch.randn(N, generator=g)
    ref = base + 0.3 * torch.randn(N, generator=g)
    tw = token_weights(seg, len(adv), agg)
    km = kl_token_mask(adv, seg, kl)
    (loss, m), (dh, dW) = grads(lambda: fused_grpo_loss(h, W, y, old, ref, adv[seg].float(), tw, km, chunk_size=7), h, W)
    (rloss, rm), (rdh, rdW) = grads(lambda: grpo_loss(naive_logp(h, W, y), old.double(), ref.double(), adv, seg,
                                                       kl=kl, agg=agg), h, W)
    assert abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
    for k in rm:
        assert abs(m[k] - rm[k]) <= 1e-5 * max(1.0, abs(rm[k])), k
    assert 0 < rm["clip_frac"] < 1  # both branches exercised
    assert rel(dh, rdh) < 1e-5
    assert (dW is None) == (not w_grad) and (not w_grad or rel(dW, rdW) < 1e-5)


def test_micro_batches_add_up_to_full_batch():
    N, V, H = 45, 150, 12
    h, W, y = make(N, V, H, w_grad=True)
    seg, adv, g = grpo_case(N)
    base = naive_logp(h, W, y).detach().float()
    old, ref = base + 0.2 * torch.randn(N, generator=g), base + 0.2 * torch.randn(N, generator=g)
    a, tw, km = adv[seg].float(), token_weights(seg, len(adv), "seq"), kl_token_mask(adv, seg, "masked")
    full, (dh, dW) = grads(lambda: fused_grpo_loss(h, W, y, old, ref, a, tw, km, chunk_size=8), h, W)
    total = 0.0
    for sl in (slice(0, 20), slice(20, N)):  # split mid-sequence on purpose
        loss, _ = fused_grpo_loss(h[sl], W, y[sl], old[sl], ref[sl], a[sl], tw[sl], km[sl], chunk_size=8)
        loss.backward()
        total += loss.item()
    assert abs(total - full[0].item()) < 1e-6
    assert rel(h.grad, dh) < 1e-6 and rel(W.grad, dW) < 1e-6


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).float().eval()


def test_completion_logprobs_tiny_llama_left_padding():
    model = tiny_llama()
    rows = [[5, 9, 3, 17, 22, 40, 8], [11, 2, 30, 31], [7, 7, 1, 50, 63, 12]]  # prompt + completion
    n_prompt = [3, 2, 4]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, (r, p) in enumerate(zip(rows, n_prompt)):  # left padding
        ids[i, T - len(r):] = torch.tensor(r)
        att[i, T - len(r):] = 1
        comp[i, T - len(r) + p:] = 1
    logp = completion_logprobs(model, ids, att, comp, chunk_size=3)
    assert logp.shape == (int(comp.sum()),)
    # reference 1: full logits of the padded batch with the same position ids
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
    full = torch.log_softmax(logits[:, :-1].double(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    torch.testing.assert_close(logp.detach().double(), full[comp[:, 1:].bool()], rtol=1e-5, atol=1e-5)
    # reference 2: each row alone, unpadded (so the left-padding handling itself is right)
    alone = []
    for r, p in zip(rows, n_prompt):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([r])).logits[0, :-1]
        alone.append(torch.log_softmax(lg.double(), -1).gather(1, torch.tensor(r[1:])[:, None]).squeeze(1)[p - 1:])
    torch.testing.assert_close(logp.detach().double(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    # gradients reach the decoder; the tied/frozen head shape is the LM head
    h, W, y = completion_hidden(model, ids, att, comp)
    assert W.shape == (64, 32) and h.shape == (logp.shape[0], 32) and torch.equal(y, ids[:, 1:][comp[:, 1:].bool()])
    logp.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_shared_prompt_forward_equals_per_sequence_forward():
    """train.forward_hidden (one prompt forward per distinct prompt, KV cache repeated, duplicate
    workflows run once) against the naive per-sequence forward: same rows, same gradients."""
    import copy
    import train
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    pa, pb = [5, 9, 3, 17], [11, 2, 30]
    seqs = [{"ids": pa + c, "n_prompt": len(pa)} for c in ([22, 40, 8], [6], [22, 40, 8], [], [33, 34])]
    seqs += [{"ids": pb + c, "n_prompt": len(pb)} for c in ([50, 63, 12, 1], [9])]
    ref_model = copy.deepcopy(model)

    def grads(m):
        return [p.grad.clone() for p in m.parameters()]

    h, W, y = train.forward_hidden(model, seqs)
    logp = fused_logprobs(h, W, y)
    wts = torch.linspace(0.5, 2.0, logp.shape[0])
    (wts * logp).sum().backward()
    ref = []
    for s in seqs:  # naive: each sequence alone, full forward
        if len(s["ids"]) == s["n_prompt"]:
            continue
        lg = ref_model(input_ids=torch.tensor([s["ids"]])).logits[0, s["n_prompt"] - 1:-1]
        ref.append(torch.log_softmax(lg.double(), -1).gather(1, torch.tensor(s["ids"][s["n_prompt"]:])[:, None]).squeeze(1))
    ref = torch.cat(ref)
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    (wts.double() * ref).sum().backward()
    for a, b in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise():
    h, W, y = make(4, 9, 3)
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs(h, W, y.float())
    with pytest.raises(ValueError, match="hidden"):
        fused_logprobs(h, W[:, :2], y)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_logprobs(h, W, y, chunk_size=-1)
    torch.testing.assert_close(fused_logprobs(h, W, y.int()), fused_logprobs(h, W, y))  # int32 targets work


def test_bench_kernel_quick_smoke():
    import subprocess
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench.py", "kernel", "--quick", "--reps", "1", "--grad-per-bucket", "16"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines()]
    table = {ln[3]: ln for ln in lines if len(ln) > 4 and ln[3] in ("naive", "rowloop", "fused_logprobs", "fused_grpo")}
    assert set(table) == {"naive", "rowloop", "fused_logprobs", "fused_grpo"}, r.stdout
    assert all(float(ln[4]) > 0 for ln in table.values()) and "x 1.00 time" in " ".join(table["naive"]), r.stdout
    grad = [ln for ln in lines if ln[:1] == ["grad"]]
    assert len(grad) == 2 * (len(bench_gpu.GRAD_BUCKETS) - 1) and {ln[3] for ln in grad} == {"dh", "dw"}, r.stdout
    assert "bf16 gradient error <= 2x plain autograd in every bucket: PASS" in r.stdout, r.stdout
    bad = subprocess.run([sys.executable, "bench.py", "kernel", "--reps", "0"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "--reps" in bad.stderr
