"""Held-out evaluation: a trained generator (one greedy workflow per problem) or a fixed baseline.

    python evaluate.py --bench arith --split test --baseline cot --limit 200            # fixed workflow
    python evaluate.py --run runs/default --iter 3                                      # checkpoint
    python evaluate.py --adapter runs/default/iter_3/adapter --bench arith --limit 200
    python evaluate.py --run runs/default --compare                                     # markdown table

Workflows run through the same sandbox and the same scorer as training. Per-problem rows go to
runs/<run>/eval/iter_<k>.jsonl (checkpoints) or runs/baselines/<bench>-<split>-<limit>-<executor>/
<baseline>.jsonl (baselines, shared by every run on that benchmark and executor); a rerun resumes.
Accuracy comes with a 95 % percentile-bootstrap CI over problems (2000 resamples, seed 0).
"""
import argparse
import random
import re
import statistics
import sys
from pathlib import Path

import collect
from jsonl import DataError, read_jsonl, truncate_torn_tail


def bootstrap_ci(scores, reps=2000, seed=0):
    """95 % percentile bootstrap CI of the mean over problems."""
    if not scores:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))]


def summarize(rows):
    # rows are appended as workflows finish; the CI's resamples must not depend on that order
    scores = [float(r["score"]) for r in sorted(rows, key=lambda r: str(r["problem_id"]))]
    lo, hi = bootstrap_ci(scores)
    return {"n": len(rows), "accuracy": statistics.fmean(scores) if scores else 0.0, "ci_low": lo, "ci_high": hi,
            "valid": statistics.fmean([bool(r["valid"]) for r in rows]) if rows else 0.0,
            "executor_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
            "cost_usd": sum(r["cost_usd"] for r in rows), "seconds": sum(r["seconds"] for r in rows)}


def _pending(out, problems):
    out.parent.mkdir(parents=True, exist_ok=True)
    truncate_torn_tail(out)
    done = {r["problem_id"] for r in read_jsonl(out)} if out.exists() else set()
    return [p for p in problems if p["id"] not in done]


def _finish(out, problems):
    """The rows of `problems`, in the problems' order."""
    order = {p["id"]: i for i, p in enumerate(problems)}
    rows = sorted((r for r in read_jsonl(out) if r["problem_id"] in order), key=lambda r: order[r["problem_id"]])
    if len(rows) != len(order):
        raise DataError(f"{out}: expected {len(order)} problems, found {len(rows)}")
    return rows


def eval_baseline(name, cfg, executor, split="test", limit=200, out=None):
    """Run the fixed workflow `name` on every problem; rows appended to `out`."""
    import benchmarks
    fam = benchmarks.family(cfg["bench"])
    if name not in BASELINES[fam]:
        raise DataError(f"--baseline must be one of {', '.join(BASELINES[fam])}, got {name!r}")
    problems = benchmarks.load(cfg["bench"], split, cfg["data_dir"], limit=limit, seed=0)
    code = BASELINES[fam][name]
    todo = _pending(out, problems)
    rows = [{"problem_id": p["id"], "sample": 0, "prompt": None, "prefill": "", "completion": code,
             "completion_ids": [], "code": code, "valid": True, "reason": None} for p in todo]
    with open(out, "a", encoding="utf-8") as f:
        lost = collect.execute(rows, todo, dict(cfg, runs=cfg["runs"]), executor, cfg["bench"], f)
    collect.require_scored(lost, out)
    return summarize(_finish(out, problems))


def eval_generator(mdl, tok, cfg, executor, out, split="test", limit=200):
    """One greedy workflow per problem from the generator `mdl` (base + adapter), executed and
    scored like training."""
    import benchmarks
    import model as M
    import operators as O
    fam = benchmarks.family(cfg["bench"])
    problems = benchmarks.load(cfg["bench"], split, cfg["data_dir"], limit=limit, seed=0)
    todo = _pending(out, problems)
    def generate(chunk):
        msgs = [O.build_prompt(p["problem"], fam, max_calls=cfg["max_calls"]) for p in chunk]
        samples = M.sample(mdl, tok, msgs, n=1, max_new_tokens=cfg["max_new_tokens"], temperature=0,
                           prefill=O.PREFILLS[fam])
        return [collect.workflow_row(p, 0, m, O.PREFILLS[fam], s[0]["text"], s[0]["token_ids"], O.OPERATOR_SETS[fam],
                                     cfg["max_calls"]) for p, m, s in zip(chunk, msgs, samples)]

    lost = []
    with open(out, "a", encoding="utf-8") as f:
        B = 32  # greedy rows per decode batch
        collect.pipelined([todo[c:c + B] for c in range(0, len(todo), B)], generate,
                          lambda rows, chunk: lost.extend(collect.execute(rows, chunk, cfg, executor, cfg["bench"], f)))
    collect.require_scored(lost, out)
    return summarize(_finish(out, problems))


