"""Accuracy against executor cost: tokens per row, the cost oracle and its savings S*, the accuracy-cost
figure (ARCHITECTURE §11). Pure computations on held-out rows; report.py and headroom.py print them.

    python headroom.py --bench mixed --limit 50 --table-only    # the cost-oracle table beside the headroom
    python router.py --bench mixed --train-limit 40 --limit 50  # the router's point on it

In code:  res = costs.cost_oracle(scores, tokens, kinds);  print("\\n".join(costs.cost_table(res)))

A workflow's cost on a problem is the executor tokens it spent there, prompt + completion, summed
over its runs (tokens). The cost oracle asks, per kind, for the cheapest fixed workflow whose
accuracy on that kind is within one point of the kind's best, and applies it to that kind: the
least a by-kind choice of fixed workflows must spend to stay as accurate as the by-kind accuracy
oracle. S* = 1 - oracle tokens / best single fixed workflow's tokens is the fraction of the best
single workflow's spend that the cost oracle saves. A method spending T tokens per problem
captures (best single - T) / (best single - cost oracle) of S* (share_of_saving): 1 spends like
the cost oracle, 0 like the best single workflow, below 0 more than it. Like report.headroom the
oracle picks on the problems it is scored on: an optimistic bound.

The bootstrap CI every accuracy of the reports carries lives here, below report.py (which exports
it as report.bootstrap_ci), so the cost oracle's CI and report's are one function.
"""
import random
import statistics

from matplotlib.figure import Figure

from jsonl import DataError

EPS = 1e-9  # "within one point" must survive 0.51 - 0.50 = 0.010000000000000009


def bootstrap_ci(scores, reps=2000, seed=0):
    """95 % percentile bootstrap CI of the mean over problems."""
    if not scores:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))]


def tokens(row):
    """Executor tokens a workflow spent on one problem (prompt + completion, over its runs)."""
    return row["prompt_tokens"] + row["completion_tokens"]


def mean_ci(xs):
    return (statistics.fmean(xs) if xs else 0.0, *bootstrap_ci(xs))


def point(rows):
    """(tokens/problem, accuracy, CI low, CI high, calls/problem) of held-out rows; the CI is
    resampled in problem-id order, so it does not depend on the order rows finished in."""
    rows = sorted(rows, key=lambda r: str(r["problem_id"]))
    acc = mean_ci([float(r["score"]) for r in rows])
    n = max(len(rows), 1)
    return sum(map(tokens, rows)) / n, *acc, sum(r["calls"] for r in rows) / n


def _rank(names, acc, tok):
    """names best first: higher accuracy, then fewer tokens, then the order given."""
    return sorted(names, key=lambda b: (-acc[b], tok[b], names.index(b)))


def best_single(scores, tokens, pids):
    """The fixed workflow of `scores` with the highest mean score on `pids`; ties: fewer mean
    tokens, then the order of `scores`."""
    names = list(scores)
    return _rank(names, {b: statistics.fmean(scores[b][p] for p in pids) for b in names},
                 {b: statistics.fmean(tokens[b][p] for p in pids) for b in names})[0]


def cost_oracle(scores, tokens, kinds, within=0.01):
    """scores, tokens: {fixed workflow: {problem_id: value}}, each covering every problem of `kinds`
    ({problem_id: kind}). Per kind: `best` (highest accuracy; ties: fewer tokens, then the order of
    `scores`) and `cheap` (the fewest mean tokens among those within `within` of best; ties: higher
    accuracy, then order), with their accuracies and tokens/problem. Overall: the cost oracle
    (cheap per kind), the accuracy oracle (best per kind; the accuracy of report.headroom's), and
    the best single fixed workflow (highest overall accuracy, same ties), each as (accuracy, CI low,
    CI high) and tokens/problem; saving = S* = 1 - cost oracle tokens / best single tokens."""
    names, pids = list(scores), list(kinds)
    for table, what in ((scores, "score"), (tokens, "token count")):
        missing = [(b, p) for b in names for p in pids if p not in table.get(b, {})]
        if missing:
            raise DataError(f"fixed workflow {missing[0][0]!r} has no {what} for problem {missing[0][1]!r}")
    kind_list = sorted(set(kinds.values()))  # one row order in every run
    per_kind = {}
    for k in kind_list:
        ps = [p for p in pids if kinds[p] == k]
        acc = {b: statistics.fmean(scores[b][p] for p in ps) for b in names}
        tok = {b: statistics.fmean(tokens[b][p] for p in ps) for b in names}
        best = _rank(names, acc, tok)[0]
        near = [b for b in names if acc[b] >= acc[best] - within - EPS]
        cheap = min(near, key=lambda b: (tok[b], -acc[b], names.index(b)))
        per_kind[k] = {"n": len(ps), "best": best, "cheap": cheap, "best_acc": acc[best], "cheap_acc": acc[cheap],
                       "best_tokens": tok[best], "cheap_tokens": tok[cheap]}
    single = best_single(scores, tokens, pids)
    single_tok = statistics.fmean(tokens[single][p] for p in pids)

    def apply(pick):
        ws = [per_kind[kinds[p]][pick] for p in pids]
        return mean_ci([scores[w][p] for w, p in zip(ws, pids)]), statistics.fmean(tokens[w][p] for w, p in zip(ws, pids))
    (oracle, oracle_tok), (acc_oracle, acc_oracle_tok) = apply("cheap"), apply("best")
    return {"kinds": kind_list, "per_kind": per_kind, "n": len(pids), "within": within,
            "oracle": oracle, "oracle_tokens": oracle_tok, "acc_oracle": acc_oracle, "acc_oracle_tokens": acc_oracle_tok,
            "single": single, "single_acc": mean_ci([scores[single][p] for p in pids]), "single_tokens": single_tok,
            "saving": 1 - oracle_tok / single_tok if single_tok > 0 else 0.0}


