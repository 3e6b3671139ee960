"""Reports: accuracy with bootstrap CIs, the comparison table, and runs/<run>/report.md (ARCHITECTURE §11).

    python evaluate.py --run runs/default --compare      # every evaluated iteration + the matching baselines
    cat runs/default/report.md                           # written by train.py at the end of a run

Every accuracy is the mean score over held-out problems with a 95 % percentile bootstrap CI over
problems (summarize). Baseline rows live under runs/baselines/, shared by every run on the same
benchmark, split, problems and executor (baseline_path). On a benchmark with kinds report.md adds
the per-kind tables (kind_section), accuracy against executor tokens (cost_section: costs.py's cost
oracle and S*; cost.png) and the router's row where router.py has routed the run's problems.
"""
import ast
import collections
import json
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure

import benchmarks
import config
import costs
import operators
from costs import bootstrap_ci, pct  # report.bootstrap_ci: one CI for every accuracy in the reports
from jsonl import DataError, read_json, read_jsonl, write_atomic


def summarize(rows):
    # rows are appended as workflows finish; the CI's resamples must not depend on that order
    scores = [float(r["score"]) for r in sorted(rows, key=lambda r: str(r["problem_id"]))]
    lo, hi = bootstrap_ci(scores)
    return {"n": len(rows), "accuracy": statistics.fmean(scores) if scores else 0.0, "ci_low": lo, "ci_high": hi,
            "valid": statistics.fmean([bool(r["valid"]) for r in rows]) if rows else 0.0,
            "executor_tokens": sum(map(costs.tokens, rows)), "cost_usd": sum(r["cost_usd"] for r in rows),
            "seconds": sum(r["seconds"] for r in rows),
            "calls_per_problem": statistics.fmean(r["calls"] for r in rows) if rows else 0.0,
            "tokens_per_problem": statistics.fmean(map(costs.tokens, rows)) if rows else 0.0}


def executor_tag(cfg):
    spec = cfg["executor"] or "none"
    tag = "local" if spec == "local" else re.sub(r"[^A-Za-z0-9]+", "_", f"{spec}-{cfg['executor_model']}").strip("_")
    cap = config.call_tokens(cfg)  # a different reply cap is a different executor
    return tag[:60] + (f"-cap{cap}" if cap else "")


def baseline_path(cfg, name, split, limit, root="runs"):
    """Baseline rows are shared by every run on the same benchmark, split, problems and executor."""
    return Path(root) / "baselines" / f"{cfg['bench']}-{split}-{limit}-{executor_tag(cfg)}" / f"{name}.jsonl"


def headroom_dir(cfg, split, root="runs/headroom"):
    """Where headroom.py and router.py keep the rows of the first problems per kind of a split: one
    <workflow>.jsonl each (a larger --limit keeps a smaller one's rows), router.jsonl, table.md."""
    return Path(root) / cfg["bench"] / f"{split}-{executor_tag(cfg)}"


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


