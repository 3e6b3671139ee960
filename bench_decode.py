"""The local generator's decode at collect's shape, the prefix copied per row or held once
(ARCHITECTURE §10).

    python bench.py decode                      # 4 arith prompts x 8 samples, 3 reps, the embedded generator
    python bench.py decode --quick --reps 1     # a tiny random model: the test

The local generator's sampling at collect's shape (sampling.sample: P arith problems' generator
prompts x n samples, temperature 0.8, top-p 0.95, up to 128 new tokens), three ways:
  copied_full_sort  the shared prefix's K/V copied into every row's cache; top-p sorts the whole
                    vocabulary per step (sampling.top_p_sorted, the sampler before a787d33): the baseline
  copied            the same cache; top-p looks at each row's top 256 first (sampling._top_p)
  held_once         --prompt-kv shared: the prefix held once (attention.shared_prefix_decode_cache)
Every (rep, variant) runs in a fresh process, variants in turn within a rep (drift hits them
alike), at the same thread count; peak = VmHWM of the child, model included. The samples of
every variant must be the same tokens.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import attention
import bench_gpu
import bench_loop
import benchmarks
import model
import sampling
import workflow

DECODE_VARIANTS = {"copied_full_sort": ("repeat", False), "copied": ("repeat", True), "held_once": ("shared", True)}


def _decode_child(case_json):
    """One decode in this fresh process; prints {"time_s", "cpu_s", "peak_mb", "tokens", "ids"} as JSON."""
    c = json.loads(case_json)
    torch.set_num_threads(c["threads"])
    mdl, tok = bench_loop.quick_models() if c["quick"] else model.load_model(model.DEFAULT_MODEL)
    prompt_kv, top_k_first = DECODE_VARIANTS[c["variant"]]
    attention.use(mdl, prompt_kv)
    if not top_k_first:
        sampling._top_p = sampling.top_p_sorted
    problems = benchmarks.load("arith", "test", None, limit=c["problems"], seed=0)
    msgs = [workflow.build_prompt(p["problem"], "math") for p in problems]
    t0, c0 = time.perf_counter(), time.process_time()
    out = sampling.sample(mdl, tok, msgs, n=c["n"], max_new_tokens=c["max_new_tokens"], temperature=0.8,
                          top_p=0.95, seed=3, prefill=workflow.PREFILLS["math"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    ids = [s["token_ids"] for per in out for s in per]
    print(json.dumps({"time_s": dt, "cpu_s": cpu, "peak_mb": bench_gpu.rss_kb("VmHWM") / 1024,
                      "tokens": sum(map(len, ids)), "ids": ids}))


def run(args):
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import sys, bench_decode; bench_decode._decode_child(sys.argv[1])"
    runs = {v: [] for v in DECODE_VARIANTS}
    for _ in range(args.reps):
        for v in DECODE_VARIANTS:
            case = dict(variant=v, quick=args.quick, threads=args.threads, problems=args.problems, n=args.n,
                        max_new_tokens=args.max_new_tokens)
            r = subprocess.run([sys.executable, "-c", code, json.dumps(case)], cwd=here, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"bench decode child {v} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            runs[v].append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = runs["copied_full_sort"]
    rows = {v: dict(time_s=statistics.median(x["time_s"] for x in rs), cpu_s=statistics.median(x["cpu_s"] for x in rs),
                    peak_mb=max(x["peak_mb"] for x in rs), tokens=rs[0]["tokens"],
                    time_ratio=statistics.median(x["time_s"] / b["time_s"] for x, b in zip(rs, base)),
                    cpu_ratio=statistics.median(x["cpu_s"] / b["cpu_s"] for x, b in zip(rs, base)),
                    same_samples=all(x["ids"] == b["ids"] for x, b in zip(rs, base)))
            for v, rs in runs.items()}
    if args.json:
        print(json.dumps(rows))
        return
    m = bench_loop.cpu_line()
    print(f"cpu: {m['cpu']}; vector extensions: {' '.join(m['vector_extensions']) or 'none found'}")
    print(f"decode: {args.problems} arith generator prompts x {args.n} samples, T 0.8, top-p 0.95, <= {args.max_new_tokens} "
          f"new tokens, {'tiny random model' if args.quick else model.DEFAULT_MODEL}, {args.threads} thread(s), "
          f"{args.reps} rep(s) of each in fresh processes; ratios vs copied_full_sort, rep by rep")
    print(f"{'variant':18s} {'wall s':>8s} {'cpu s':>8s} {'wall/base':>10s} {'cpu/base':>9s} {'peak MB':>8s} {'tok/s':>7s}  same samples")
    for v, r in rows.items():
        print(f"{v:18s} {r['time_s']:8.2f} {r['cpu_s']:8.2f} {r['time_ratio']:10.2f} {r['cpu_ratio']:9.2f} "
              f"{r['peak_mb']:8.0f} {r['tokens'] / r['time_s']:7.1f}  {r['same_samples']}")


def parser(sub):
    p = sub.add_parser("decode", help="the local generator's decode: the prefix copied per row or held once",
                       description="python bench.py decode [--problems 4 --n 8] [--reps 3] [--quick] [--json]")
    p.add_argument("--problems", type=int, default=4, help="generator prompts (arith test problems)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (collect's m)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the main job's generator runs 1 on 2 cores)")
    p.add_argument("--quick", action="store_true", help="a tiny random model (the test)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=run)
