"""attention.py: the shared-prefix attention against naive attention (keys and values repeated per
completion and per query head, softmax, float64), in the update's forward and backward, with and
without activation checkpointing, and what autograd keeps; and in decoding, where the samples must be
the ones the prefix copied into every row gives, from a cache that no longer holds the prefix.

    python -m pytest -q tests/test_attention.py
"""
import gc

import pytest
import torch

import attention
import lora
import model
import sampling
import train
from conftest import tiny_llama


def naive(q, kp, vp, kc, vc, scale):
    """q [U, Hq, T, D]; kp, vp [Hkv, P, D]; kc, vc [U, Hkv, T, D] -> [U, Hq, T, D]: every row
    attends the prompt and, causally, itself, with K/V repeated per query head."""
    U, Hq, T, D = q.shape
    rep = Hq // kp.shape[0]
    k = torch.cat([kp.expand(U, -1, -1, -1), kc], 2).repeat_interleave(rep, 1)
    v = torch.cat([vp.expand(U, -1, -1, -1), vc], 2).repeat_interleave(rep, 1)
    P = kp.shape[1]
    allowed = torch.ones(T, P + T, dtype=torch.bool)
    allowed[:, P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_prefix_attention_equals_naive_attention_forward_and_backward():
    torch.manual_seed(0)
    U, Hkv, rep, T, P, D = 3, 2, 3, 5, 7, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(U, Hkv * rep, T, D, **f64)
    kp, vp = torch.randn(Hkv, P, D, **f64), torch.randn(Hkv, P, D, **f64)
    kc, vc = torch.randn(U, Hkv, T, D, **f64), torch.randn(U, Hkv, T, D, **f64)
    inputs = (q, kp, vp, kc, vc)

    class Attn:
        num_key_value_groups = rep

    key, value = attention.SharedKV(kp[None], kc), attention.SharedKV(vp[None], vc)
    ours, _ = attention.shared_prefix_attention(Attn(), q, key, value, scaling=0.5)
    ref = naive(q, kp, vp, kc, vc, 0.5).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-12)
    up = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * up).sum(), inputs)
    g_ref = torch.autograd.grad((ref * up).sum(), inputs)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def lora_model():
    mdl = tiny_llama(seed=0, vocab=64)
    lora.add_lora(mdl, r=4, alpha=8)
    torch.manual_seed(1)
    for m in lora.lora_modules(mdl).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return mdl


def sequences(prompt_len=40):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 64, (prompt_len,), generator=g).tolist()
    seqs = []
    for n in (5, 9, 1, 12, 7, 9):  # completions of several lengths, one of a single token
        seqs.append({"ids": prompt + torch.randint(3, 64, (n,), generator=g).tolist(), "n_prompt": prompt_len})
    return seqs


def forward_and_grads(mdl, seqs, ckpt):
    mdl.zero_grad()
    h, W, y = train.forward_hidden(mdl, seqs, ckpt)
    lp = torch.log_softmax(h @ W.T, -1).gather(-1, y[:, None]).squeeze(-1)
    (lp * torch.linspace(-1, 1, len(lp))).sum().backward()
    return lp.detach(), [p.grad.clone() for p in mdl.parameters() if p.requires_grad]


