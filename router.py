"""Router baseline (RouteLLM-style): a classifier on the problem text picks one fixed workflow per
problem. Per-problem workflow generation must beat it to matter (ARCHITECTURE §11).

    python headroom.py --bench mixed --limit 50                       # the fixed workflows' test rows
    python router.py --bench mixed --train-limit 40 --limit 50        # their train rows, fit, route the test rows
    python router.py --bench mixed --train-limit 40 --limit 50 --table-only   # no executor: train rows so far
    python router.py --run runs/mixed-s0 --train-limit 40 --baselines io,programmer,programmer_format
                                                   # route a run's held-out problems among its baselines
    OMP_NUM_THREADS=1 python router.py --bench mixed --train-limit 40 --limit 50 --servers 1 --workers 2 --threads 1

Runs every fixed workflow of workflow.BASELINES[family] (or --baselines) on the first --train-limit
train problems of every kind (rows in runs/headroom/<bench>/train-<executor>/<workflow>.jsonl,
resumable, as headroom.py lays them out), labels each train problem with the fixed workflow that
is correct on it with the fewest executor tokens (label), fits the classifier (fit) and routes
the held-out problems: the first --limit test problems per kind, whose fixed-workflow rows
headroom.py wrote, or with --run the run's held-out problems, whose rows train.py / evaluate.py
wrote under runs/baselines/. The router's rows are the chosen workflow's rows (route_rows), so
routing costs no executor call; they go to router.jsonl beside those rows, where headroom.py's
table and the run's report.md (report.router_rows) pick them up. Prints accuracy (95 % CI),
calls and tokens per problem, accuracy and the workflows picked per kind, and the cost oracle.

The classifier: features are the lowercase word unigrams and bigrams of the problem text, hashed
(crc32, not Python's per-process salted hash) into DIMS columns, each text scaled to unit length;
multinomial logistic regression trained by full-batch gradient descent with an L2 penalty, from
zero weights. Chosen over multinomial naive Bayes because bigrams repeat their unigrams, which
naive Bayes counts twice as independent evidence, while a jointly fitted model weighs them
together; and because the label is a decision (which workflow is cheapest and right), not a
class that generates the words. Nothing in it is random (zero start, full batches, fixed
hashing): the same rows give the same router, so it has no seed.
"""
import argparse
import collections
import math
import re
import zlib
from pathlib import Path

import numpy as np

import benchmarks
import config
import costs
import mixed
import report
import rollout
import workflow
from jsonl import DataError, read_jsonl, write_jsonl_atomic

DIMS = 2 ** 14  # hashed feature columns: mixed's train texts have a few thousand distinct n-grams
L2, STEPS, LR = 1e-3, 500, 1.0  # unit-length rows keep the loss's curvature <= 1 (+ bias): step 1 is stable
WORD = re.compile(r"[a-z0-9]+")


def grams(text):
    """The lowercase word unigrams and bigrams of a text."""
    words = WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def design(texts, dims=DIMS):
    """The texts' hashed n-gram counts, each row scaled to unit length, as a sparse matrix:
    (row index, column, value) arrays and the number of rows."""
    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        counts = collections.Counter(zlib.crc32(g.encode()) % dims for g in grams(text))
        norm = math.sqrt(sum(c * c for c in counts.values())) or 1.0
        rows += [i] * len(counts)
        cols += sorted(counts)
        vals += [counts[j] / norm for j in sorted(counts)]
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(vals, dtype=float), len(texts)


def _times(x, w):
    """x @ w for the sparse x of design and a dense (dims, classes) w."""
    r, c, v, n = x
    return np.stack([np.bincount(r, weights=v * w[c, k], minlength=n) for k in range(w.shape[1])], axis=1)


def _t_times(x, g, dims):
    """x.T @ g for the sparse x of design and a dense (rows, classes) g."""
    r, c, v, _ = x
    return np.stack([np.bincount(c, weights=v * g[r, k], minlength=dims) for k in range(g.shape[1])], axis=1)


def softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class Router:
    """A fitted router: classes (the fixed workflows), weights (dims, classes), bias, the train
    labels {problem_id: workflow} and the fallback label (the best single fixed workflow on train)."""

    def __init__(self, classes, weights, bias, labels, fallback):
        self.classes, self.weights, self.bias, self.labels, self.fallback = classes, weights, bias, labels, fallback

    def predict(self, texts):
        """The fixed workflow picked for each text (ties: the first class)."""
        z = _times(design(texts, self.weights.shape[0]), self.weights) + self.bias
        return [self.classes[i] for i in z.argmax(axis=1)]