def spogw_section(run_dir, cfg, iters, baseline_rows):
    """Per iteration: train validity and score, held-out accuracy with its CI, cost; the fixed
    baselines; the curate figures."""
    lines = [f"generator `{cfg['model']}`, executor `{cfg['executor']}`"
             f"{' / ' + cfg['executor_model'] if cfg['executor_model'] else ''}, benchmark `{cfg['bench']}`, "
             f"loss `{cfg['loss']}` (kl {cfg['kl']}, ref {cfg['ref']}, beta {cfg['beta']}), groups `{cfg['groups']}` "
             f"(m={cfg['m']}, n={cfg['n']}, 2t={cfg['group_size']}), {cfg['problems']} problems/iteration"
             f"{' (the kinds in turn)' if cfg.get('draw') == 'kind' else ''}, "
             f"lr {cfg['lr']}, {cfg['epochs']} epochs"
             + ((f"; score = correct x max(0, 1 - {cfg['cost_weight']:g} x c)" if cfg.get("cost_on") == "correct"
                 else f"; score = correct - {cfg['cost_weight']:g} x c")
                + f", c = executor tokens / {cfg['cost_ref']}'s mean, std floor {config.std_floor(cfg):g}"
                if cfg.get("cost_weight") else "")
             + ("; the few-shot workflows join every group as guides (--guides fewshot)"
                if cfg.get("guides", "none") != "none" else "") + ".", "",
             "| iteration | valid % (train) | mean train score | test accuracy (95 % CI) | test valid % | executor tokens (train+test) | $ | wall (collect+train) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in range(iters + 1):
        stats = read_json(run_dir / f"iter_{k}" / "stats.json", {})
        collected = stats.get("collect", {})
        eval_path = run_dir / "eval" / f"iter_{k}.jsonl"
        held_out = summarize(read_jsonl(eval_path)) if eval_path.is_file() else None
        acc = (f"{100 * held_out['accuracy']:.1f} ({100 * held_out['ci_low']:.1f}–{100 * held_out['ci_high']:.1f})"
               if held_out else "–")
        toks = collected.get("executor_tokens", 0) + (held_out["executor_tokens"] if held_out else 0)
        cost = collected.get("cost_usd", 0.0) + (held_out["cost_usd"] if held_out else 0.0)
        wall_k = collected.get("seconds", 0.0) + stats.get("train", {}).get("seconds", 0.0)
        lines.append(f"| {k} | {100 * collected['valid_fraction']:.0f} | {collected['mean_score']:.3f} | "
                     if collected else f"| {k} | – | – | ")
        valid = f"{100 * held_out['valid']:.0f}" if held_out else "–"
        lines[-1] += f"{acc} | {valid} | {toks} | {cost:.4f} | {wall_k / 60:.1f} min |"
    lines += ["", "Fixed baselines (same benchmark, split, problems and executor):", "",
              "| baseline | n | test accuracy (95 % CI) | executor tokens | $ |", "|---|---|---|---|---|"]
    for name, s in baseline_rows.items():
        lines.append(f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} ({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}) | "
                     f"{s['executor_tokens']} | {s['cost_usd']:.4f} |")
    lines += ["", "Curate figures per iteration (problems kept / groups / mean group std / median MIL):", ""]
    for k in range(iters):
        curated = read_json(run_dir / f"iter_{k}" / "stats.json", {}).get("curate", {})
        if curated:
            lines.append(f"- iter {k}: {curated['problems_kept']}/{curated['problems']} problems, "
                         f"{curated['groups']} groups, std {curated['mean_group_std']:.3f}, MIL {curated['median_mil']:.3f}")
    return lines


# ---- per kind: which fixed workflow wins where, and how much of that the generator captures ----

def operator_sequence(code):
    """The operator calls of a workflow in the order they run (arguments before the call that
    takes them): "programmer -> format"; "(no operator)" when it calls none."""
    try:
        tree = ast.parse(code or "")
    except SyntaxError:
        return "(unparsable)"

    def calls(node):
        for child in ast.iter_child_nodes(node):
            yield from calls(child)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in operators.OPERATORS:
            yield node.func.id
    return " -> ".join(calls(tree)) or "(no operator)"


def kind_cells(scores, kinds):
    """{kind or "overall": (accuracy, CI low, CI high)} of one workflow's {problem_id: score}."""
    pids = list(kinds)
    return {k: costs.mean_ci([scores[p] for p in pids if k == "overall" or kinds[p] == k])
            for k in sorted(set(kinds.values())) + ["overall"]}


def headroom(scores, kinds):
    """scores: {fixed workflow: {problem_id: score}}, each scored on every problem of `kinds`
    ({problem_id: kind}). The best single fixed workflow (overall), the by-kind oracle (each kind's
    best fixed workflow applied to that kind) and their difference, the headroom a per-problem
    workflow could win back from fixed ones; CIs bootstrapped over the same problems, the
    headroom's paired. The oracle picks on the problems it is scored on: an optimistic bound."""
    pids, names = list(kinds), list(scores)
    missing = [(b, p) for b in names for p in pids if p not in scores[b]]
    if missing:
        raise DataError(f"fixed workflow {missing[0][0]!r} has no score for problem {missing[0][1]!r}")
    kind_list = sorted(set(kinds.values()))  # one column order in every run
    cells = {(b, k): c for b in names for k, c in kind_cells(scores[b], kinds).items()}
    best = max(names, key=lambda b: cells[b, "overall"][0])  # ties: the first listed
    choice = {k: max(names, key=lambda b: cells[b, k][0]) for k in kind_list}
    single = [scores[best][p] for p in pids]
    oracle = [scores[choice[kinds[p]]][p] for p in pids]
    s_ci, o_ci = bootstrap_ci(single), bootstrap_ci(oracle)
    return {"kinds": kind_list, "baselines": names, "cells": cells, "best": best, "choice": choice,
            "single": (statistics.fmean(single), *s_ci), "oracle": (statistics.fmean(oracle), *o_ci),
            "headroom": (statistics.fmean(oracle) - statistics.fmean(single),
                         *bootstrap_ci([o - s for o, s in zip(oracle, single)])),
            "disjoint": o_ci[0] > s_ci[1] or s_ci[0] > o_ci[1], "n": len(pids),
            "per_kind": {k: sum(1 for p in pids if kinds[p] == k) for k in kind_list}}


