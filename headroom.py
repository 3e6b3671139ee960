"""Adaptivity headroom of a benchmark with problem kinds: every fixed baseline on every kind.

    python headroom.py --bench mixed --limit 50                          # 6 baselines x 3 kinds x 50
    python headroom.py --bench mixed --limit 10 --baselines io,programmer # a quick pilot
    python headroom.py --bench mixed --limit 50 --table-only              # the table of the rows so far
    OMP_NUM_THREADS=1 python headroom.py --limit 50 --servers 1 --workers 2 --threads 1 \
        --baselines io,programmer,cot,self_refine,cot_sc                  # on a shared 2-core box

Runs each fixed workflow of workflow.BASELINES[family] on the first --limit problems of every kind
of the --split (rows carry a `kind`, e.g. mixed.py's) with the run's executor (the local embedded
one by default), through the same sandbox and scorer as training (rollout.score_workflow). Rows
are appended to runs/headroom/<bench>/<split>-<executor>/<baseline>.jsonl as workflows finish; a
rerun resumes, and a larger --limit keeps the rows of a smaller one. Then prints (and writes as
table.md beside the rows; report.headroom) accuracy per baseline and kind with 95 % bootstrap CIs,
the best single fixed workflow,
the by-kind oracle (each kind's best fixed workflow applied to that kind), their difference (the
headroom a per-problem workflow could at most win back from fixed ones, on these problems) and
whether the two CIs are disjoint. The oracle picks its workflows on the same problems it is scored
on, so it is an optimistic bound; with disjoint CIs the gap is not an artefact of the draw.
Then the cost oracle (costs.py: per kind the cheapest fixed workflow within 1 point of the kind's
best; S*, the share of the best single workflow's executor tokens it saves) with calls and tokens
per problem of every fixed workflow. When router.py has written router.jsonl beside the rows, the
router's row is in both tables (never a candidate of the oracles).
"""
import argparse
import time

import benchmarks
import config
import costs
import report
import rollout
import workflow
from jsonl import DataError, read_jsonl
from mixed import select  # headroom.select: the first --limit problems of every kind


def read_rows(path, problems):
    """{problem_id: row} of the rows in `path` for `problems` ({} when there is no file)."""
    want = {p["id"] for p in problems}
    return {r["problem_id"]: r for r in read_jsonl(path) if r["problem_id"] in want} if path.exists() else {}


def tables(rows, problems, router):
    """The headroom table of the fixed workflows' rows ({name: {problem_id: row}}, each complete),
    the router's row in it when `router` (its rows) covers every problem; then, when every row
    carries its token counts, the cost oracle (costs.cost_table) with the router beside it."""
    kinds = {p["id"]: p["kind"] for p in problems}
    scores = {b: {p: float(r["score"]) for p, r in rs.items()} for b, rs in rows.items()}
    router = router if len(router) == len(problems) else {}
    others = {"router": report.kind_cells({p: float(r["score"]) for p, r in router.items()}, kinds)} if router else None
    lines = report.headroom_table(report.headroom(scores, kinds), others)
    if all("prompt_tokens" in r for rs in [*rows.values(), router] for r in rs.values()):
        res = costs.cost_oracle(scores, {b: {p: costs.tokens(r) for p, r in rs.items()} for b, rs in rows.items()}, kinds)
        methods = {b: list(rs.values()) for b, rs in rows.items()} | ({"router": list(router.values())} if router else {})
        lines += ["", "Accuracy against executor tokens (the cost oracle, costs.py):", ""] + costs.cost_table(res, methods)
    return lines


def measure(args):
    cfg = config.merge(None, args, ("collect",))
    if args.limit < 1:
        raise DataError(f"--limit must be >= 1, got {args.limit}")
    fam = benchmarks.family(cfg["bench"])
    names = args.baselines.split(",") if args.baselines else list(workflow.BASELINES[fam])
    bad = [b for b in names if b not in workflow.BASELINES[fam]]
    if bad:
        raise DataError(f"--baselines: {bad[0]!r} is not one of {', '.join(workflow.BASELINES[fam])}")
    names = [b for b in workflow.BASELINES[fam] if b in names]  # table rows and oracle ties in one order
    problems = select(benchmarks.load(cfg["bench"], args.split, cfg["data_dir"]), args.limit)
    root = report.headroom_dir(cfg, args.split, args.out)
    root.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        rollout.set_threads(cfg["threads"], cfg["executor"])
        with rollout.open_executor(cfg, generator=False) as ex:
            for b in names:
                t0 = time.time()
                rollout.score_workflow(workflow.BASELINES[fam][b], problems, cfg, ex, root / f"{b}.jsonl")
                print(f"[headroom] {b}: {len(problems)} problems scored ({time.time() - t0:.0f} s)")
    rows = {b: read_rows(root / f"{b}.jsonl", problems) for b in names}
    rows = {b: rs for b, rs in rows.items() if len(rs) == len(problems)}
    if not rows:
        raise DataError(f"no baseline has all {len(problems)} problems scored under {root}")
    text = "\n".join([f"{cfg['bench']} {args.split}, first {args.limit} problems per kind, executor "
                       f"{report.executor_tag(cfg)}", ""] + tables(rows, problems, read_rows(root / "router.jsonl", problems)))
    (root / "table.md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("headroom")
    g.add_argument("--limit", type=int, default=50, help="problems per kind (the first ones of the split)")
    g.add_argument("--split", default="test", help="train | validate | test")
    g.add_argument("--baselines", help="comma-separated subset of workflow.BASELINES[family] (default: all)")
    g.add_argument("--out", default="runs/headroom", help="root of the cached rows and table.md")
    g.add_argument("--table-only", action="store_true", help="no executor: the table of the baselines fully scored so far")
    config.add_knobs(ap, ("collect",))
    args = ap.parse_args(argv)
    args.bench = args.bench or "mixed"
    print(config.cli(lambda: measure(args)))


if __name__ == "__main__":
    main()
