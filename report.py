"""Reports: accuracy with bootstrap CIs, the comparison table, and runs/<run>/report.md (ARCHITECTURE §11).

    python evaluate.py --run runs/default --compare      # every evaluated iteration + the matching baselines
    cat runs/default/report.md                           # written by train.py at the end of a run

Every accuracy is the mean score over held-out problems with a 95 % percentile bootstrap CI over
problems (summarize). Baseline rows live under runs/baselines/, shared by every run on the same
benchmark, split, problems and executor (baseline_path).
"""
import json
import random
import re
import statistics
from pathlib import Path

import config
from jsonl import read_json, read_jsonl, write_atomic

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
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
