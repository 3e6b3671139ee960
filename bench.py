"""Speed and memory benchmarks. Ratios against a baseline measured in the same run.

    python bench.py kernel [--device cpu|cuda] [--json] [--shape H V N] [--dtype bfloat16] [--reps 2 --stat min]
    python bench.py sandbox [--n 200] [--n-import 20] [--workers 2]
    python bench.py executor [--concurrency 1 8]
    python bench.py gpu [--models 135m 1.7b 7b] [--json]   # needs CUDA; see bench_gpu.py
    python bench.py loop [--problems 2 --m 8] [--quick] [--json]   # a row per phase of the loop; bench_loop.py
    python bench.py decode [--problems 4 --n 8] [--reps 3] [--quick] [--json]   # the local decode; bench_decode.py
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import bench_decode
import bench_gpu
import bench_loop
import executor
import kernels
import losses
import operators
import sandbox

# ---- kernel benchmark ----
# Fused log-prob kernel (kernels.py, ARCHITECTURE §8) vs the naive LM-head paths. Each variant computes the same
# GRPO loss from hidden states h [N, H] and the LM head W [V, H] and backpropagates it:
#   naive           logits = h W^T, log_softmax, gather, losses.grpo_loss
#   rowloop         full logits, then log-sum-exp row by row in a Python loop, losses.grpo_loss
#   fused_logprobs  kernels.fused_logprobs + losses.grpo_loss on the N-vector
#   fused_grpo      kernels.fused_grpo_loss (gradient formed in the forward chunk loop)
# CPU: every (variant, rep) runs in a fresh subprocess, so its peak RSS is its own; peak = high-water
# mark during fwd+bwd minus the RSS once inputs are built; CPU time is reported next to wall time (on a
# shared machine wall time includes waiting for a core). CUDA: in process, peak = max_memory_allocated
# minus the allocation after inputs. Variants alternate within each rep; --stat min takes the best rep.
KERNEL_VARIANTS = ("naive", "rowloop", "fused_logprobs", "fused_grpo")
KERNEL_SHAPES = ((576, 49152), (896, 151936))  # (H, V): SmolLM2-135M head, Qwen2.5-0.5B head
KERNEL_NS = (1024, 4096)
QUICK_SHAPES, QUICK_NS = ((32, 1000),), (64,)


def _kernel_inputs(N, H, V, device, dtype, train_head, n_seq=8):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    W = torch.randn(V, H, generator=g).mul_(H**-0.5).to(device=device, dtype=dtype).requires_grad_(train_head)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    seg = (torch.arange(N) * n_seq // N).to(device)  # n_seq equal-length sequences
    adv = torch.linspace(-1.5, 1.5, n_seq).to(device)
    # logits ~ N(0, 1): log p ~ -log V - 0.5; jitter so some ratios leave the clip range
    old = (-torch.log(torch.tensor(float(V))) - 0.5 + 0.5 * torch.randn(N, generator=g)).to(device)
    ref = (old + 0.2 * torch.randn(N, generator=g).to(device))
    return h, W, y, seg, adv, old, ref


def _kernel_loss(variant, inp, chunk_size):
    h, W, y, seg, adv, old, ref = inp
    if variant == "naive":
        logp = torch.log_softmax((h @ W.t()).float(), -1).gather(1, y[:, None]).squeeze(1)
    elif variant == "rowloop":
        rows = (h @ W.t()).float().unbind(0)  # unbind: one backward for all rows (select would zero-fill N x V per row)
        logp = torch.stack([r[t] - torch.logsumexp(r, 0) for r, t in zip(rows, y.tolist())])
    elif variant == "fused_logprobs":
        logp = kernels.fused_logprobs(h, W, y, chunk_size)
    elif variant == "fused_grpo":
        tw, km = losses.token_weights(seg, len(adv), "token"), losses.kl_token_mask(adv, seg, "masked")
        return kernels.fused_grpo_loss(h, W, y, old, ref, adv[seg], tw, km, chunk_size=chunk_size)[0]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return losses.grpo_loss(logp, old, ref, adv, seg)[0]


def _kernel_child(case_json):
    """One CPU measurement in this fresh process; prints {"time_s", "cpu_s", "peak_mb"} as JSON. cpu_s
    (all threads' CPU time) does not count time spent waiting for a core on a machine shared with other jobs."""
    case = json.loads(case_json)
    dtype = getattr(torch, case["dtype"])
    inp = _kernel_inputs(case["N"], case["H"], case["V"], "cpu", dtype, case["train_head"])
    h, W, y, seg, adv, old, ref = inp  # warm-up on 8 tokens: loads the kernels, touches no big pages
    _kernel_loss(case["variant"], (h[:8].detach().requires_grad_(), W, y[:8], seg[:8], adv, old[:8], ref[:8]),
                 case["chunk_size"]).backward()
    inp[0].grad = inp[1].grad = None
    gc.collect()
    base = bench_gpu.rss_kb("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0, c0 = time.perf_counter(), time.process_time()
    _kernel_loss(case["variant"], inp, case["chunk_size"]).backward()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    hwm = bench_gpu.rss_kb("VmHWM")
    print(json.dumps({"time_s": dt, "cpu_s": cpu, "peak_mb": (hwm - base) / 1024}))


def _kernel_cpu(case):
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import sys, bench; bench._kernel_child(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(case)], cwd=here, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench kernel child {case['variant']} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _kernel_cuda(case, inp):
    for x in inp[:2]:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    _kernel_loss(case["variant"], inp, case["chunk_size"]).backward()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    inp[0].grad = inp[1].grad = None
    return {"time_s": dt, "cpu_s": None, "peak_mb": peak / 2**20}


def _kernel_rows(args, dtype):
    """Time and peak memory of every variant at every shape, as ratios to naive from the same run."""
    if not args.json:
        print(f"  {'H':>4} {'V':>6} {'N':>5}  {'variant':<15}{'time':>11} {'peak':>13}   vs naive (cpu: CPU time)   chunk")
    shapes, ns = (QUICK_SHAPES, QUICK_NS) if args.quick else (KERNEL_SHAPES, KERNEL_NS)
    if args.shape:
        shapes, ns = (tuple(args.shape[:2]),), (args.shape[2],)
    variants = ("naive",) + tuple(v for v in KERNEL_VARIANTS if v != "naive" and v in (args.variants or KERNEL_VARIANTS))
    stat = min if args.stat == "min" else statistics.median
    rows = []
    for H, V in shapes:
        for N in ns:
            chunk = args.chunk_size or kernels.auto_chunk(V, args.device, dtype)
            base = {"N": N, "H": H, "V": V, "dtype": dtype, "chunk_size": chunk, "train_head": args.train_head}
            inp = None
            if args.device == "cuda":
                inp = _kernel_inputs(N, H, V, "cuda", getattr(torch, dtype), args.train_head)
                for v in variants:  # warm-up
                    _kernel_cuda({**base, "variant": v}, inp)
            runs = {v: [] for v in variants}
            for _ in range(args.reps):
                for v in variants:  # alternate, so load drift hits all variants alike
                    case = {**base, "variant": v}
                    runs[v].append(_kernel_cuda(case, inp) if inp is not None else _kernel_cpu(case))
            inp_cuda, inp = inp is not None, None
            naive = None
            for v in variants:
                t, m = stat(r["time_s"] for r in runs[v]), stat(r["peak_mb"] for r in runs[v])
                cpu = None if inp_cuda else stat(r["cpu_s"] for r in runs[v])
                naive = naive or (t, m, cpu)
                rows.append({**base, "variant": v, "time_s": t, "peak_mb": m, "cpu_s": cpu, "reps": args.reps, "stat": args.stat,
                             "time_vs_naive": t / naive[0], "mem_vs_naive": m / max(naive[1], 1e-9),
                             "cpu_vs_naive": None if inp_cuda else cpu / naive[2]})
                if not args.json:
                    print(f"  {H:>4} {V:>6} {N:>5}  {v:<15}{t:9.3f} s {m:10.1f} MB   x{t / naive[0]:5.2f} time  "
                          f"x{m / max(naive[1], 1e-9):6.3f} mem" + ("" if inp_cuda else f"  x{cpu / naive[2]:5.2f} cpu")
                          + (f"  {chunk:5d}" if v.startswith("fused") else ""), flush=True)
    return rows


def frozen_dh_errors(H, V, per_bucket, chunk_size, device="cpu", seed=0):
    """Relative bf16 error of fused_logprobs' dh with the LM head frozen (the LoRA case), per bucket of the
    target's p, against float64 autograd at the same inputs as bench_gpu.grad_error_buckets. That table
    trains the head, which takes the kernel's other backward (logits recomputed); this one checks the
    frozen-head path, whose dlogp/dh is formed in the forward. Returns [{lo, hi, n, frozen_dh}]."""
    h_all, W64, y_all, p_all = bench_gpu.bucket_inputs(H, V, per_bucket, seed)
    W64 = W64.to(device)
    rows = []
    for lo, hi in zip(bench_gpu.GRAD_BUCKETS[:-1], bench_gpu.GRAD_BUCKETS[1:]):
        sel = (p_all >= lo) & (p_all < hi)
        if not sel.any():
            continue
        y = y_all[sel].to(device)
        h = h_all[sel].to(device=device, dtype=torch.bfloat16).requires_grad_()
        kernels.fused_logprobs(h, W64.bfloat16(), y, chunk_size).sum().backward()
        h64 = h_all[sel].to(device).requires_grad_()
        torch.log_softmax(h64 @ W64.t(), -1).gather(1, y[:, None]).sum().backward()
        err = ((h.grad.double() - h64.grad).norm() / h64.grad.norm()).item()
        rows.append({"lo": lo, "hi": hi, "n": int(sel.sum()), "frozen_dh": err})
    return rows


def _print_kernel_targets(rows, errs, frozen):
    """The README targets: memory and time at N = 4096, V = 151936; time with the head frozen at V = 151936;
    bf16 gradient error of every kernel path within 2x plain bf16 autograd in every bucket."""
    for r in rows:
        if r["variant"] in ("fused_logprobs", "fused_grpo") and (r["N"], r["V"]) == (4096, 151936):
            tmax = 1.3 if r["variant"] == "fused_logprobs" else 1.1
            ok = r["mem_vs_naive"] <= 1 / 8 and r["time_vs_naive"] <= tmax
            print(f"target {r['variant']}: mem <= 1/8 naive, time <= {tmax}x naive: {'PASS' if ok else 'FAIL'}")
        if r["variant"] == "fused_logprobs" and r["V"] == 151936 and not r["train_head"]:
            ok, cpu = r["time_vs_naive"] <= 1.0, "" if r["cpu_vs_naive"] is None else f", CPU time x{r['cpu_vs_naive']:.2f}"
            print(f"target fused_logprobs, head frozen, N={r['N']}: time <= 1.0x naive: {'PASS' if ok else 'FAIL'} "
                  f"(x{r['time_vs_naive']:.2f}{cpu})")
    for r, f in zip(errs, frozen):
        bucket = f"[{r['lo']:g},{r['hi']:g})"
        print(f"  frozen-head {bucket:<17} {f['n']:4d} dh  "
              f"fused_logprobs {100 * f['frozen_dh']:7.3f}% (x{f['frozen_dh'] / r['plain_dh']:5.2f})")
    ok = all(r[f"{v}_{k}"] <= 2 * r[f"plain_{k}"] for r in errs for v in bench_gpu.GRAD_VARIANTS[1:] for k in ("dh", "dw"))
    ok = ok and all(f["frozen_dh"] <= 2 * r["plain_dh"] for r, f in zip(errs, frozen))
    print(f"target: bf16 gradient error <= 2x plain autograd in every bucket: {'PASS' if ok else 'FAIL'}")


def bench_kernel(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py kernel: --device cuda but CUDA is not available", file=sys.stderr)
        sys.exit(2)
    if args.shape and min(args.shape) < 1:
        print(f"bench.py kernel: --shape H V N must be >= 1, got {args.shape}", file=sys.stderr)
        sys.exit(2)
    if args.reps < 1 or args.chunk_size < 0 or args.grad_per_bucket < 1 or min(args.grad_shape) < 2:
        print(f"bench.py kernel: --reps and --grad-per-bucket must be >= 1, --chunk-size >= 0, --grad-shape H V >= 2; "
              f"got {args.reps}, {args.grad_per_bucket}, {args.chunk_size}, {args.grad_shape}", file=sys.stderr)
        sys.exit(2)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"kernel bench: {args.device} {dtype}, chunk {args.chunk_size or 'auto'}, LM head {'trainable' if args.train_head else 'frozen'}, "
          f"{args.stat} of {args.reps}; fwd+bwd of the GRPO loss; peak = memory above the inputs", file=sys.stderr if args.json else sys.stdout)
    rows = _kernel_rows(args, dtype)
    H, V = args.grad_shape
    grad_chunk = args.chunk_size or 16  # small by default, so each bucket spans several chunks
    errs = bench_gpu.grad_error_buckets(H, V, args.grad_per_bucket, grad_chunk, args.device)
    frozen = frozen_dh_errors(H, V, args.grad_per_bucket, grad_chunk, args.device)
    if args.json:
        print(json.dumps({"device": args.device, "rows": rows, "grad_errors": errs, "frozen_head_grad_errors": frozen}, indent=1))
        return
    bench_gpu.print_grad_errors(errs, H, V, "bfloat16", grad_chunk)
    _print_kernel_targets(rows, errs, frozen)


def kernel_parser(sub):
    p = sub.add_parser("kernel", help="fused log-prob kernel vs naive log_softmax and a per-row loop",
                       description="python bench.py kernel [--device cpu|cuda] [--json] [--reps 3] [--quick | --shape H V N]")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions, each variant in a fresh process on cpu")
    p.add_argument("--stat", choices=("median", "min"), default="median", help="of the repetitions' time and peak")
    p.add_argument("--variants", nargs="+", choices=KERNEL_VARIANTS, help="only these (naive, the baseline, always runs)")
    p.add_argument("--chunk-size", type=int, default=0, help="tokens per chunk of the fused kernels (0: kernels.auto_chunk)")
    p.add_argument("--grad-shape", type=int, nargs=2, default=(64, 1000), metavar=("H", "V"),
                   help="LM head of the bf16 gradient-error table")
    p.add_argument("--grad-per-bucket", type=int, default=64, help="tokens per p bucket of the gradient-error table")
    p.add_argument("--train-head", action="store_true", help="LM head trainable (default: frozen, the LoRA case)")
    p.add_argument("--quick", action="store_true", help="one tiny shape, for smoke tests")
    p.add_argument("--shape", type=int, nargs=3, metavar=("H", "V", "N"), help="bench this one shape instead")
    p.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    p.set_defaults(fn=bench_kernel)


# ---- sandbox benchmark ----


class _InstantExecutor:
    """Answers at once, so the trivial-workflow figure is the sandbox + broker cost alone."""

    def chat(self, messages, temperature=0.0, max_tokens=512, sample_index=0):
        return "Answer: 4", {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.0}


SCI_PROGRAM = ("import numpy, resource, sympy\nx = sympy.Symbol('x')\n"
               "print(sympy.solve(x**2 - 5*x + 6, x), numpy.arange(10).sum())\n"
               "u = resource.getrusage(resource.RUSAGE_SELF)\n"
               "print(u.ru_maxrss, open('/proc/self/status').read().split('VmPeak:')[1].split()[0], u.ru_utime + u.ru_stime)\n")


def _bare_program(py, code, path):
    """`code` in a bare `python -I -S` with `path` on sys.path: no sandbox, the floor of a run."""

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    t = time.perf_counter()
    # ends like the sandbox runtime does, with os._exit: interpreter teardown after sympy costs more
    # than the whole sandbox
    code = f"import sys; sys.path += {path!r}\n{code}\nsys.stdout.flush(); sys.stderr.flush(); __import__('os')._exit(0)\n"
    # a session of its own, like the sandbox child: with autogroup scheduling a new session gets its
    # own CPU share, which on a machine shared with other jobs is worth more than the sandbox costs
    p = subprocess.run([py, "-I", "-S", "-c", code], env=env, capture_output=True, text=True, start_new_session=True)
    return dict(ok=p.returncode == 0, stdout=p.stdout, stderr=p.stderr, seconds=time.perf_counter() - t)


def _program_block(sandbox, job, n, workers, site):
    """`n` runs of `job` (a run_many job) through the pool, with the importable packages exposed
    (site=True, the default) or not (as before they existed)."""
    saved = sandbox._SITE
    if not site:
        sandbox._SITE = (None, [])
    try:
        res = [r for _, r in sandbox.run_many([job] * n, workers=workers)]
    finally:
        sandbox._SITE = saved
    bad = [r for r in res if not r["ok"]]
    assert not bad, bad[:1]
    return res


def bench_sandbox(args):
    """Per-run cost of the sandbox through the pool, against a bare `python -I -S -c pass` spawn
    measured in the same run (the floor any subprocess sandbox pays). Programs: a plain one with
    the importable packages mounted (after) and without (before), and one that imports numpy and
    sympy, against the same import in a bare, unsandboxed `python -I -S`."""
    if args.n < 1 or args.n_import < 1 or args.rounds < 1:
        print("bench.py sandbox: --n, --n-import and --rounds must be >= 1", file=sys.stderr)
        sys.exit(2)
    iso = sandbox.isolation()
    py = sandbox._MODE[2]
    bare = []
    for _ in range(min(args.n, 50)):
        t = time.perf_counter()
        subprocess.run([py, "-I", "-S", "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
    rows = _workflow_rows(args)
    runs = _program_runs(args, py)
    for k, res in runs.items():
        rows[k] = _latency([r["seconds"] for r in res], len(res), args.workers)
    sci, ref = (runs[k][0]["stdout"].splitlines() for k in ("program_numpy_sympy", "bare_numpy_sympy"))
    assert sci[0] == ref[0], (sci, ref)  # the sandbox computes what the bare interpreter does
    mem, mem_bare = ([float(v) for v in lines[-1].split()] for lines in (sci, ref))
    cpu, cpu_bare = (statistics.median(float(r["stdout"].split()[-1]) for r in runs[k]) for k in ("program_numpy_sympy", "bare_numpy_sympy"))
    bare_ms, floor_ms = 1e3 * statistics.median(bare), rows["bare_numpy_sympy"]["median_run_ms"]
    out = dict(isolation=iso, python=py, bare_spawn_median_ms=bare_ms, **rows,
               numpy_sympy_maxrss_mb=mem[0] / 1024, numpy_sympy_vmpeak_mb=mem[1] / 1024,
               bare_numpy_sympy_maxrss_mb=mem_bare[0] / 1024, bare_numpy_sympy_vmpeak_mb=mem_bare[1] / 1024,
               numpy_sympy_cpu_ms=1e3 * cpu, bare_numpy_sympy_cpu_ms=1e3 * cpu_bare,
               noop_vs_bare_spawn=rows["noop"]["median_run_ms"] / bare_ms,
               plain_with_vs_without_packages=rows["program_plain"]["median_run_ms"] / rows["program_plain_no_packages"]["median_run_ms"],
               numpy_sympy_vs_bare=rows["program_numpy_sympy"]["median_run_ms"] / floor_ms)
    if args.json:
        print(json.dumps(out))
        return
    _print_sandbox(out, rows)


def _latency(seconds, runs, workers):
    return dict(runs=runs, workers=workers, median_run_ms=1e3 * statistics.median(seconds),
                p90_run_ms=1e3 * sorted(seconds)[int(0.9 * len(seconds))])


def _workflow_rows(args):
    """A workflow that calls nothing, and one with three operator calls answered at once."""
    rows = {}
    noop = "def solve(problem):\n    return problem\n"
    trivial = "def solve(problem):\n    a = custom(problem, 'x')\n    b = answer_generate(problem)\n    return format(problem, a + b)\n"
    for name, code, ex in (("noop", noop, None), ("trivial_3_ops", trivial, _InstantExecutor())):
        jobs = [operators.job(code, "2 + 2", executor=ex, timeout=10) for _ in range(args.n)]
        t = time.perf_counter()
        res = [r for _, r in sandbox.run_many(jobs, workers=args.workers)]
        wall = time.perf_counter() - t
        bad = [r for r in res if r["error"] is not None]
        assert not bad, bad[:1]
        rows[name] = dict(**_latency([r["seconds"] for r in res], args.n, args.workers), wall_s=wall,
                          runs_per_s=args.n / wall)
    return rows


def _program_runs(args, py):
    """{variant: results} of the program variants. They alternate block by block, so load drift
    hits them alike; the bare import uses the child's interpreter and the parent's package dirs,
    at the same concurrency."""
    path = sorted({os.path.dirname(d) for _, d in sandbox._SITE[1]})
    plain = dict(program="print(6 * 7)", timeout=60)
    progs = {"program_plain_no_packages": (plain, args.n, False), "program_plain": (plain, args.n, True),
             "program_numpy_sympy": (dict(program=SCI_PROGRAM, timeout=60), args.n_import, True),
             "bare_numpy_sympy": (lambda: _bare_program(py, SCI_PROGRAM, path), args.n_import, True)}
    runs = {k: [] for k in progs}
    for _ in range(args.rounds):
        for k, (job, n, site) in progs.items():
            runs[k] += _program_block(sandbox, job, max(1, n // args.rounds), args.workers, site)
    return runs


def _print_sandbox(out, rows):
    print(f"isolation: {out['isolation']}\nchild python: {out['python']}")
    print(f"bare `python -I -S -c pass` spawn: median {out['bare_spawn_median_ms']:.1f} ms")
    w = max(map(len, rows))
    for name, r in rows.items():
        extra = f", {r['runs_per_s']:.1f} runs/s, wall {r['wall_s']:.2f} s" if "wall_s" in r else ""
        print(f"{name:{w}s} {r['runs']} runs, {r['workers']} workers: median {r['median_run_ms']:.1f} ms/run "
              f"(p90 {r['p90_run_ms']:.1f}){extra}")
    print(f"numpy + sympy in the sandbox: max RSS {out['numpy_sympy_maxrss_mb']:.0f} MB, "
          f"peak address space {out['numpy_sympy_vmpeak_mb']:.0f} MB (programmer's cap: 256 MB); bare: "
          f"{out['bare_numpy_sympy_maxrss_mb']:.0f} MB, {out['bare_numpy_sympy_vmpeak_mb']:.0f} MB")
    print(f"numpy + sympy program's own CPU time (median): {out['numpy_sympy_cpu_ms']:.0f} ms in the sandbox, "
          f"{out['bare_numpy_sympy_cpu_ms']:.0f} ms bare")
    print(f"noop / bare spawn: {out['noop_vs_bare_spawn']:.2f}x   (target: noop median <= 80 ms)")
    print(f"plain program, packages mounted / not: {out['plain_with_vs_without_packages']:.2f}x")
    print(f"numpy + sympy program, sandbox / bare (no sandbox): {out['numpy_sympy_vs_bare']:.2f}x")


def sandbox_parser(sub):
    p = sub.add_parser("sandbox", help="sandbox per-run overhead and throughput through the pool",
                       description="python bench.py sandbox [--n 200] [--n-import 20] [--workers 2] [--json]")
    p.add_argument("--n", type=int, default=200, help="workflows / plain programs per measurement")
    p.add_argument("--n-import", type=int, default=20, help="numpy + sympy programs (and bare imports)")
    p.add_argument("--rounds", type=int, default=4, help="alternating blocks of the program variants")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=bench_sandbox)


def bench_executor(args):
    """Tokens/s of the local executor (serve.py) at several concurrency levels: this
    sizes how many sandboxes a collection run can keep busy."""
    with executor.local_executor(args.model, servers=args.servers, threads=args.threads) as ex:
        def one(i):
            t = time.perf_counter()
            _, u = ex.chat([{"role": "user", "content": f"Count from {i} to {i + 60}."}],
                           max_tokens=args.max_tokens, sample_index=i)
            return time.perf_counter() - t, u["completion_tokens"]
        one(-1)  # warm-up
        rows = []
        for c in args.concurrency:
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                res = list(pool.map(one, range(c)))
            wall = time.perf_counter() - t
            toks = sum(r[1] for r in res)
            rows.append(dict(concurrency=c, tokens=toks, wall_s=wall, tokens_per_s=toks / wall,
                             mean_latency_s=sum(r[0] for r in res) / c))
    for r in rows:
        print(json.dumps(r) if args.json else
              f"concurrency {r['concurrency']:3d}: {r['tokens']:5d} tokens in {r['wall_s']:6.1f} s = "
              f"{r['tokens_per_s']:6.1f} tok/s, mean latency {r['mean_latency_s']:.1f} s")
    if not args.json and len(rows) > 1:
        print(f"throughput x{rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} at concurrency "
              f"{rows[-1]['concurrency']} vs {rows[0]['concurrency']}")


def executor_parser(sub):
    p = sub.add_parser("executor", help="local executor (serve.py): tokens/s vs concurrency",
                       description="python bench.py executor [--concurrency 1 8] [--max-tokens 64]")
    p.add_argument("--model", default=executor.DEFAULT_MODEL)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    p.add_argument("--servers", type=int, default=1, help="server processes behind one Executor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=bench_executor)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for register in (sandbox_parser, executor_parser, kernel_parser, bench_gpu.parser, bench_loop.parser, bench_decode.parser):
        register(sub)
    args = ap.parse_args()
    args.fn(args)
