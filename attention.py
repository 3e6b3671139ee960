"""Attention variants (ARCHITECTURE §7): grouped-query attention without repeat_kv, and many rows
attending to one shared prompt whose keys and values are held once -- the update's completions, and
the local generator's decode (the ~900-token few-shot prefix every prompt starts with).

    python -m pytest -q tests/test_attention.py      # both against naive attention in float64

Both plug into transformers' attention registry, so every decoder family that calls
`attention_interface(module, query, key, value, mask, ...)` after its cache update (Llama, Qwen2,
Mistral, ...) uses them without a patched layer. Keys and values that are plain tensors go to
transformers' own SDPA (or gqa_attention), unchanged: sampling sees the same numbers either way.
"""
import copy
import functools
import weakref

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


def gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention under an explicit mask, without repeat_kv. With a mask,
    transformers' SDPA path copies every KV head n_rep times (7x for Qwen2.5-7B) for every row of a
    group, and that copy is what autograd saves. Here the n_rep query heads that share a KV head are
    folded into the query-length axis instead: the same dot products, K/V read once, and only the
    (small) mask repeated. Anything else (no mask, one query token, MHA) goes to transformers' SDPA."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    B, Hq, T, D = query.shape
    plain = (n_rep == 1 or T == 1 or attention_mask is None or attention_mask.dim() != 4
             or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    Hkv, S = key.shape[1], key.shape[2]
    q = query.reshape(B, Hkv, n_rep * T, D)  # head h = kv * n_rep + r, the order repeat_kv makes
    mask = attention_mask[:, :, None].expand(B, 1, n_rep, T, S).reshape(B, 1, n_rep * T, S)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None


def sdpa_or_shared(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Keys from a shared-prefix cache go to shared_prefix_attention (the update's, shared_prefix_cache)
    or prefix_decode_attention (decoding's, shared_prefix_decode_cache); plain tensors as before
    use(model, "shared"): transformers' SDPA on a CPU, gqa_attention on CUDA."""
    if isinstance(key, SharedKV):
        if key.padded:
            return prefix_decode_attention(query, key, value, attention_mask, scaling)
        return shared_prefix_attention(module, query, key, value, scaling)
    plain = gqa_attention if query.is_cuda else sdpa_attention_forward
    return plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def use(model, name):
    """Switch a model that runs transformers' SDPA to one of ours ("repeat" leaves it): "gqa" (gqa_attention: CUDA, where
    the K/V copy bounds the step) or "shared" (SDPA as before, but a shared-prefix cache's keys go
    to our prefix attention: the update's memory, and the decode's KV reads and cache). Masks are
    built as for SDPA. "auto" (--prompt-kv's default): see resolve."""
    name = resolve(name, next(model.parameters()).is_cuda)
    if name == "repeat" or model.config._attn_implementation not in ("sdpa", "spogw_gqa", "spogw_shared"):
        return model  # "repeat": transformers' attention as loaded
    fn = {"gqa": gqa_attention, "shared": sdpa_or_shared}[name]
    AttentionInterface.register(f"spogw_{name}", fn)
    AttentionMaskInterface.register(f"spogw_{name}", sdpa_mask)
    model.set_attn_implementation(f"spogw_{name}")
    return model


def resolve(prompt_kv, cuda):
    """--prompt-kv's value for a model on CUDA or not: "auto" is "shared" on a CPU, where it was
    measured, and "repeat" (the model as loaded: gqa_attention) on CUDA until it is measured there."""
    return ("repeat" if cuda else "shared") if prompt_kv == "auto" else prompt_kv


def shares_prefixes(model):
    """Whether the model's attention takes a shared-prefix cache (use(model, "shared") was called)."""
    return model.config._attn_implementation == "spogw_shared"


# ---- many completions, one prompt ----

class SharedKV:
    """What a shared-prefix cache layer hands to attention in place of concatenated keys (or values):
    the prompt's, [1, Hkv, P, D], and the rows' own, [U, Hkv, T, D]. `padded`: the own part is a
    decode cache (left padding, unwritten slots) that attention must mask; otherwise it is the
    update's right-padded completions, where causality alone is exact."""
    __slots__ = ("prefix", "own", "padded")

    def __init__(self, prefix, own, padded=False):
        self.prefix, self.own, self.padded = prefix, own, padded


def shared_prefix_cache(prompt_cache):
    """A view of a prompt's KV cache (batch 1) for U completions of that prompt: each layer's
    update returns SharedKV instead of concatenating the prompt's keys to the completions' (which
    would first repeat them U times, and autograd would keep every copy). It stores nothing, so a
    layer recomputed under activation checkpointing sees the same cache."""
    cache = copy.copy(prompt_cache)
    cache.layers = [copy.copy(layer) for layer in prompt_cache.layers]
    for view, layer in zip(cache.layers, prompt_cache.layers):
        view.update = (lambda k, v, *args, _layer=layer, **kwargs:
                       (SharedKV(_layer.keys, k), SharedKV(_layer.values, v)))
    return cache


def shared_prefix_attention(module, query, key, value, scaling=None):
    """Attention of U completions ([U, Hq, T, D] queries) to their shared prompt and, causally, to
    themselves: (output [U, T, Hq, D], None), as transformers' attention functions return it.
    Right padding needs no mask: a real token never attends the pads after it."""
    U, Hq, T, D = query.shape
    Hkv = key.own.shape[1]
    q = query.reshape(U, Hkv, Hq // Hkv * T, D)  # head h = kv * n_rep + r, the order repeat_kv makes
    scale = D ** -0.5 if scaling is None else scaling
    out = PrefixAttention.apply(q, key.prefix[0], value.prefix[0], key.own, value.own, scale)
    return out.reshape(U, Hq, T, D).transpose(1, 2).contiguous(), None


def _row_scores(q, kp, kc, scale):
    """Scaled scores of one completion's queries [Hkv, R*T, D] (R query heads per KV head, each
    over positions 0..T-1) against the prompt's keys [Hkv, P, D] and, causally, its own [Hkv, T, D]:
    [Hkv, R*T, P + T]."""
    T = kc.shape[1]
    t = torch.arange(q.shape[1], device=q.device) % T
    own = (q @ kc.transpose(-1, -2)).masked_fill(torch.arange(T, device=q.device)[None, :] > t[:, None], float("-inf"))
    return torch.cat([q @ kp.transpose(-1, -2), own], -1) * scale


class PrefixAttention(torch.autograd.Function):
    """softmax over [prompt keys; own keys] one completion at a time, in the manner of
    FlashAttention: autograd keeps the inputs, the output and one log-sum-exp per query, and the
    backward recomputes each row's probabilities. The scores of one row ([Hkv, R*T, P+T], ~5 MB for
    a 1000-token prompt) are the largest temporary; the prompt's K/V are never repeated. The
    softmax and its sums run in at least float32 whatever the inputs' precision (as SDPA's kernels do)."""

    @staticmethod
    def forward(ctx, q, kp, vp, kc, vc, scale):
        P, f = kp.shape[1], torch.promote_types(q.dtype, torch.float32)
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=f)
        kpf, vpf = kp.to(f), vp.to(f)
        for u in range(q.shape[0]):
            s = _row_scores(q[u].to(f), kpf, kc[u].to(f), scale)
            lse[u] = torch.logsumexp(s, -1)
            p = torch.exp(s - lse[u, ..., None])
            out[u] = (p[..., :P] @ vpf + p[..., P:] @ vc[u].to(f)).to(q.dtype)
        ctx.save_for_backward(q, kp, vp, kc, vc, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kp, vp, kc, vc, out, lse = ctx.saved_tensors
        P, f = kp.shape[1], torch.promote_types(q.dtype, torch.float32)
        kpf, vpf = kp.to(f), vp.to(f)
        dq, dkc, dvc = torch.empty_like(q), torch.empty_like(kc), torch.empty_like(vc)
        dkp, dvp = torch.zeros_like(kpf), torch.zeros_like(vpf)
        for u in range(q.shape[0]):
            qu, kcu, vcu, do = q[u].to(f), kc[u].to(f), vc[u].to(f), dout[u].to(f)
            p = torch.exp(_row_scores(qu, kpf, kcu, ctx.scale) - lse[u, ..., None])
            dvp += p[..., :P].transpose(-1, -2) @ do
            dvc[u] = p[..., P:].transpose(-1, -2) @ do
            dp = torch.cat([do @ vpf.transpose(-1, -2), do @ vcu.transpose(-1, -2)], -1)
            ds = p * (dp - (do * out[u].to(f)).sum(-1, keepdim=True)) * ctx.scale
            dq[u] = ds[..., :P] @ kpf + ds[..., P:] @ kcu
            dkp += ds[..., :P].transpose(-1, -2) @ qu
            dkc[u] = ds[..., P:].transpose(-1, -2) @ qu
        return dq, dkp.to(kp.dtype), dvp.to(vp.dtype), dkc, dvc, None


# ---- decoding many rows after one prompt prefix ----

def shared_prefix_decode_cache(prefix_cache, own_cache):
    """Decode k rows that all start with one prefix: `prefix_cache` holds the prefix's keys/values
    once (batch 1, already run), `own_cache` (a StaticCache, written in place) each row's own tokens
    after it. Every layer's update writes the own part and hands attention a padded SharedKV, so no
    row keeps a copy of the prefix and each step reads it once for all rows. Returns `own_cache`
    (its layers' keys/values stay plain tensors: rows can be repeated or compacted as before);
    positions and the attention mask are the own part's, the prefix being visible to every row."""
    for own, pre in zip(own_cache.layers, prefix_cache.layers):
        # weakly: own -> update -> own would be a cycle, kept past the decode until Python's cyclic collector ran
        own.update = functools.partial(_write_padded, weakref.ref(own), pre)
    return own_cache


def _write_padded(own_ref, pre, key_states, value_states, *args, **kwargs):
    own = own_ref()
    keys, values = type(own).update(own, key_states, value_states, *args, **kwargs)
    return SharedKV(pre.keys, keys, padded=True), SharedKV(pre.values, values, padded=True)


def prefix_decode_attention(query, key, value, attention_mask, scaling=None):
    """Rows' queries [B, Hq, T, D] against the shared prefix (every position visible) and their own
    cache under `attention_mask` ([B, 1, T, L] bool, True = attend, over the own part; None = all
    visible): (output [B, T, Hq, D], None). One softmax over [prefix; own], in at least float32.
    The prefix's scores are one matmul for all rows ([Hkv, B*R*T, D] @ [Hkv, D, P]), so its keys
    and values are read once per step instead of once per row. The softmax runs in place on the two
    score blocks (a shared max, exp, one denominator) instead of on their concatenation: in a
    prefill (T ~ 64 own tokens a row) the blocks are ~100 MB a layer, and each copy is a pass."""
    B, Hq, T, D = query.shape
    kp, vp, ko, vo = key.prefix[0], value.prefix[0], key.own, value.own
    Hkv, P, L = kp.shape[0], kp.shape[1], ko.shape[2]
    RT = Hq // Hkv * T
    f = torch.promote_types(query.dtype, torch.float32)
    scale = D ** -0.5 if scaling is None else scaling
    q = (query.to(f) * scale).reshape(B, Hkv, RT, D)  # head h = kv * n_rep + r, the order repeat_kv makes
    s_pre = q.transpose(0, 1).reshape(Hkv, B * RT, D) @ kp.to(f).transpose(-1, -2)  # [Hkv, B*RT, P]
    s_own = q @ ko.to(f).transpose(-1, -2)  # [B, Hkv, RT, L]
    if attention_mask is not None:  # [B, 1, T, L] -> the folded query axis [B, 1, R*T, L]
        m = attention_mask[:, :, None].expand(B, 1, Hq // Hkv, T, L).reshape(B, 1, RT, L)
        s_own.masked_fill_(~m, float("-inf"))  # sdpa_mask (registered in use) builds bool masks
    top = torch.maximum(s_pre.amax(-1).reshape(Hkv, B, RT).transpose(0, 1), s_own.amax(-1))  # finite: the prefix
    s_pre.sub_(top.transpose(0, 1).reshape(Hkv, B * RT, 1)).exp_()
    s_own.sub_(top[..., None]).exp_()
    denom = s_pre.sum(-1).reshape(Hkv, B, RT).transpose(0, 1) + s_own.sum(-1)
    out = ((s_pre @ vp.to(f)).reshape(Hkv, B, RT, D).transpose(0, 1) + s_own @ vo.to(f)) / denom[..., None]
    return out.to(query.dtype).reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None
