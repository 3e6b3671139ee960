"""Adaptivity headroom of a benchmark with problem kinds: every fixed baseline on every kind.

    python headroom.py --bench mixed --limit 50                          # 5 baselines x 4 kinds x 50
    python headroom.py --bench mixed --limit 10 --baselines io,programmer # a quick pilot
    python headroom.py --bench mixed --limit 50 --table-only              # the table of the rows so far
    OMP_NUM_THREADS=1 python headroom.py --limit 50 --servers 1 --workers 2 --threads 1 \
        --baselines io,programmer,cot,self_refine,cot_sc                  # on a shared 2-core box

Runs each fixed workflow of evaluate.BASELINES[family] on the first --limit problems of every kind
of the --split (rows carry a `kind`, e.g. mixed.py's) with the run's executor (the local embedded
one by default), through the same sandbox and scorer as training. Rows are appended to
runs/headroom/<bench>/<split>-<executor>/<baseline>.jsonl as workflows finish; a rerun resumes,
and a larger --limit keeps the rows of a smaller one. Then prints (and writes as table.md beside
the rows) accuracy per baseline and kind with 95 % bootstrap CIs, the best single fixed workflow,
the by-kind oracle (each kind's best fixed workflow applied to that kind), their difference (the
headroom a per-problem workflow could at most win back from fixed ones, on these problems) and
whether the two CIs are disjoint. The oracle picks its workflows on the same problems it is scored
on, so it is an optimistic bound; with disjoint CIs the gap is not an artefact of the draw.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import benchmarks
import collect
import evaluate
from jsonl import DataError, read_jsonl, truncate_torn_tail


def select(rows, limit):
    """The first `limit` rows of every kind, kinds in order of first appearance."""
    by_kind = {}
    for r in rows:
        if "kind" not in r:
            raise DataError(f"problem {r.get('id')!r} has no 'kind': --bench must be a benchmark with kinds (mixed)")
        by_kind.setdefault(r["kind"], []).append(r)
    return [r for rs in by_kind.values() for r in rs[:limit]]


def fmt(mean, lo, hi):
    return f"{100 * mean:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def compute(scores, kinds):
    """scores: {baseline: {problem_id: score}} (every baseline scored on every problem);
    kinds: {problem_id: kind}, in problem order. Returns per-cell accuracy and CI, the best single
    baseline, the oracle's choice per kind, both per-problem score lists (bootstrapped over the same
    problems: bootstrap_ci with one seed resamples the same indices for lists of equal length) and
    the headroom with a paired CI."""
    pids, names = list(kinds), list(scores)
    for b in names:
        missing = [p for p in pids if p not in scores[b]]
        if missing:
            raise DataError(f"baseline {b!r} has no score for {len(missing)} problem(s), e.g. {missing[0]!r}")
    kind_list = list(dict.fromkeys(kinds.values()))
    cells = {}
    for b in names:
        for k in kind_list + ["overall"]:
            xs = [scores[b][p] for p in pids if k == "overall" or kinds[p] == k]
            cells[b, k] = (statistics.fmean(xs), *evaluate.bootstrap_ci(xs))
    best = max(names, key=lambda b: cells[b, "overall"][0])  # ties: the first in BASELINES order
    choice = {k: max(names, key=lambda b: cells[b, k][0]) for k in kind_list}
    single = [scores[best][p] for p in pids]
    oracle = [scores[choice[kinds[p]]][p] for p in pids]
    s_ci, o_ci = evaluate.bootstrap_ci(single), evaluate.bootstrap_ci(oracle)
    return {"kinds": kind_list, "baselines": names, "cells": cells, "best": best, "choice": choice,
            "single": (statistics.fmean(single), *s_ci), "oracle": (statistics.fmean(oracle), *o_ci),
            "headroom": (statistics.fmean(oracle) - statistics.fmean(single),
                         *evaluate.bootstrap_ci([o - s for o, s in zip(oracle, single)])),
            "disjoint": o_ci[0] > s_ci[1] or s_ci[0] > o_ci[1], "n": len(pids),
            "per_kind": {k: sum(1 for p in pids if kinds[p] == k) for k in kind_list}}


def table(res):
    """Markdown: rows = baselines, columns = kinds + overall; then best single, oracle, headroom."""
    cols = res["kinds"] + ["overall"]
    head = [f"{k} (n={res['per_kind'][k]})" for k in res["kinds"]] + [f"overall (n={res['n']})"]
    lines = ["| baseline | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for b in res["baselines"]:
        lines.append(f"| {b} | " + " | ".join(fmt(*res["cells"][b, k]) for k in cols) + " |")
    picks = ", ".join(f"{k}: {b}" for k, b in res["choice"].items())
    h = res["headroom"]
    lines += ["", f"- best single fixed workflow: **{res['best']}**, {fmt(*res['single'])}",
              f"- by-kind oracle ({picks}): {fmt(*res['oracle'])}",
              f"- headroom (oracle - best single): **{100 * h[0]:+.1f} points** "
              f"(paired 95 % CI [{100 * h[1]:+.1f}, {100 * h[2]:+.1f}])",
              f"- CIs of oracle and best single disjoint: **{'yes' if res['disjoint'] else 'no'}**"]
    return "\n".join(lines)


def run_baseline(name, code, problems, cfg, executor, out):
    """Execute one fixed workflow on every problem not yet in `out`; rows appended as they finish."""
    out.parent.mkdir(parents=True, exist_ok=True)
    truncate_torn_tail(out)
    done = {r["problem_id"] for r in read_jsonl(out)} if out.exists() else set()
    todo = [p for p in problems if p["id"] not in done]
    if not todo:
        return
    t0 = time.time()
    rows = [{"problem_id": p["id"], "kind": p["kind"], "baseline": name, "sample": 0, "prompt": None, "prefill": "",
             "completion": code, "completion_ids": [], "code": code, "valid": True, "reason": None} for p in todo]
    with open(out, "a", encoding="utf-8") as f:
        lost = collect.execute(rows, todo, cfg, executor, cfg["bench"], f)
    collect.require_scored(lost, out)
    print(f"{name}: {len(todo)} problems in {time.time() - t0:.0f} s", file=sys.stderr)


def read_scores(path, problems):
    want = {p["id"] for p in problems}
    if not path.exists():
        return {}
    return {r["problem_id"]: float(r["score"]) for r in read_jsonl(path) if r["problem_id"] in want}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("headroom")
    g.add_argument("--limit", type=int, default=50, help="problems per kind (the first ones of the split)")
    g.add_argument("--split", default="test", help="train | validate | test")
    g.add_argument("--baselines", help="comma-separated subset of evaluate.BASELINES[family] (default: all)")
    g.add_argument("--out", default="runs/headroom", help="root of the cached rows and table.md")
    g.add_argument("--table-only", action="store_true",
                   help="no executor: the table of the baselines fully scored so far")
    collect.add_args(ap)
    args = ap.parse_args(argv)
    args.bench = args.bench or "mixed"
    try:
        cfg = collect.settings("/nonexistent", args)
        if args.limit < 1:
            raise DataError(f"--limit must be >= 1, got {args.limit}")
        fam = benchmarks.family(cfg["bench"])
        names = args.baselines.split(",") if args.baselines else list(evaluate.BASELINES[fam])
        bad = [b for b in names if b not in evaluate.BASELINES[fam]]
        if bad:
            raise DataError(f"--baselines: {bad[0]!r} is not one of {', '.join(evaluate.BASELINES[fam])}")
        problems = select(benchmarks.load(cfg["bench"], args.split, cfg["data_dir"]), args.limit)
        root = Path(args.out) / cfg["bench"] / f"{args.split}-{evaluate.executor_tag(cfg)}"
        if not args.table_only:
            collect.set_threads(cfg)
            with collect.open_executor(cfg, generator=False) as ex:
                for b in names:
                    run_baseline(b, evaluate.BASELINES[fam][b], problems, cfg, ex, root / f"{b}.jsonl")
        # table rows and oracle ties in BASELINES order, whatever order they ran in
        scores = {b: read_scores(root / f"{b}.jsonl", problems) for b in evaluate.BASELINES[fam] if b in names}
        scores = {b: s for b, s in scores.items() if len(s) == len(problems)}
        if not scores:
            raise DataError(f"no baseline has all {len(problems)} problems scored under {root}")
        res = compute(scores, {p["id"]: p["kind"] for p in problems})
    except (DataError, ValueError, collect.ExecutorError) as e:  # BenchmarkError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    text = (f"{cfg['bench']} {args.split}, first {args.limit} problems per kind, executor "
            f"{evaluate.executor_tag(cfg)}\n\n" + table(res))
    print(text)
    (root / "table.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