def share_of_saving(res, spent):
    """The share of S* captured by a method spending `spent` tokens/problem: (best single - spent) /
    (best single - cost oracle); None when the cost oracle saves nothing."""
    gap = res["single_tokens"] - res["oracle_tokens"]
    return (res["single_tokens"] - spent) / gap if gap > EPS else None


def pct(mean, lo, hi):
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def cost_table(res, methods=None):
    """Markdown: per kind the best fixed workflow and the cheapest within the tolerance, the overall
    cost oracle against the best single fixed workflow and S*; then, for `methods` ({label: rows on
    the same problems}), accuracy, calls and tokens per problem and the share of S* each captures."""
    tol = f"{100 * res['within']:g} point{'s' if res['within'] != 0.01 else ''}"
    lines = [f"| kind | best fixed workflow: accuracy %, tokens/problem | cheapest within {tol}: accuracy %, tokens/problem |",
             "|---|---|---|"]
    for k in res["kinds"]:
        c = res["per_kind"][k]
        lines.append(f"| {k} (n={c['n']}) | {c['best']}: {100 * c['best_acc']:.1f}, {c['best_tokens']:.0f} | "
                     f"{c['cheap']}: {100 * c['cheap_acc']:.1f}, {c['cheap_tokens']:.0f} |")
    lines.append(f"| overall (n={res['n']}) | accuracy oracle: {pct(*res['acc_oracle'])}, {res['acc_oracle_tokens']:.0f} | "
                 f"cost oracle: {pct(*res['oracle'])}, {res['oracle_tokens']:.0f} |")
    picks = ", ".join(f"{k}: {c['cheap']}" for k, c in res["per_kind"].items())
    lines += ["", f"- best single fixed workflow: **{res['single']}**, {pct(*res['single_acc'])} %, "
                  f"{res['single_tokens']:.0f} tokens/problem",
              f"- cost oracle ({picks}): "
              f"{pct(*res['oracle'])} %, {res['oracle_tokens']:.0f} tokens/problem",
              f"- S* (share of the best single workflow's tokens the cost oracle saves): **{100 * res['saving']:.1f} %**"
              + (" (below 0: the cost oracle's accuracy costs more tokens than the best single spends)"
                 if res["saving"] < 0 else "")]
    if methods:
        lines += ["", "| workflows | accuracy % (95 % CI) | calls/problem | tokens/problem | share of S* |",
                  "|---|---|---|---|---|"]
        for label, rows in methods.items():
            t, a, lo, hi, calls = point(rows)
            share = share_of_saving(res, t)
            lines.append(f"| {label} | {pct(a, lo, hi)} | {calls:.2f} | {t:.0f} | "
                         f"{'–' if share is None else f'{share:+.2f}'} |")
        lines += ["", "Share of S*: (best single's tokens - the method's) / (best single's - the cost oracle's); "
                  "1 spends like the cost oracle. Read it beside the accuracy: a cheap, less accurate workflow "
                  "also scores high."]
    return lines


