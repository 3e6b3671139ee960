"""Reports: accuracy with bootstrap CIs, the comparison table, and runs/<run>/report.md (ARCHITECTURE §11).

    python evaluate.py --run runs/default --compare      # every evaluated iteration + the matching baselines
    cat runs/default/report.md                           # written by train.py at the end of a run

Every accuracy is the mean score over held-out problems with a 95 % percentile bootstrap CI over
problems (summarize). Baseline rows live under runs/baselines/, shared by every run on the same
benchmark, split, problems and executor (baseline_path).
"""
import ast
import collections
import json
import random
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure

import benchmarks
import config
import operators
from jsonl import DataError, read_json, read_jsonl, write_atomic

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


def executor_tag(cfg):
    spec = cfg["executor"] or "none"
    tag = "local" if spec == "local" else re.sub(r"[^A-Za-z0-9]+", "_", f"{spec}-{cfg['executor_model']}").strip("_")
    cap = config.call_tokens(cfg)  # a different reply cap is a different executor
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


def spogw_section(run_dir, cfg, iters, baseline_rows):
    """Per iteration: train validity and score, held-out accuracy with its CI, cost; the fixed
    baselines; the curate figures."""
    lines = [f"generator `{cfg['model']}`, executor `{cfg['executor']}`"
             f"{' / ' + cfg['executor_model'] if cfg['executor_model'] else ''}, benchmark `{cfg['bench']}`, "
             f"loss `{cfg['loss']}` (kl {cfg['kl']}, ref {cfg['ref']}, beta {cfg['beta']}), groups `{cfg['groups']}` "
             f"(m={cfg['m']}, n={cfg['n']}, 2t={cfg['group_size']}), {cfg['problems']} problems/iteration, "
             f"lr {cfg['lr']}, {cfg['epochs']} epochs.", "",
             "| iteration | valid % (train) | mean train score | test accuracy (95 % CI) | test valid % | executor tokens (train+test) | $ | wall (collect+train) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in range(iters + 1):
        stats = read_json(run_dir / f"iter_{k}" / "stats.json", {})
        c = stats.get("collect", {})
        ev = run_dir / "eval" / f"iter_{k}.jsonl"
        s = summarize(read_jsonl(ev)) if ev.is_file() else None
        acc = f"{100 * s['accuracy']:.1f} ({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f})" if s else "–"
        toks = c.get("executor_tokens", 0) + (s["executor_tokens"] if s else 0)
        cost = c.get("cost_usd", 0.0) + (s["cost_usd"] if s else 0.0)
        wall_k = c.get("seconds", 0.0) + stats.get("train", {}).get("seconds", 0.0)
        lines.append(f"| {k} | {100 * c['valid_fraction']:.0f} | {c['mean_score']:.3f} | " if c else f"| {k} | – | – | ")
        lines[-1] += f"{acc} | {100 * s['valid']:.0f} | {toks} | {cost:.4f} | {wall_k / 60:.1f} min |" if s else f"{acc} | – | {toks} | {cost:.4f} | {wall_k / 60:.1f} min |"
    lines += ["", "Fixed baselines (same benchmark, split, problems and executor):", "",
              "| baseline | n | test accuracy (95 % CI) | executor tokens | $ |", "|---|---|---|---|---|"]
    for name, s in baseline_rows.items():
        lines.append(f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} ({100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}) | "
                     f"{s['executor_tokens']} | {s['cost_usd']:.4f} |")
    lines += ["", "Curate figures per iteration (problems kept / groups / mean group std / median MIL):", ""]
    for k in range(iters):
        cu = read_json(run_dir / f"iter_{k}" / "stats.json", {}).get("curate", {})
        if cu:
            lines.append(f"- iter {k}: {cu['problems_kept']}/{cu['problems']} problems, {cu['groups']} groups, "
                         f"std {cu['mean_group_std']:.3f}, MIL {cu['median_mil']:.3f}")
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
    cells = {}
    for b in names:
        for k in kind_list + ["overall"]:
            xs = [scores[b][p] for p in pids if k == "overall" or kinds[p] == k]
            cells[b, k] = (statistics.fmean(xs), *bootstrap_ci(xs))
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