@pytest.mark.parametrize("ckpt", [False, True])
def test_the_update_forward_is_the_same_with_the_prompt_held_once(ckpt):
    """train.forward_hidden (which shared_prompt_hidden serves) through attention.use(model,
    "shared") against the default path that repeats the prompt's K/V per row: log-probs and LoRA
    gradients agree to float32 rounding, with or without activation checkpointing."""
    seqs = sequences()
    mdl = lora_model()
    lp0, g0 = forward_and_grads(mdl, seqs, ckpt=False)
    attention.use(mdl, "shared")
    assert attention.shares_prefixes(mdl)
    lp1, g1 = forward_and_grads(mdl, seqs, ckpt=ckpt)
    assert torch.allclose(lp0, lp1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def saved_bytes(mdl, seqs):
    """Bytes of the distinct tensors autograd keeps for the backward of one forward."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train.forward_hidden(mdl, seqs)
    return sum(kept.values())


def test_the_prompt_is_kept_once_not_once_per_row():
    """What autograd keeps for a 240-token prompt and 6 or 12 short completions: with the prompt's
    K/V repeated per row (and per query head by SDPA) each extra row adds the prompt's K/V again;
    held once, an extra row adds only its own tokens."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 64, (240,), generator=g).tolist()
    seqs = [{"ids": prompt + torch.randint(3, 64, (8,), generator=g).tolist(), "n_prompt": 240} for _ in range(12)]
    mdl = lora_model()
    repeated = [saved_bytes(mdl, seqs[:6]), saved_bytes(mdl, seqs)]
    attention.use(mdl, "shared")
    once = [saved_bytes(mdl, seqs[:6]), saved_bytes(mdl, seqs)]
    assert once[1] < 0.6 * repeated[1]
    assert once[1] - once[0] < 0.5 * (repeated[1] - repeated[0])
    # and the sampler's path is untouched: plain tensors still go to transformers' SDPA
    ids = torch.tensor([seqs[0]["ids"]])
    with torch.no_grad():
        a = mdl(input_ids=ids).logits
        attention_off = tiny_llama(seed=0, vocab=64)
        lora.add_lora(attention_off, r=4, alpha=8)
        attention_off.load_state_dict(mdl.state_dict())
        assert torch.equal(a, attention_off(input_ids=ids).logits)


# ---- decoding ----

def test_prefix_decode_attention_equals_naive_masked_attention():
    """Rows with left padding and unwritten cache slots (the decode cache's own part), queries of
    one token and of several, against the prefix concatenated to every row, repeated per query
    head, under the same mask, in float64."""
    torch.manual_seed(0)
    B, Hkv, rep, P, L, D = 3, 2, 3, 6, 9, 4
    kp, vp = torch.randn(1, Hkv, P, D, dtype=torch.float64), torch.randn(1, Hkv, P, D, dtype=torch.float64)
    ko, vo = torch.randn(B, Hkv, L, D, dtype=torch.float64), torch.randn(B, Hkv, L, D, dtype=torch.float64)
    for T in (1, 4):
        q = torch.randn(B, Hkv * rep, T, D, dtype=torch.float64)
        mask = torch.rand(B, 1, T, L) < 0.6
        mask[:, :, :, 0] = False  # a pad every row skips
        ours, _ = attention.prefix_decode_attention(q, attention.SharedKV(kp, ko, True),
                                                    attention.SharedKV(vp, vo, True), mask, 0.5)
        k = torch.cat([kp.expand(B, -1, -1, -1), ko], 2).repeat_interleave(rep, 1)
        v = torch.cat([vp.expand(B, -1, -1, -1), vo], 2).repeat_interleave(rep, 1)
        full = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), mask], -1)
        ref = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~full, float("-inf")), -1) @ v
        assert torch.allclose(ours, ref.transpose(1, 2), atol=1e-12)
        none, _ = attention.prefix_decode_attention(q, attention.SharedKV(kp, ko, True),
                                                    attention.SharedKV(vp, vo, True), None, 0.5)
        every = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v  # no mask: every position visible
        assert torch.allclose(none, every.transpose(1, 2), atol=1e-12)


PROMPT = list(range(3, 40))  # a 37-token prefix every prompt shares, then each prompt's own tokens
PROMPTS = [PROMPT + [41, 42, 43], PROMPT + [44], PROMPT + [45, 46, 47, 48, 49, 50]]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_decoding_with_the_prefix_held_once_samples_what_copies_sample(temperature, top_p):
    """sampling.decode through attention.use(model, "shared") against the default path that copies
    the prefix's K/V into every row: the same tokens (greedy and sampled, n rows per prompt,
    per-prompt budgets, so stopped rows are compacted away mid-way) and log-probs to float32
    rounding."""
    mdl = tiny_llama(seed=0, vocab=64)

    def run():
        gen = torch.Generator().manual_seed(5)
        return sampling.decode(mdl, PROMPTS, n=3, max_new_tokens=[4, 14, 9], temperature=temperature,
                               top_p=top_p, stop=2, pad=0, gen=gen)
    copied = run()
    attention.use(mdl, "shared")
    held = run()
    for (ids0, lp0), (ids1, lp1) in zip(copied, held):
        assert ids0 == ids1
        assert lp1 == pytest.approx(lp0, abs=1e-5)