def headroom_table(res, others=None):
    """Markdown: fixed workflows x (kinds + overall), then `others` ({label: kind_cells}, e.g. the
    router, not candidates of the oracle); then best single, oracle, headroom."""
    cols = res["kinds"] + ["overall"]
    head = [f"{k} (n={res['per_kind'][k]})" for k in res["kinds"]] + [f"overall (n={res['n']})"]
    lines = ["| fixed workflow | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(pct(*res["cells"][b, k]) for k in cols) + " |" for b in res["baselines"]]
    lines += [f"| {b} | " + " | ".join(pct(*c[k]) for k in cols) + " |" for b, c in (others or {}).items()]
    h = res["headroom"]
    picks = ", ".join(f"{k}: {b}" for k, b in res["choice"].items())
    return lines + ["", f"- best single fixed workflow: **{res['best']}**, {pct(*res['single'])} %",
                    f"- by-kind oracle ({picks}): {pct(*res['oracle'])} %",
                    f"- headroom (oracle - best single): **{100 * h[0]:+.1f} points** (paired 95 % CI "
                    f"[{100 * h[1]:+.1f}, {100 * h[2]:+.1f}]); CIs disjoint: **{'yes' if res['disjoint'] else 'no'}**"]


def kind_section(iter_rows, baseline_rows, kinds, router=None):
    """The per-kind report from held-out rows: iter_rows {k: rows}, baseline_rows {name: rows},
    kinds {problem_id: kind}, router: the router's rows (router.py) or None. Accuracy per kind for
    each iteration, the router and each fixed workflow, and the share of the headroom each captures:
    (accuracy - best single fixed) / headroom; then the workflows each iteration writes per kind."""
    kind_list = sorted(set(kinds.values()))  # one column order in every run
    scores = {b: {r["problem_id"]: float(r["score"]) for r in rows} for b, rows in baseline_rows.items()}
    complete = {b: s for b, s in scores.items() if all(p in s for p in kinds)}
    res = headroom({b: {p: s[p] for p in kinds} for b, s in complete.items()}, kinds) if complete else None

    def accs(rows):
        by = collections.defaultdict(list)
        for r in rows:
            if r["problem_id"] in kinds:
                by[kinds[r["problem_id"]]].append(float(r["score"]))
        return [statistics.fmean(by[k]) if by[k] else None for k in kind_list], \
            statistics.fmean([x for k in kind_list for x in by[k]] or [0.0])

    def cell(x):
        return "–" if x is None else f"{100 * x:.1f}"
    lines = ["| workflows | " + " | ".join(kind_list) + " | overall | share of headroom |",
             "|---" * (len(kind_list) + 3) + "|"]
    learned = {f"iteration {k}": rows for k, rows in sorted(iter_rows.items())} | ({"router": router} if router else {})
    for label, rows in learned.items():
        per, overall = accs(rows)
        share = "–"
        if res and res["headroom"][0] > 1e-9:
            share = f"{(overall - res['single'][0]) / res['headroom'][0]:+.2f}"
        lines.append(f"| {label} | " + " | ".join(map(cell, per)) + f" | {cell(overall)} | {share} |")
    for b, rows in baseline_rows.items():
        per, overall = accs(rows)
        lines.append(f"| fixed {b} | " + " | ".join(map(cell, per)) + f" | {cell(overall)} | |")
    if res:
        lines += ["", f"Best single fixed workflow **{res['best']}** {pct(*res['single'])} %; by-kind oracle "
                  f"({', '.join(f'{k}: {b}' for k, b in res['choice'].items())}) {pct(*res['oracle'])} %; "
                  f"headroom **{100 * res['headroom'][0]:+.1f} points**."]
    entries = {str(k): rows for k, rows in sorted(iter_rows.items())} | ({"router": router} if router else {})
    return lines + ["", "Workflows (operator calls in order) written per kind and iteration, the three most "
                    "common with their share" + (" (the router: the fixed workflows it picks):" if router else ":"), ""] + \
        workflow_shares(entries, kinds)


def cost_oracle_of(baseline_rows, kinds):
    """(the fixed workflows' rows on the problems of `kinds`, costs.cost_oracle of them); only
    workflows with a row for every problem count; (rows, None) when none has."""
    on = {b: [r for r in rows if r["problem_id"] in kinds] for b, rows in baseline_rows.items()}
    fixed = {b: rows for b, rows in on.items() if {r["problem_id"] for r in rows} >= set(kinds)}
    if not fixed:
        return on, None
    return fixed, costs.cost_oracle({b: {r["problem_id"]: float(r["score"]) for r in rows} for b, rows in fixed.items()},
                                    {b: {r["problem_id"]: costs.tokens(r) for r in rows} for b, rows in fixed.items()},
                                    kinds)


def cost_section(iter_rows, baseline_rows, kinds, router=None):
    """Accuracy against executor tokens (costs.py): per kind the best fixed workflow and the
    cheapest within 1 point of it, the cost oracle and S*; then accuracy, calls and tokens per
    problem of every fixed workflow, the router and each iteration, with the share of S* each
    captures. [] when no fixed workflow covers every problem."""
    fixed, res = cost_oracle_of(baseline_rows, kinds)
    if res is None:
        return []
    methods = {f"fixed {b}": rows for b, rows in fixed.items()} | ({"router": router} if router else {})
    methods |= {f"iteration {k}": [r for r in rows if r["problem_id"] in kinds] for k, rows in sorted(iter_rows.items())}
    return costs.cost_table(res, methods)


def router_rows(cfg, problems, root="runs"):
    """router.py's held-out rows for `problems` (router.jsonl among the run's baselines, else in the
    headroom directory), in the problems' order; None when neither covers every problem."""
    for path in (baseline_path(cfg, "router", "test", cfg["eval_problems"], root),
                 headroom_dir(cfg, "test", Path(root) / "headroom") / "router.jsonl"):
        by_id = {r["problem_id"]: r for r in read_jsonl(path)} if path.is_file() else {}
        if all(p["id"] in by_id for p in problems):
            return [by_id[p["id"]] for p in problems]
    return None


def workflow_shares(entries, kinds, top=3, head="iteration"):
    """Markdown: for each entry ({label: rows}) and kind, its `top` most common workflows (operator
    sequences; an invalid one is "(invalid)") with their share of that kind's problems."""
    kind_list = sorted(set(kinds.values()))
    lines = [f"| {head} | " + " | ".join(kind_list) + " |", "|---" * (len(kind_list) + 1) + "|"]
    for label, rows in entries.items():
        seqs = collections.defaultdict(collections.Counter)
        for r in rows:
            if r["problem_id"] in kinds:
                seqs[kinds[r["problem_id"]]][operator_sequence(r["code"]) if r["valid"] else "(invalid)"] += 1
        cells = [", ".join(f"{sq} ({100 * n / sum(seqs[kind].values()):.0f} %)" for sq, n in seqs[kind].most_common(top))
                 or "–" for kind in kind_list]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# ---- figures ----

def groups_section(run_dir, bench, data_dir, iters):
    """What each iteration's groups taught, per kind of training problem (of `bench`'s train split in
    `data_dir`: --bench, --data-dir): how many problems had score variance (a group), and the workflow
    (operator sequence) with the highest and the lowest mean advantage over the group members written
    for that kind: what the update pushes up / down. A --guides member is named "(guide)": the
    generator did not write it."""
    kinds = {p["id"]: p["kind"] for p in benchmarks.load(bench, "train", data_dir) if "kind" in p}
    lines = ["| iteration | kind | problems with groups | pushed up (mean advantage, members) | pushed down |",
             "|---|---|---|---|---|"]
    for k in range(iters):
        groups_path, rollouts_path = (Path(run_dir) / f"iter_{k}" / name for name in ("groups.jsonl", "rollouts.jsonl"))
        if not (groups_path.is_file() and rollouts_path.is_file()):
            continue
        rollouts = read_jsonl(rollouts_path)
        seq = {(r["problem_id"], r["sample"]): (operator_sequence(r["code"]) if r["valid"] else "(invalid)")
               + (" (guide)" if r.get("guide") else "") for r in rollouts}
        problems = collections.defaultdict(set)
        for r in rollouts:
            problems[kinds.get(r["problem_id"], "?")].add(r["problem_id"])
        grouped, adv = collections.defaultdict(set), collections.defaultdict(list)
        for g in read_jsonl(groups_path):
            kind = kinds.get(g["problem_id"], "?")
            grouped[kind].add(g["problem_id"])
            for m in g["members"]:
                adv[kind, seq[g["problem_id"], m["sample"]]].append(m["advantage"])
        for kind in sorted(problems):
            mean = {sq: (statistics.fmean(a), len(a)) for (kd, sq), a in adv.items() if kd == kind}
            ranked = sorted(mean, key=lambda sq: mean[sq][0])
            up, down = (f"{ranked[-1]} ({mean[ranked[-1]][0]:+.2f}, {mean[ranked[-1]][1]})",
                        f"{ranked[0]} ({mean[ranked[0]][0]:+.2f}, {mean[ranked[0]][1]})") if ranked else ("–", "–")
            lines.append(f"| {k} | {kind} | {len(grouped[kind])}/{len(problems[kind])} | {up} | {down} |")
    return lines


def figures(run_dir, iter_rows, baseline_rows, kinds, router=None):
    """accuracy.png (held-out accuracy per iteration with CI bars, fixed workflows as lines),
    kinds.png (accuracy per kind per iteration, when the problems have kinds), cost.png (accuracy
    against executor tokens per problem: costs.figure; with kinds) and training.png
    (loss, KL and clip fraction per optimizer step from train_log.jsonl); the markdown that embeds
    them."""
    run_dir, out = Path(run_dir), []
    ks = sorted(iter_rows)
    if ks:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        s = [summarize(iter_rows[k]) for k in ks]
        acc = [100 * x["accuracy"] for x in s]
        err = [[a - 100 * x["ci_low"] for a, x in zip(acc, s)], [100 * x["ci_high"] - a for a, x in zip(acc, s)]]
        ax.errorbar(ks, acc, yerr=err, marker="o", capsize=4, label="generated workflows")
        for b, rows in baseline_rows.items():
            ax.axhline(100 * summarize(rows)["accuracy"], linestyle="--", linewidth=1, color=f"C{1 + len(ax.lines) % 8}",
                       label=f"fixed {b}")
        ax.set(xlabel="iteration", ylabel="held-out accuracy (%)", xticks=ks, title="held-out accuracy (95 % CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=120)
        out.append("![held-out accuracy per iteration](accuracy.png)")
    kind_list = sorted(set(kinds.values()))  # one column order in every run
    if ks and len(kind_list) > 1:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        for kind in kind_list:
            ys = [100 * statistics.fmean([float(r["score"]) for r in iter_rows[k] if kinds.get(r["problem_id"]) == kind] or [0.0])
                  for k in ks]
            ax.plot(ks, ys, marker="o", label=kind)
        ax.set(xlabel="iteration", ylabel="held-out accuracy (%)", xticks=ks, title="accuracy per kind")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "kinds.png", dpi=120)
        out.append("![accuracy per kind per iteration](kinds.png)")
    fixed, res = cost_oracle_of(baseline_rows, kinds) if len(kind_list) > 1 else ({}, None)
    if res is not None:
        costs.figure(run_dir / "cost.png", res, fixed, router, {k: [r for r in rows if r["problem_id"] in kinds]
                                                               for k, rows in iter_rows.items()})
        out.append("![accuracy against executor tokens per problem](cost.png)")
    logs = [(k, read_jsonl(p)) for k in range(max(ks, default=0) + 1) if (p := run_dir / f"iter_{k}" / "train_log.jsonl").is_file()]
    steps = [(k, r) for k, rows in logs for r in rows]
    if steps:
        fig = Figure(figsize=(9, 2.8))
        for i, key in enumerate(("loss", "kl", "clip_frac")):
            ax = fig.add_subplot(1, 3, i + 1)
            ax.plot(range(len(steps)), [r.get(key, float("nan")) for _, r in steps], marker=".")
            for j in range(1, len(steps)):  # where a new iteration's update starts
                if steps[j][0] != steps[j - 1][0]:
                    ax.axvline(j - 0.5, color="grey", linewidth=0.5)
            ax.set(xlabel="optimizer step", title=key)
        fig.tight_layout()
        fig.savefig(run_dir / "training.png", dpi=120)
        out.append("![update curves: loss, KL, clip fraction](training.png)")
    return out


def format_eval(s):
    t = s["test"]
    turns = " → ".join(["%.2f" % s["init_accuracy"]] + ["–" if x["best_of_turn"] is None else "%.2f" % x["best_of_turn"]
                                                       for x in s["per_turn"]])
    return (f"| {s['name']} | {s['turns']} | {s['candidates']} | {turns} | {s['final']['val_accuracy']:.2f} "
            f"(turn {s['final']['turn']}) | {100 * t['accuracy']:.1f} ({100 * t['ci_low']:.1f}–{100 * t['ci_high']:.1f}), "
            f"n={t['n']} | {s['executor_tokens']['refine']} + {s['executor_tokens']['test']} |")


EVAL_HEADER = ["| meta-agent | turns | actions/turn | validation accuracy: init → best of each turn | final workflow "
               "(val) | test accuracy % (95 % CI) | executor tokens (refine + test) |", "|---|---|---|---|---|---|---|"]


def refine_section(run_dir, cfg, iters, evals):
    """W4S refinement: each evaluated meta-agent's episode and final workflow; per iteration the
    actions, their validity, repairs, rewards and the groups kept."""
    lines = [f"meta-agent `{cfg['model']}`, executor `{cfg['executor']}`, benchmark `{cfg['bench']}`; "
             f"{cfg['episodes']} episodes x {cfg['turns']} turns x {cfg['candidates']} actions per iteration, "
             f"{cfg['val_problems']} validation problems, up to {cfg['max_repairs']} repairs; RWR tau {cfg['tau']}, "
             f"lr {cfg['lr']}, {cfg['epochs']} epochs.", ""] + EVAL_HEADER + [format_eval(s) for s in evals]
    lines += ["", "| iteration | actions | valid % | mean repairs | mean reward | mean val accuracy | groups kept | executor tokens |",
              "|---|---|---|---|---|---|---|---|"]
    for k in range(iters):
        stats_path = Path(run_dir) / f"iter_{k}" / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        refined, grouped = stats.get("refine"), stats.get("groups", {})
        if refined:
            lines.append(f"| {k} | {refined['candidates']} | {100 * refined['valid_fraction']:.0f} | "
                         f"{refined['mean_repairs']:.2f} | {refined['mean_reward']:.3f} | {refined['mean_accuracy']:.3f} | "
                         f"{grouped.get('groups', '–')} | {refined['executor_tokens']} |")
    return lines


def write(run_dir, cfg, iters, wall, resumed=False, baselines=None, refine_evals=None):
    """runs/<run>/report.md, rewritten whole: the run's settings and wall time, then the section of
    its mode (spogw_section or refine_section)."""
    run_dir = Path(run_dir)
    lines = [f"# spogw report: {run_dir.name}", "",
             f"Mode `{cfg['mode']}`. Wall time {wall / 60:.1f} min"
             f"{' (this invocation, which resumed an earlier one)' if resumed else ''}.", ""]
    if cfg["mode"] == "refine":
        lines += ["## W4S refinement (RWR)", ""] + refine_section(run_dir, cfg, iters, refine_evals or [])
    else:
        lines += spogw_section(run_dir, cfg, iters, baselines or {})
        problems = benchmarks.load(cfg["bench"], "test", cfg["data_dir"], limit=cfg["eval_problems"], seed=0)
        kinds = {p["id"]: p["kind"] for p in problems if "kind" in p}
        iter_rows = {k: read_jsonl(p) for k in range(iters + 1) if (p := run_dir / "eval" / f"iter_{k}.jsonl").is_file()}
        base_rows = {b: read_jsonl(p)[:cfg["eval_problems"]] for b in (baselines or {})
                     if (p := baseline_path(cfg, b, "test", cfg["eval_problems"], run_dir.parent)).is_file()}
        router = router_rows(cfg, problems, run_dir.parent)
        if len(kinds) == len(problems) and len(set(kinds.values())) > 1:
            lines += ["", "## Per kind", ""] + kind_section(iter_rows, base_rows, kinds, router)
            cost = cost_section(iter_rows, base_rows, kinds, router)
            lines += ["", "## Accuracy and executor cost", ""] + cost if cost else []
            lines += ["", "## What the groups taught", ""] + groups_section(run_dir, cfg["bench"], cfg["data_dir"], iters)
        lines += ["", "## Figures", ""] + figures(run_dir, iter_rows, base_rows, kinds, router)
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