def executor_tag(cfg):
    spec = cfg["executor"] or "none"
    tag = "local" if spec == "local" else re.sub(r"[^A-Za-z0-9]+", "_", f"{spec}-{cfg['executor_model']}").strip("_")
    cap = collect.call_tokens(cfg)  # a different reply cap is a different executor
    return tag[:60] + (f"-cap{cap}" if cap else "")


def baseline_path(cfg, name, split, limit, root="runs"):
    """Baseline rows are shared by every run on the same benchmark, split, problems and executor."""
    return Path(root) / "baselines" / f"{cfg['bench']}-{split}-{limit}-{executor_tag(cfg)}" / f"{name}.jsonl"


def compare_table(run_dir, cfg=None, split="test", limit=None):
    """Markdown table of every evaluated iteration of a run, plus the matching baseline rows."""
    run_dir = Path(run_dir)
    lines = ["| workflow source | n | valid % | test accuracy (95 % CI) | executor tokens | $ |",
             "|---|---|---|---|---|---|"]
    entries = sorted(run_dir.glob("eval/iter_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if cfg is not None and limit is not None:
        entries += sorted(baseline_path(cfg, "x", split, limit, run_dir.parent).parent.glob("*.jsonl"))
    for path in entries:
        s = summarize(read_jsonl(path))
        name = f"generator {path.stem}" if path.parent.name == "eval" else f"baseline {path.stem}"
        lines.append(f"| {name} | {s['n']} | {100 * s['valid']:.0f} | {100 * s['accuracy']:.1f} "
                     f"({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}) | {s['executor_tokens']} | {s['cost_usd']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run dir (checkpoint mode, --compare)")
    ap.add_argument("--iter", type=int, help="evaluate the generator of this iteration of --run")
    ap.add_argument("--adapter", help="evaluate base + this PEFT-layout adapter")
    ap.add_argument("--baseline", help="io | cot | cot_sc | programmer | self_refine")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--compare", action="store_true", help="print the table of evaluated iterations and baselines")
    collect.add_args(ap)
    ap.add_argument("--mode", choices=["spogw", "refine"], default="spogw",
                    help="refine: W4S multi-turn workflow refinement trained with RWR (refine.py)")
    import refine
    refine.add_args(ap)
    args = ap.parse_args(argv)
    if args.mode == "refine":
        return refine.evaluate_main(args)
    try:
        cfg = collect.settings(args.run or ".", args) if args.run else collect.settings("/nonexistent", args)
        if args.compare:
            if not args.run:
                raise DataError("--compare needs --run")
            print(compare_table(args.run, cfg, args.split, args.limit))
            return
        if not (args.baseline or args.adapter or (args.run and args.iter is not None)):
            raise DataError("give --baseline NAME, --adapter DIR, or --run DIR --iter K")
        collect.set_threads(cfg)
        with collect.open_executor(cfg, generator=False) as ex:  # the generator is loaded here
            if args.baseline:
                out = baseline_path(cfg, args.baseline, args.split, args.limit)
                s = eval_baseline(args.baseline, cfg, ex, args.split, args.limit, out)
            else:
                import model as M
                mdl, tok = M.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
                if args.adapter:
                    M.load_adapter(mdl, args.adapter)
                    out = Path(args.adapter).parent / f"eval_{args.split}_{args.limit}.jsonl"
                else:
                    adapter = Path(args.run) / f"iter_{args.iter}" / "adapter"
                    if args.iter > 0:
                        M.load_adapter(mdl, adapter)
                    out = Path(args.run) / "eval" / f"iter_{args.iter}.jsonl"
                s = eval_generator(mdl, tok, cfg, ex, out, args.split, args.limit)
    except (DataError, ValueError, collect.ExecutorError) as e:  # here: the endpoint's, never a workflow's
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"accuracy {100 * s['accuracy']:.1f} % (95 % CI {100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}), "
          f"n={s['n']}, valid {100 * s['valid']:.0f} %, executor tokens {s['executor_tokens']}, ${s['cost_usd']:.4f}")
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
