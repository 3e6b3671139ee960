"""Model FLOPs per phase of `python bench.py loop`, counted from a model's shape and the token ids run.

    python -m pytest -q tests/test_flops.py     # the formulas against a hand count and torch's FLOP counter
    python -c "import flops; print(flops.decode_layout([[1, 2, 3, 4], [1, 2, 5]], [[7, 8, 9], [7], [8, 8], []], 2))"
                                                # (8, 28, 6, 6): positions, query-key pairs, head rows, tokens

In code:  s = flops.shape_of(mdl);  flops.forward_flops(s, *flops.train_layout(mb))

Pure counts, no timing and no model call: bench_loop.py times each phase and divides.

FLOPs are model FLOPs (Chowdhery et al. 2022, PaLM, App. B): no activation-checkpointing recompute,
no padded positions, no rows decoding on after they stopped, no masked static-KV-cache slots. Per
token position, with N_lin the weights of the decoder's nn.Linear modules (GQA's narrow k/v as they
are), N_lora LoRA's A and B, L layers, d_attn = n_heads * head_dim, H V the LM head:
  forward    2 (N_lin + N_lora) [Kaplan et al. 2020, Table 1: 2N] + 4 L d_attn per query-key pair [QK^T
             and the sum over V, 2 d_attn each, as Hoffmann et al. 2022, App. F; Kaplan lists the QK^T
             half]; causal: a token with c before it has c + 1 pairs; + 2 H V where logits are computed
  backward   the frozen base forms activation gradients only, dX = dY W^T: 2 N_lin (the full backward
             is 2x forward: Kaplan §2.1); LoRA both: 4 N_lora; attention dP, dV, dQ, dK: 2x its
             forward; frozen head dh = g W: 2 H V per row. So fwd+bwd ~ 2x forward under LoRA, not 3x
             (the first layer's q/k/v inputs need no gradient either: that slack is left in)
Per phase: decode (sample_flops) = per sampling.sample batch (batch_size // n prompts) the common
prefix once, each suffix once, T - 1 fed positions per row of T tokens, the head at the prefix's,
each prompt's last and each fed position; executor (call_flops) = the same per call alone from its
usage and the executor model's shape (a prompt counts in full even when serve.py batches calls
sharing a prefix); pi_old = forward of seq_logprobs' micro-batches (train.micro_batches) as
train.forward_hidden runs them (train_layout): each distinct prompt once, each distinct completion
once after it, the head on every row's completion tokens; update = forward + backward of
step_loss's micro-batches; evaluation = its decode (n = 1) + its executor calls.
"""
import inspect

import torch.nn as nn

import sampling


def shape_of(mdl):
    """{linear, lora, head, layers, d_attn}: weights of the decoder's nn.Linear modules (LoRA's apart),
    the LM head's H * V, the layer count and n_heads * head_dim."""
    lins = [(".lora_" in f".{name}", m.weight.numel()) for name, m in mdl.get_decoder().named_modules()
            if isinstance(m, nn.Linear)]
    lin, lo, c = sum(k for is_lora, k in lins if not is_lora), sum(k for is_lora, k in lins if is_lora), mdl.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"linear": lin, "lora": lo, "head": mdl.get_output_embeddings().weight.numel(),
            "layers": c.num_hidden_layers, "d_attn": c.num_attention_heads * head_dim}


def pairs(before, n):
    """Query-key pairs of n causal positions after `before` earlier ones: sum_{t=1..n} (before + t)."""
    return n * before + n * (n + 1) // 2


def forward_flops(s, tokens, qk, head_rows):
    """Forward FLOPs of `tokens` positions, `qk` query-key pairs and the head on `head_rows` rows, shape s."""
    return 2 * (s["linear"] + s["lora"]) * tokens + 4 * s["layers"] * s["d_attn"] * qk + 2 * s["head"] * head_rows


def backward_flops(s, tokens, qk, head_rows):
    """Backward FLOPs of the same under LoRA: activation gradients through the frozen base and head."""
    return 2 * (s["linear"] + 2 * s["lora"]) * tokens + 8 * s["layers"] * s["d_attn"] * qk + 2 * s["head"] * head_rows


def train_layout(mb):
    """(positions, query-key pairs, head rows) of one micro-batch as train.forward_hidden runs it."""
    by = {}
    for s in mb:
        by.setdefault(tuple(s["ids"][:s["n_prompt"]]), set()).add(tuple(s["ids"][s["n_prompt"]:]))
    tokens = qk = 0
    for p, comps in by.items():
        tokens += len(p) + sum(map(len, comps))
        qk += pairs(0, len(p)) + sum(pairs(len(p), len(c)) for c in comps)
    return tokens, qk, sum(len(s["ids"]) - s["n_prompt"] for s in mb)


def decode_layout(prompts, rows, n):
    """(positions, pairs, head rows, generated tokens) of one sampling.decode call: `prompts` token-id
    lists, `rows` the n completions of each in order (the common prefix leaves each prompt a token)."""
    P = 0
    while P < min(map(len, prompts)) - 1 and all(p[P] == prompts[0][P] for p in prompts):
        P += 1
    tokens, qk = P + sum(len(p) - P for p in prompts), pairs(0, P) + sum(pairs(P, len(p) - P) for p in prompts)
    fed = [max(len(r) - 1, 0) for r in rows]
    tokens += sum(fed)
    qk += sum(pairs(len(prompts[i // n]), f) for i, f in enumerate(fed))
    return tokens, qk, (P > 0) + len(prompts) + sum(fed), sum(map(len, rows))


def sample_flops(s, calls):
    """(FLOPs, generated tokens, prompt positions) of sample() calls [(n, out)]; guides are not sampled."""
    batch = inspect.signature(sampling.sample).parameters["batch_size"].default
    fl = gen = pos = 0
    for n, out in calls:
        per = max(1, batch // n)
        for b in range(0, len(out), per):
            rows = [x["token_ids"] for xs in out[b:b + per] for x in xs if not x.get("guide")]
            t, qk, head, g = decode_layout([x[0]["prompt_ids"] for x in out[b:b + per]], rows, n)
            fl, gen, pos = fl + forward_flops(s, t, qk, head), gen + g, pos + t - sum(max(len(r) - 1, 0) for r in rows)
    return fl, gen, pos


def call_flops(s, calls):
    """FLOPs of executor calls [(t0, t1, usage)], each decoded alone (0 without an executor shape)."""
    return sum(forward_flops(s, *decode_layout([[0] * max(1, u["prompt_tokens"])], [[0] * u["completion_tokens"]], 1)[:3])
               for *_, u in calls) if s else 0