def label(pids, scores, tokens):
    """({problem_id: workflow}, fallback): each problem's label is the fixed workflow with its
    highest score (mixed scores 0 or 1: a correct one), the fewest tokens among those, then the
    first in `scores`' order. Problems no fixed workflow scores on get the fallback: the best single
    fixed workflow on these problems (costs.best_single), what a router should do when it cannot
    tell."""
    names = list(scores)
    fallback = costs.best_single(scores, tokens, pids)
    labels = {}
    for p in pids:
        top = max(scores[b][p] for b in names)
        near = [b for b in names if scores[b][p] >= top - costs.EPS]
        labels[p] = min(near, key=lambda b: (tokens[b][p], names.index(b))) if top > 0 else fallback
    return labels, fallback


def fit(problems, scores, tokens, l2=L2, steps=STEPS, lr=LR, dims=DIMS):
    """A Router fitted on `problems` (rows with id and problem), scores and tokens {fixed workflow:
    {problem_id: value}} covering them; the classes are the workflows of `scores`, in its order."""
    classes, pids = list(scores), [p["id"] for p in problems]
    labels, fallback = label(pids, scores, tokens)
    x = design([p["problem"] for p in problems], dims)
    y = np.eye(len(classes))[[classes.index(labels[p]) for p in pids]]
    w, b = np.zeros((dims, len(classes))), np.zeros(len(classes))
    for _ in range(steps):
        g = (softmax(_times(x, w) + b) - y) / max(len(pids), 1)  # d(mean cross-entropy)/d(logits)
        w -= lr * (_t_times(x, g, dims) + l2 * w)
        b -= lr * g.sum(axis=0)  # the bias is not penalised: it carries the label frequencies
    return Router(classes, w, b, labels, fallback)


def route_rows(test_problems, choice, baseline_rows):
    """The router's held-out rows: for each problem the row of the fixed workflow `choice`
    ({problem_id: workflow}) picked, from baseline_rows ({workflow: rows}), marked with `route`."""
    by = {b: {r["problem_id"]: r for r in rows} for b, rows in baseline_rows.items()}
    out = []
    for p in test_problems:
        b = choice[p["id"]]
        if p["id"] not in by.get(b, {}):
            raise DataError(f"fixed workflow {b!r} has no held-out row for problem {p['id']!r}")
        out.append({**by[b][p["id"]], "route": b})
    return out


# ---- the command line ----

def rows_of(path, problems):
    """The rows in `path` of `problems`, in their order; None unless every problem has one."""
    by = {r["problem_id"]: r for r in read_jsonl(path)} if path.is_file() else {}
    return [by[p["id"]] for p in problems] if all(p["id"] in by for p in problems) else None


def held_out(args, cfg, names):
    """(held-out problems, {workflow: their rows}, router.jsonl path, a phrase naming them): the
    first --limit test problems per kind (headroom.py's rows), or with --run the run's own."""
    if args.run:
        n = cfg["eval_problems"]
        problems = benchmarks.load(cfg["bench"], "test", cfg["data_dir"], limit=n, seed=0)
        paths = {b: report.baseline_path(cfg, b, "test", n, args.run.parent) for b in names}
        what = f"the {n} held-out problems of {args.run}"
    else:
        problems = mixed.select(benchmarks.load(cfg["bench"], args.split, cfg["data_dir"]), args.limit)
        root = report.headroom_dir(cfg, args.split, args.out)
        paths = {b: root / f"{b}.jsonl" for b in names}
        what = f"the first {args.limit} {args.split} problems per kind"
    rows = {b: rows_of(paths[b], problems) for b in names}
    missing = [b for b in names if rows[b] is None]
    if missing and args.run:
        todo = "; ".join(f"python evaluate.py --bench {cfg['bench']} --baseline {b} --limit {cfg['eval_problems']}"
                         for b in missing)
    elif missing:
        todo = (f"python headroom.py --bench {cfg['bench']} --split {args.split} --limit {args.limit} "
                f"--baselines {','.join(missing)}")
    if missing:
        raise DataError(f"the router picks among the fixed workflows' held-out rows; {', '.join(missing)} have none "
                        f"for {what}: run (with this executor's flags) {todo}, or pick --baselines among the others")
    return problems, rows, next(iter(paths.values())).with_name("router.jsonl"), what