def paired(rows, against):
    """(mean of rows' score - against's, paired 95 % CI) over the problems of `rows`; `against`
    (held-out rows) must cover them. The bootstrap resamples problems, so the CI is the one of the
    difference, much narrower than two independent CIs would suggest."""
    theirs = {r["problem_id"]: float(r["score"]) for r in against}
    ids = sorted(str(r["problem_id"]) for r in rows)
    if any(p not in theirs for p in ids):
        raise DataError(f"no row for problem {next(p for p in ids if p not in theirs)!r} to pair with")
    ours = {str(r["problem_id"]): float(r["score"]) for r in rows}
    d = [ours[p] - theirs[p] for p in ids]
    return statistics.fmean(d), *bootstrap_ci(d)


def runs_table(res, runs, against):
    """Markdown: one row per run ({label: held-out rows on res's problems}: seeds of one command,
    ablation rows) with accuracy, the paired difference to each of `against` ({name: rows}: the best
    single fixed workflow, the router), tokens and calls per problem, share of S* and valid %; then
    the mean +- sd over the runs."""
    names = list(against)
    lines = ["| run | accuracy % (95 % CI) | " + " | ".join(f"vs {n}, paired" for n in names)
             + " | tokens/problem | calls/problem | share of S* | valid % |", "|---" * (len(names) + 6) + "|"]
    stats = []
    for label, rows in runs.items():
        t, a, lo, hi, calls = point(rows)
        share = share_of_saving(res, t)
        diffs = [paired(rows, against[n]) for n in names]
        valid = statistics.fmean(float(r.get("valid", True)) for r in rows)
        stats.append((a, t, calls, share if share is not None else 0.0))
        lines.append(f"| {label} | {pct(a, lo, hi)} | " + " | ".join(f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, "
                     f"{100 * d[2]:+.1f}]" for d in diffs) + f" | {t:.0f} | {calls:.2f} | "
                     f"{'–' if share is None else f'{share:+.2f}'} | {100 * valid:.0f} |")
    if len(stats) > 1:
        m = [statistics.fmean(col) for col in zip(*stats)]
        sd = [statistics.stdev(col) for col in zip(*stats)]
        lines.append(f"| mean ± sd of {len(stats)} | {100 * m[0]:.1f} ± {100 * sd[0]:.1f} | " + " | " * len(names)
                     + f"{m[1]:.0f} ± {sd[1]:.0f} | {m[2]:.2f} ± {sd[2]:.2f} | {m[3]:+.2f} ± {sd[3]:.2f} | |")
    return lines


def figure(path, res, fixed, router=None, iterations=None):
    """cost.png: executor tokens per problem (x) against held-out accuracy with 95 % CI bars (y):
    every fixed workflow ({name: rows}, labelled), the accuracy and the cost oracle of `res`, the
    router's rows and the iterations' ({k: rows}, joined in order, labelled k)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()

    def dot(x, acc, lo, hi, name, offset=(4, 4), **style):  # style's label= is the legend entry, `name` the point's
        ax.errorbar([x], [100 * acc], yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], capsize=3, linestyle="none",
                    **style)
        ax.annotate(name, (x, 100 * acc), textcoords="offset points", xytext=offset, fontsize=7)
    xs = []
    for i, (name, rows) in enumerate(fixed.items()):
        t, a, lo, hi, _ = point(rows)
        dot(t, a, lo, hi, name, marker="o", color="grey", label="fixed workflows" if i == 0 else None)
        xs.append(t)
    # the two oracles often coincide (no kind has a cheaper near-best workflow): labels above and below
    dot(res["acc_oracle_tokens"], *res["acc_oracle"], "accuracy oracle", offset=(6, 6), marker="*", markersize=11,
        color="C3", label="by-kind accuracy oracle")
    dot(res["oracle_tokens"], *res["oracle"], "cost oracle", offset=(6, -12), marker="D", color="C2",
        label="by-kind cost oracle")
    xs += [res["acc_oracle_tokens"], res["oracle_tokens"]]
    if router:
        t, a, lo, hi, _ = point(router)
        dot(t, a, lo, hi, "router", marker="s", color="C1", label="router")
        xs.append(t)
    if iterations:
        pts = [point(rows) for _, rows in sorted(iterations.items())]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color="C0", linewidth=1)
        for (k, _), (t, a, lo, hi, _) in zip(sorted(iterations.items()), pts):
            dot(t, a, lo, hi, str(k), marker="o", color="C0", label="generated (iteration k)" if k == min(iterations) else None)
        xs += [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # io and cot_sc can be 30x apart: keep both readable
        ax.set_xscale("log")
    ax.set(xlabel="executor tokens per problem", ylabel="held-out accuracy (%)", title="accuracy against executor cost (95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