def pct(mean, lo, hi):
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def headroom_table(res):
    """Markdown: fixed workflows x (kinds + overall); then best single, oracle, headroom."""
    cols = res["kinds"] + ["overall"]
    head = [f"{k} (n={res['per_kind'][k]})" for k in res["kinds"]] + [f"overall (n={res['n']})"]
    lines = ["| fixed workflow | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(pct(*res["cells"][b, k]) for k in cols) + " |" for b in res["baselines"]]
    h = res["headroom"]
    picks = ", ".join(f"{k}: {b}" for k, b in res["choice"].items())
    return lines + ["", f"- best single fixed workflow: **{res['best']}**, {pct(*res['single'])} %",
                    f"- by-kind oracle ({picks}): {pct(*res['oracle'])} %",
                    f"- headroom (oracle - best single): **{100 * h[0]:+.1f} points** (paired 95 % CI "
                    f"[{100 * h[1]:+.1f}, {100 * h[2]:+.1f}]); CIs disjoint: **{'yes' if res['disjoint'] else 'no'}**"]


def kind_section(iter_rows, baseline_rows, kinds):
    """The per-kind report from held-out rows: iter_rows {k: rows}, baseline_rows {name: rows},
    kinds {problem_id: kind}. Accuracy per kind for each iteration and fixed workflow, the workflow
    each iteration writes most often for each kind, and the share of the headroom it captures:
    (iteration k - best single fixed) / headroom."""
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
    for k, rows in sorted(iter_rows.items()):
        per, overall = accs(rows)
        share = "–"
        if res and res["headroom"][0] > 1e-9:
            share = f"{(overall - res['single'][0]) / res['headroom'][0]:+.2f}"
        lines.append(f"| iteration {k} | " + " | ".join(map(cell, per)) + f" | {cell(overall)} | {share} |")
    for b, rows in baseline_rows.items():
        per, overall = accs(rows)
        lines.append(f"| fixed {b} | " + " | ".join(map(cell, per)) + f" | {cell(overall)} | |")
    if res:
        lines += ["", f"Best single fixed workflow **{res['best']}** {pct(*res['single'])} %; by-kind oracle "
                  f"({', '.join(f'{k}: {b}' for k, b in res['choice'].items())}) {pct(*res['oracle'])} %; "
                  f"headroom **{100 * res['headroom'][0]:+.1f} points**."]
    lines += ["", "Most common workflow (operator calls in order) per kind and iteration, with its share:", "",
              "| iteration | " + " | ".join(kind_list) + " |", "|---" * (len(kind_list) + 1) + "|"]
    for k, rows in sorted(iter_rows.items()):
        seqs = collections.defaultdict(collections.Counter)
        for r in rows:
            if r["problem_id"] in kinds:
                seqs[kinds[r["problem_id"]]][operator_sequence(r["code"]) if r["valid"] else "(invalid)"] += 1
        tops = [seqs[kind].most_common(1)[0] if seqs[kind] else None for kind in kind_list]
        lines.append(f"| {k} | " + " | ".join("–" if t is None else f"{t[0]} ({100 * t[1] / sum(seqs[kind].values()):.0f} %)"
                                                for kind, t in zip(kind_list, tops)) + " |")
    return lines


# ---- figures ----

def groups_section(run_dir, cfg, iters):
    """What each iteration's groups taught, per kind of training problem: how many problems had
    score variance (a group), and the workflow (operator sequence) with the highest and the lowest
    mean advantage over the group members written for that kind: what the update pushes up / down."""
    kinds = {p["id"]: p["kind"] for p in benchmarks.load(cfg["bench"], "train", cfg["data_dir"]) if "kind" in p}
    lines = ["| iteration | kind | problems with groups | pushed up (mean advantage, members) | pushed down |",
             "|---|---|---|---|---|"]
    for k in range(iters):
        gp, rp = Path(run_dir) / f"iter_{k}" / "groups.jsonl", Path(run_dir) / f"iter_{k}" / "rollouts.jsonl"
        if not (gp.is_file() and rp.is_file()):
            continue
        rollouts = read_jsonl(rp)
        seq = {(r["problem_id"], r["sample"]): operator_sequence(r["code"]) if r["valid"] else "(invalid)"
               for r in rollouts}
        problems = collections.defaultdict(set)
        for r in rollouts:
            problems[kinds.get(r["problem_id"], "?")].add(r["problem_id"])
        grouped, adv = collections.defaultdict(set), collections.defaultdict(list)
        for g in read_jsonl(gp):
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


def figures(run_dir, iter_rows, baseline_rows, kinds):
    """accuracy.png (held-out accuracy per iteration with CI bars, fixed workflows as lines),
    kinds.png (accuracy per kind per iteration, when the problems have kinds) and training.png
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
    lines = [             f"meta-agent `{cfg['model']}`, executor `{cfg['executor']}`, benchmark `{cfg['bench']}`; "
             f"{cfg['episodes']} episodes x {cfg['turns']} turns x {cfg['candidates']} actions per iteration, "
             f"{cfg['val_problems']} validation problems, up to {cfg['max_repairs']} repairs; RWR tau {cfg['tau']}, "
             f"lr {cfg['lr']}, {cfg['epochs']} epochs.", ""] + EVAL_HEADER + [format_eval(s) for s in evals]
    lines += ["", "| iteration | actions | valid % | mean repairs | mean reward | mean val accuracy | groups kept | executor tokens |",
              "|---|---|---|---|---|---|---|---|"]
    for k in range(iters):
        p = Path(run_dir) / f"iter_{k}" / "stats.json"
        stats = json.loads(p.read_text()) if p.is_file() else {}
        r, g = stats.get("refine"), stats.get("groups", {})
        if r:
            lines.append(f"| {k} | {r['candidates']} | {100 * r['valid_fraction']:.0f} | {r['mean_repairs']:.2f} | "
                         f"{r['mean_reward']:.3f} | {r['mean_accuracy']:.3f} | {g.get('groups', '–')} | {r['executor_tokens']} |")
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
        if len(kinds) == len(problems) and len(set(kinds.values())) > 1:
            lines += ["", "## Per kind", ""] + kind_section(iter_rows, base_rows, kinds)
            lines += ["", "## What the groups taught", ""] + groups_section(run_dir, cfg, iters)
        lines += ["", "## Figures", ""] + figures(run_dir, iter_rows, base_rows, kinds)
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