def train_rows(args, cfg, names):
    """{workflow: rows} on the first --train-limit train problems per kind: run (resumable) unless
    --table-only, then read back."""
    problems = mixed.select(benchmarks.load(cfg["bench"], "train", cfg["data_dir"]), args.train_limit)
    root = report.headroom_dir(cfg, "train", args.out)
    if not args.table_only:
        rollout.set_threads(cfg["threads"], cfg["executor"])
        with rollout.open_executor(cfg, generator=False) as ex:
            for b in names:
                rollout.score_workflow(workflow.BASELINES[benchmarks.family(cfg["bench"])][b], problems, cfg, ex,
                                       root / f"{b}.jsonl")
    rows = {b: rows_of(root / f"{b}.jsonl", problems) for b in names}
    missing = [b for b in names if rows[b] is None]
    if missing:
        raise DataError(f"no train rows of {', '.join(missing)} for all {len(problems)} problems under {root}: "
                        f"run this command without --table-only")
    return problems, rows


def summary(router, problems, rows, base, what, out):
    """The printed report: labels, the router's accuracy, cost and picks per kind, the cost oracle."""
    kinds = {p["id"]: p["kind"] for p in problems}
    t, a, lo, hi, calls = costs.point(rows)
    shares = collections.Counter(router.labels.values())
    lines = [f"router over {', '.join(router.classes)}; train labels: "
             + ", ".join(f"{b} {100 * n / len(router.labels):.0f} %" for b, n in shares.most_common())
             + f" (fallback {router.fallback}); held out: {what} -> {out}", "",
             f"router: accuracy {costs.pct(a, lo, hi)} %, {t:.0f} executor tokens/problem, {calls:.2f} calls/problem",
             "", "| kind | n | router accuracy % | workflows picked |", "|---|---|---|---|"]
    for k in sorted(set(kinds.values())):
        rs = [r for r in rows if kinds[r["problem_id"]] == k]
        picks = collections.Counter(r["route"] for r in rs).most_common()
        lines.append(f"| {k} | {len(rs)} | {100 * sum(float(r['score']) for r in rs) / len(rs):.1f} | "
                     + ", ".join(f"{b} {100 * n / len(rs):.0f} %" for b, n in picks) + " |")
    res = costs.cost_oracle({b: {r["problem_id"]: float(r["score"]) for r in rs} for b, rs in base.items()},
                            {b: {r["problem_id"]: costs.tokens(r) for r in rs} for b, rs in base.items()}, kinds)
    return lines + [""] + costs.cost_table(res, {f"fixed {b}": rs for b, rs in base.items()} | {"router": rows})


def measure(args):
    if args.run and not (Path(args.run) / "config.json").is_file():
        raise DataError(f"--run {args.run}: no config.json there (a run directory train.py wrote)")
    cfg = config.merge(args.run, args, ("collect", "eval"))
    args.run = args.run and Path(args.run)
    if min(args.limit, args.train_limit) < 1:
        raise DataError(f"--limit and --train-limit must be >= 1, got {args.limit} and {args.train_limit}")
    if args.split == "train":
        raise DataError("--split train: the router is fitted on the train split; route validate or test problems")
    offered = workflow.BASELINES[benchmarks.family(cfg["bench"])]
    names = args.baselines.split(",") if args.baselines else list(offered)
    bad = [b for b in names if b not in offered]
    if bad:
        raise DataError(f"--baselines: {bad[0]!r} is not one of {', '.join(offered)}")
    names = [b for b in offered if b in names]  # classes and ties in one order
    problems, base, out, what = held_out(args, cfg, names)  # before any executor time is spent on train
    train, rows = train_rows(args, cfg, names)
    router = fit(train, {b: {r["problem_id"]: float(r["score"]) for r in rs} for b, rs in rows.items()},
                 {b: {r["problem_id"]: costs.tokens(r) for r in rs} for b, rs in rows.items()})
    choice = dict(zip([p["id"] for p in problems], router.predict([p["problem"] for p in problems])))
    routed = route_rows(problems, choice, base)
    write_jsonl_atomic(out, routed)
    return "\n".join(summary(router, problems, routed, base, what, out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("router")
    g.add_argument("--train-limit", type=int, default=40, help="train problems per kind (the first ones) to fit on")
    g.add_argument("--limit", type=int, default=50, help="held-out problems per kind (the first ones; headroom.py's)")
    g.add_argument("--split", default="test", help="held-out split of --limit (validate | test)")
    g.add_argument("--run", help="route this run's held-out problems instead (its config.json, runs/baselines rows)")
    g.add_argument("--baselines", help="comma-separated subset of workflow.BASELINES[family] to pick from (default: all)")
    g.add_argument("--out", default="runs/headroom", help="root of the cached rows (headroom.py's)")
    g.add_argument("--table-only", action="store_true", help="no executor: fit on the train rows scored so far")
    config.add_knobs(ap, ("collect",))  # eval_problems comes from --run's config.json
    args = ap.parse_args(argv)
    args.bench = args.bench or (None if args.run else "mixed")
    print(config.cli(lambda: measure(args)))


if __name__ == "__main__":
    main()