def test_the_decode_cache_holds_no_copy_of_the_prefix():
    """With the prefix held once, each row's cache is its own tokens and the room to generate;
    copied, it is the prefix as well."""
    mdl = tiny_llama(seed=0, vocab=64)
    S, new = 6, 10  # the longest own part; the tokens to generate
    cache = sampling._prefill(mdl, PROMPTS, 0, new)[0]
    assert cache.layers[0].keys.shape[:3] == (3, 2, len(PROMPT) + S + new)
    attention.use(mdl, "shared")
    cache = sampling._prefill(mdl, PROMPTS, 0, new)[0]
    assert cache.layers[0].keys.shape[:3] == (3, 2, S + new)


def test_auto_holds_the_prompt_once_on_a_cpu():
    """--prompt-kv's default, "auto", is "shared" on a CPU (where it was measured); "repeat" leaves
    transformers' attention as loaded."""
    assert attention.shares_prefixes(attention.use(tiny_llama(seed=0, vocab=64), "auto"))
    assert not attention.shares_prefixes(attention.use(tiny_llama(seed=0, vocab=64), "repeat"))


def tensors_left_in_cycles(fn):
    """The tensors that only Python's cyclic collector would free after fn() returns. Such a tensor
    outlives its micro-batch or decode until a full collection runs (rarely: it counts objects, not
    bytes), and the main job's update grew by ~0.17 GB a step that way."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn()
        gc.collect()
        return [o for o in gc.garbage if torch.is_tensor(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("prompt_kv", ["repeat", "shared"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_an_update_step_leaves_no_tensor_to_the_cyclic_collector(prompt_kv, ckpt):
    mdl = attention.use(lora_model(), prompt_kv)
    assert tensors_left_in_cycles(lambda: forward_and_grads(mdl, sequences(), ckpt)) == []


@pytest.mark.parametrize("prompt_kv", ["repeat", "shared"])
def test_a_decode_leaves_no_tensor_to_the_cyclic_collector(prompt_kv):
    mdl = attention.use(tiny_llama(seed=0, vocab=64), prompt_kv)
    run = lambda: sampling.decode(mdl, PROMPTS, n=3, max_new_tokens=[4, 14, 9], temperature=1.0, stop=2, pad=0,
                                  gen=torch.Generator().manual_seed(5))
    assert tensors_left_in_cycles(run) == []


def test_a_memoized_prefix_gives_what_recomputing_it_gives():
    """sampling.decode with a `prefixes` memo kept across batches: the shared prefix runs once for
    batches that share it, the samples are bit for bit those of recomputing it, and a batch whose
    common prefix is longer (its prompts agree past the memoized one) runs its own."""
    mdl = attention.use(tiny_llama(seed=0, vocab=64), "shared")
    batches = [PROMPTS, [PROMPT + [51, 52], PROMPT + [53]], [PROMPT + [54, 55, 56], PROMPT + [54, 55, 57]]]
    prefix_runs = []
    hook = mdl.register_forward_pre_hook(lambda m, a, kw: prefix_runs.append(kw["input_ids"].shape)
                                         if kw["input_ids"].shape[0] == 1 < kw["input_ids"].shape[1] else None,
                                         with_kwargs=True)  # a prefix run: one row, many tokens

    def run(prompts, prefixes):
        return sampling.decode(mdl, prompts, n=2, max_new_tokens=6, temperature=1.0, stop=2, pad=0,
                               gen=torch.Generator().manual_seed(3), prefixes=prefixes)
    alone = [run(b, None) for b in batches]
    prefix_runs.clear()
    memo = {}
    kept = [run(b, memo) for b in batches]
    hook.remove()
    for a, b in zip(alone, kept):
        assert a == b
    assert [s[1] for s in prefix_runs] == [len(PROMPT), len(PROMPT) + 2]  # the third batch's prefix is longer
    assert sorted(map(len, memo)) == [len(PROMPT), len(PROMPT) + 2]
