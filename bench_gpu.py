"""The GPU check: this repo's own update step and sampler on random-init models of real shapes.

    python bench.py gpu                      # SmolLM2-135M, a 1.7B and a Qwen2.5-7B shape, bf16 (never yet run on a GPU)
    python bench.py gpu --models 7b --json   # one shape, machine-readable
    python bench.py gpu --device cpu --quick # the same code on a tiny shape (what the test suite runs)
    python bench.py gpu --device cpu --dtype fp32 --models 135m --reps 1 --prompt-kv shared   # CPU memory per step

No weights are needed: each model is built from its config with random weights, a LoRA whose B is
non-zero (so pi_theta differs from the base), and one GRPO step's worth of synthetic groups shaped
like the default run's (one ~1000-token prompt, 8 distinct completions, 4 groups of 4). It reports
  - the first step's rho and KL (theta == theta_old there, so they must be exactly 1 and 0),
  - the bf16 kernel error buckets (grad_error_buckets below; bench.py kernel prints them too), on this device,
  - peak memory and step time with and without activation checkpointing,
  - sampling tokens/s for 8 prompts x 8 samples x 128 tokens (sampling.decode).
Exits 2 when CUDA is missing (unless --device cpu).
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import attention
import config
import kernels
import lora
import losses
import model
import sampling
import train

# Real shapes. SmolLM2-1.7B stands in for "a 1.7B": MHA (32 KV heads), tied head, 49k vocab.
SHAPES = {
    "135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)),
    "1.7b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0)),
    "7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)),
}
PROMPT_TOKENS, COMPLETION_TOKENS, DISTINCT, GROUPS, GROUP_SIZE = 1000, 128, 8, 4, 4


# ---- the bf16 kernel error buckets ----

GRAD_BUCKETS = (0.0, 0.9, 0.99, 0.999, 0.9999, 0.99999)  # edges of the target-probability buckets


GRAD_VARIANTS = ("plain", "fused_logprobs", "fused_grpo")


def bucket_inputs(H, V, per_bucket, seed=0):
    """bf16-exact float64 h [n, H], W [V, H], y [n] and p [n] = softmax(h W^T)[y] at those inputs, with
    about per_bucket tokens in each GRAD_BUCKETS bucket: h = noise + a W[y] / |W[y]|, the scale a found
    by bisection for a 1 - p drawn log-uniformly inside the bucket (p is then re-measured after rounding)."""

    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, H, generator=g) * H**-0.5).bfloat16().double()
    edges = torch.tensor(GRAD_BUCKETS, dtype=torch.float64)
    nb = len(GRAD_BUCKETS) - 1
    # 1 - p targets: log-uniform between the bucket's edges (the first bucket: 1 - p in [0.1, 0.99])
    hi_q = (1 - edges[:-1]).clamp(max=0.99).repeat_interleave(per_bucket)
    lo_q = (1 - edges[1:]).repeat_interleave(per_bucket)
    q = torch.exp(torch.log(lo_q) + torch.rand(nb * per_bucket, generator=g, dtype=torch.float64) * (hi_q / lo_q).log())
    y = torch.randint(0, V, (len(q),), generator=g)
    noise = torch.randn(len(q), H, generator=g, dtype=torch.float64)
    u = W[y] / W[y].norm(dim=1, keepdim=True)
    lo, hi = torch.full_like(q, -50.0), torch.full_like(q, 200.0)
    for _ in range(60):  # bisection on a: log p_y(a) rises with a (W[y] is the direction)
        a = (lo + hi) / 2
        logp = torch.log_softmax((noise + a[:, None] * u) @ W.t(), -1).gather(1, y[:, None]).squeeze(1)
        up = logp < torch.log1p(-q)
        lo, hi = torch.where(up, a, lo), torch.where(up, hi, a)
    h = (noise + ((lo + hi) / 2)[:, None] * u).bfloat16().double()
    p = torch.softmax(h @ W.t(), -1).gather(1, y[:, None]).squeeze(1)
    return h, W, y, p


def grad_error_buckets(H=64, V=1000, per_bucket=64, chunk_size=16, device="cpu", dtype="bfloat16", seed=0):
    """Relative error of dh and dW of sum log p in low precision, per bucket of the target's p, for plain
    autograd (low-precision logits, fp32 log_softmax) and both fused kernels, against float64 autograd at
    the same (rounded) inputs. fused_grpo runs a loss whose dloss/dlogp is rho ~ 1 (adv -1, old = logp,
    no KL, nothing clipped) and is compared with float64 autograd of that loss, sum_t exp(logp_t - old_t).
    Returns one dict per bucket: lo, hi, n, and {variant}_dh, {variant}_dw."""

    dt = getattr(torch, dtype)
    h_all, W64, y_all, p_all = bucket_inputs(H, V, per_bucket, seed)
    rows = []
    for lo, hi in zip(GRAD_BUCKETS[:-1], GRAD_BUCKETS[1:]):
        sel = (p_all >= lo) & (p_all < hi)
        n = int(sel.sum())
        if n == 0:
            continue
        y = y_all[sel].to(device)
        logp64 = lambda h, W: torch.log_softmax(h @ W.t(), -1).gather(1, y[:, None]).squeeze(1)
        old = logp64(h_all[sel].to(device), W64.to(device)).float()
        ones = torch.ones(n, device=device)
        variants = {  # variant: (low-precision loss, float64 reference loss)
            "plain": (lambda h, W: torch.log_softmax((h @ W.t()).float(), -1).gather(1, y[:, None]).sum(),
                      lambda h, W: logp64(h, W).sum()),
            "fused_logprobs": (lambda h, W: kernels.fused_logprobs(h, W, y, chunk_size).sum(),
                               lambda h, W: logp64(h, W).sum()),
            "fused_grpo": (lambda h, W: kernels.fused_grpo_loss(h, W, y, old, old, -ones, ones, 0 * ones, beta=0.0,
                                                                eps=0.5, chunk_size=chunk_size)[0],
                           lambda h, W: torch.exp(logp64(h, W) - old.double()).sum()),
        }
        row = {"lo": lo, "hi": hi, "n": n}
        for v, (f, f64) in variants.items():
            d = []
            for fn, t in ((f, dt), (f64, torch.float64)):
                h = h_all[sel].to(device=device, dtype=t, copy=True).requires_grad_()
                W = W64.to(device=device, dtype=t, copy=True).requires_grad_()
                fn(h, W).backward()
                d.append((h.grad.double(), W.grad.double()))
            (dh, dw), (rdh, rdw) = d
            row[f"{v}_dh"] = ((dh - rdh).norm() / rdh.norm()).item()
            row[f"{v}_dw"] = ((dw - rdw).norm() / rdw.norm()).item()
        rows.append(row)
    return rows


def print_grad_errors(rows, H, V, dtype, chunk_size):
    print(f"gradient error vs float64 at the same {dtype} inputs, per bucket of p_target (H={H}, V={V}, chunk "
          f"{chunk_size}); relative error of d(sum log p)/dh and /dW, (x ratio to plain autograd)")
    for r in rows:
        for k in ("dh", "dw"):
            plain = r[f"plain_{k}"]
            cells = "  ".join(f"{v} {100 * r[f'{v}_{k}']:7.3f}%" + ("" if v == "plain" else f" (x{r[f'{v}_{k}'] / plain:5.2f})")
                              for v in GRAD_VARIANTS)
            bucket = f"[{r['lo']:g},{r['hi']:g})"
            print(f"  grad {bucket:<17} {r['n']:4d} {k}  {cells}")


# ---- the GPU step ----

def build(shape, device, dtype, lora_r=16, gqa=True, prompt_kv="repeat"):
    kind, kw = SHAPES[shape]
    cfg = AutoConfig.for_model(kind, max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        mdl = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if gqa and torch.device(device).type == "cuda":
        attention.use(mdl, "gqa")
    attention.use(mdl, prompt_kv)  # train.py's --prompt-kv
    lora.add_lora(mdl, r=lora_r, alpha=2 * lora_r)
    g = torch.Generator(device="cpu").manual_seed(1)
    for m in lora.lora_modules(mdl).values():  # a trained adapter: pi_old != base, as at iteration >= 1
        m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
    return mdl


def step_sequences(vocab, prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS, seed=0):
    """One optimizer step of the default run: GROUPS groups of GROUP_SIZE members of one problem,
    drawn from DISTINCT workflows of 3/4 to the full completion length."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()
    lens = torch.randint(completion_tokens * 3 // 4, completion_tokens + 1, (DISTINCT,), generator=g).tolist()
    comps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    seqs = []
    for k in range(GROUPS):
        members = torch.randperm(DISTINCT, generator=g)[:GROUP_SIZE].tolist()
        adv = torch.linspace(-1.2, 1.2, GROUP_SIZE).tolist()
        seqs += [{"ids": prompt + comps[i], "n_prompt": len(prompt), "adv": a, "score": 0.0} for i, a in zip(members, adv)]
    return seqs


@contextlib.contextmanager
def watched_logratio():
    """A list that collects max |log pi_theta - log pi_old| of every micro-batch the fused GRPO loss
    runs meanwhile: the per-token log-ratio lives inside the kernel, so its per-token terms are
    wrapped (what the test of the first step does too)."""
    seen, terms = [], kernels.grpo_token_terms

    def spy(logp, old_logp, *a):
        seen.append((logp - old_logp).abs().max().item())
        return terms(logp, old_logp, *a)

    kernels.grpo_token_terms = spy
    try:
        yield seen
    finally:
        kernels.grpo_token_terms = terms


def first_step(mdl, seqs, cfg, ckpt):
    """pi_old exactly as train.update scores it, then one step's loss and backward through
    train.backward_step. Returns (the step's metrics, max |log pi_theta - log pi_old| over its tokens)."""
    loss = losses.make(cfg)
    train.score_old_and_ref(mdl, [seqs], loss, cfg, ckpt)
    with watched_logratio() as seen:
        _, metrics = train.backward_step(mdl, seqs, loss, cfg["token_budget"], ckpt)
    return metrics, max(seen)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_cost(mdl, seqs, cfg, ckpt, device, reps):
    """Median wall time and peak memory above the model of one full GRPO step as train.update runs it
    (train.backward_step: preparation, forward and backward; the pi_old pass excluded)."""
    params, loss = lora.lora_parameters(mdl), losses.make(cfg)
    times, peak = [], 0.0
    for r in range(reps + 1):  # the first is a warm-up
        for p in params:
            p.grad = None
        sync(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        train.backward_step(mdl, seqs, loss, cfg["token_budget"], ckpt)
        sync(device)
        if r:
            times.append(time.perf_counter() - t)
        if torch.device(device).type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
    return statistics.median(times), peak


def rss_kb(field, pid="self"):
    """A field of /proc/<pid>/status in kB (VmRSS now, VmHWM the peak since start or the last reset)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_peak_child(spec):
    """In a fresh process: one GRPO step of `shape` on the CPU; prints the peak RSS above what the
    model and inputs already held (MiB). A process of its own, so the peak is this setting's alone."""
    c = json.loads(spec)
    torch.set_num_threads(1)
    mdl = build(c["shape"], "cpu", model.DTYPES[c["dtype"]], prompt_kv=c["prompt_kv"])
    cfg = dict(config.defaults(), seed=0)
    seqs = step_sequences(mdl.config.vocab_size, c["prompt_tokens"], c["completion_tokens"])
    for s in seqs:
        s["old"] = s["ref"] = [0.0] * (len(s["ids"]) - s["n_prompt"])
    loss = losses.make(cfg)
    loss.prepare(seqs)  # its per-token lists exist before the baseline (backward_step redoes them in place)
    gc.collect()
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    train.backward_step(mdl, seqs, loss, cfg["token_budget"], c["ckpt"])
    print(json.dumps({"peak_mib": (rss_kb("VmHWM") - base) / 1024}))


def cpu_step_peak(shape, dtype, ckpt, prompt_tokens, completion_tokens, prompt_kv="repeat"):
    spec = json.dumps(dict(shape=shape, dtype=dtype, ckpt=ckpt, prompt_tokens=prompt_tokens,
                           completion_tokens=completion_tokens, prompt_kv=prompt_kv))
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", "import sys, bench_gpu; bench_gpu._cpu_peak_child(sys.argv[1])", spec],
                       cwd=here, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench gpu: CPU memory child failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"] / 1024


def sampling_speed(mdl, vocab, device, prompts=8, n=8, tokens=128, prompt_tokens=200):
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(prompts)]
    gen = torch.Generator(device=device).manual_seed(0)
    sampling.decode(mdl, ids[:1], n=2, max_new_tokens=4, temperature=1.0, stop=(), gen=gen)  # warm-up
    sync(device)
    t = time.perf_counter()
    out = sampling.decode(mdl, ids, n=n, max_new_tokens=tokens, temperature=1.0, stop=(), gen=gen)
    sync(device)
    return sum(len(tk) for tk, _ in out) / (time.perf_counter() - t)


def run(args):
    """Every check of the module docstring, for each --models shape, printed as one table (or --json)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.py gpu: CUDA is not available on this machine (this check needs a GPU; "
              "`--device cpu --quick` runs the same code on a tiny shape)", file=sys.stderr)
        sys.exit(2)
    dtype = model.DTYPES[args.dtype]
    kv = attention.resolve(args.prompt_kv, device == "cuda")
    shapes = ["tiny"] if args.quick else args.models
    rows = []
    for shape in shapes:
        t0 = time.time()
        mdl = build(shape, device, dtype, gqa=not args.no_gqa, prompt_kv=kv)
        vocab = mdl.config.vocab_size
        p_tok, c_tok = (60, 16) if args.quick else (PROMPT_TOKENS, COMPLETION_TOKENS)
        cfg = dict(config.defaults(), seed=0)
        seqs = step_sequences(vocab, p_tok, c_tok)
        weights_gib = sum(p.numel() * p.element_size() for p in mdl.parameters()) / 2**30
        metrics, dev = first_step(mdl, [dict(s) for s in seqs], cfg, ckpt=train.checkpointing(cfg["checkpoint"], device))
        for s in seqs:
            s["old"] = s["ref"] = [0.0] * (len(s["ids"]) - s["n_prompt"])
        reps = 1 if args.quick else args.reps
        t_off, m_off = step_cost(mdl, seqs, cfg, False, device, reps)
        t_on, m_on = step_cost(mdl, seqs, cfg, True, device, reps)
        if device == "cpu":  # the CPU has no allocator statistics: a fresh process per setting, its RSS peak
            m_off, m_on = (cpu_step_peak(shape, args.dtype, ck, p_tok, c_tok, kv) for ck in (False, True))
        tok_s = sampling_speed(mdl, vocab, device, *((2, 2, 8, 20) if args.quick else ()))
        row = dict(model=shape, dtype=args.dtype, prompt_kv=kv, weights_gib=weights_gib,
                   step_tokens=sum(len(s["ids"]) - s["n_prompt"] for s in seqs) + p_tok,
                   first_step_ratio=metrics["ratio_mean"] / metrics["weight"], first_step_kl=metrics["kl"], max_abs_logratio=dev,
                   step_s_no_ckpt=t_off, step_s_ckpt=t_on, ckpt_time_ratio=t_on / t_off,
                   peak_gib_no_ckpt=weights_gib + m_off, peak_gib_ckpt=weights_gib + m_on,
                   sample_tok_s=tok_s, seconds=time.time() - t0)
        rows.append(row)
        if not args.json:
            print(f"{shape:>5} {args.dtype}: first step rho {row['first_step_ratio']:.6f} (max |log rho| {dev:.1e}), "
                  f"KL {row['first_step_kl']:.1e} | step {t_off:.2f} s, peak {row['peak_gib_no_ckpt']:.2f} GiB -> "
                  f"checkpointed {t_on:.2f} s ({t_on / t_off:.2f}x), {row['peak_gib_ckpt']:.2f} GiB | "
                  f"sampling {tok_s:.0f} tok/s | {row['seconds']:.0f} s", flush=True)
        del mdl
        if device == "cuda":
            torch.cuda.empty_cache()
    errors = grad_error_buckets(per_bucket=8 if args.quick else 64, device=device)
    worst = {v: max(r[f"{v}_{k}"] / r[f"plain_{k}"] for r in errors for k in ("dh", "dw"))
             for v in ("fused_logprobs", "fused_grpo")} if errors else {}
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows,
                          "kernel_errors": errors, "kernel_error_vs_plain_max": worst}, indent=1))
    elif errors:
        print("bf16 kernel gradient error vs float64 (H=64, V=1000), relative error of dh, per bucket of p_target:")
        for r in errors:
            print(f"  [{r['lo']:g}, {r['hi']:g}) n={r['n']:3d}: plain {100 * r['plain_dh']:.2f} %, fused_logprobs "
                  f"{100 * r['fused_logprobs_dh']:.2f} %, fused_grpo {100 * r['fused_grpo_dh']:.2f} %")
        print("  worst kernel/plain ratio over buckets, dh and dW (target <= 2): " +
              ", ".join(f"{v} {x:.2f}" for v, x in worst.items()))
    return rows


def parser(sub, fn=run):
    p = sub.add_parser("gpu", help="update step, memory, checkpointing and sampling on real-shaped random models",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=tuple(model.DTYPES), default="bf16")
    p.add_argument("--models", nargs="+", choices=[s for s in SHAPES if s != "tiny"], default=["135m", "1.7b", "7b"])
    p.add_argument("--reps", type=int, default=3, help="timed steps per setting (median)")
    p.add_argument("--no-gqa", action="store_true", help="transformers' SDPA (repeat_kv) instead of attention.gqa_attention")
    p.add_argument("--prompt-kv", choices=("auto", "shared", "repeat"), default=config.KNOBS["prompt_kv"][0],
                   help="the update's prompt keys/values held once or repeated per row (train.py's --prompt-kv)")
    p.add_argument("--quick", action="store_true", help="one tiny shape (tests)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=fn)
