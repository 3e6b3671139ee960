"""Rollouts -> groups with advantages (SPOGW data processing, ARCHITECTURE §6).

    python curate.py --run runs/default --iter 0                    # default: group sharpening
    python curate.py --run runs/default --iter 0 --groups all       # ablation: one group of all m

For each problem: drop it when all scores are equal (no signal); draw n-subsets of its m scored
workflows (all C(m, n) when that is <= --max-combos, else that many random ones); keep subsets
whose score variance >= --min-var; sharpen each to its top-t and bottom-t (group size 2t);
de-duplicate; keep the --groups-per-problem highest-variance groups; advantages inside each group.
"""
import argparse
import itertools
import math
import random
import statistics
import sys
from pathlib import Path

from jsonl import DataError, read_jsonl, update_json, write_jsonl_atomic

ROLLOUT_KEYS = ("problem_id", "sample", "prompt", "completion", "completion_ids", "score", "valid")


def candidate_subsets(m, n, max_combos, rng):
    """All n-subsets of range(m) when there are at most max_combos of them, else max_combos
    random ones (sampled with replacement of subsets; duplicates are harmless, de-dup follows)."""
    n = min(n, m)
    if math.comb(m, n) <= max_combos:
        return [list(c) for c in itertools.combinations(range(m), n)]
    return [sorted(rng.sample(range(m), n)) for _ in range(max_combos)]


def problem_groups(scores, mode="sharpen", n=6, group_size=4, min_var=0.01, max_combos=1000,
                   groups_per_problem=4, seed=0):
    """Index lists of the final groups for one problem's scores (the heart of §6, steps 1-3)."""
    m = len(scores)
    if m < 2 or max(scores) - min(scores) <= 1e-6:
        return []
    if mode == "all":
        return [list(range(m))]
    rng = random.Random(seed)
    t = group_size // 2
    groups = {}
    for sub in candidate_subsets(m, n, max_combos, rng):
        vals = [scores[i] for i in sub]
        if statistics.pvariance(vals) < min_var:
            continue
        if mode == "sharpen":
            # sort by score (ties by sample index, so the result is deterministic)
            ranked = sorted(sub, key=lambda i: (-scores[i], i))
            g = ranked[:t] + ranked[-t:] if len(ranked) > 2 * t else ranked
        elif mode == "random":  # same group size, members drawn without regard to score
            g = rng.sample(sub, min(2 * t, len(sub)))
        else:
            raise ValueError(f"--groups must be sharpen|all|random, got {mode!r}")
        key = tuple(sorted(g))
        if len(set(scores[i] for i in key)) > 1:  # a sharpened group can still be flat
            groups[key] = statistics.pvariance([scores[i] for i in key])
    best = sorted(groups, key=lambda k: (-groups[k], k))[:groups_per_problem]
    return [list(k) for k in best]


def interval_length(scores):
    """MIL of one group: s_(t) - s_(t+1), the gap between the t-th and (t+1)-th best score."""
    s = sorted(scores, reverse=True)
    t = len(s) // 2
    return s[t - 1] - s[t]


def shared_prompt_ids(rows, members):
    """The sampled prompt ids of a group's rollout rows, for train.sequences: {"prompt_ids": ids} when
    all rows share them (one sampling call renders a problem's prompt once), else each member gets
    its row's own (a resumed collection may have re-rendered a date-stamped template). Rows written
    before prompt ids were stored have none: training re-renders their prompt."""
    ids = [r.get("prompt_ids") for r in rows]
    if ids[0] is not None and all(x == ids[0] for x in ids):
        return {"prompt_ids": ids[0]}
    for m, x in zip(members, ids):
        if x is not None:
            m["prompt_ids"] = x
    return {}


def curate(rows, mode="sharpen", n=6, group_size=4, min_var=0.01, max_combos=1000,
           groups_per_problem=4, drop_invalid=False, seed=0):
    """rollout rows -> (group rows, stats)."""
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    out = []
    for k, (pid, rs) in enumerate(sorted(by_problem.items())):
        rs = sorted(rs, key=lambda r: r["sample"])
        if drop_invalid:
            rs = [r for r in rs if r["valid"]]
        scores = [float(r["score"]) for r in rs]
        for g in problem_groups(scores, mode, n, group_size, min_var, max_combos, groups_per_problem, seed + k):
            g_scores = [scores[i] for i in g]
            adv = advantages(g_scores)
            members = [{"sample": rs[i]["sample"], "completion": rs[i]["completion"],
                        "completion_ids": rs[i]["completion_ids"], "score": s, "advantage": a}
                       for i, s, a in zip(g, g_scores, adv)]
            group = {"problem_id": pid, "prompt": rs[0]["prompt"], "prefill": rs[0].get("prefill", "")}
            group.update(shared_prompt_ids([rs[i] for i in g], members))
            out.append({**group, "members": members,
                        "std": statistics.pstdev(g_scores), "mil": interval_length(g_scores)})
    kept = len({g["problem_id"] for g in out})
    stats = {
        "problems": len(by_problem), "problems_kept": kept, "groups": len(out),
        "mean_group_std": statistics.fmean([g["std"] for g in out]) if out else 0.0,
        "median_mil": statistics.median([g["mil"] for g in out]) if out else 0.0,
        "valid_fraction": sum(bool(r["valid"]) for r in rows) / max(len(rows), 1),
        "mean_score": statistics.fmean([float(r["score"]) for r in rows]) if rows else 0.0,
    }
    return out, stats


def add_args(ap):
    """The curate knobs, shared with train.py's driver."""
    ap.add_argument("--groups", default="sharpen", choices=["sharpen", "all", "random"])
    ap.add_argument("--n", type=int, default=6, help="subset size drawn from the m samples")
    ap.add_argument("--group-size", type=int, default=4, help="2t: top-t + bottom-t after sharpening")
    ap.add_argument("--min-var", type=float, default=0.01, help="minimum score variance of a subset")
    ap.add_argument("--max-combos", type=int, default=1000)
    ap.add_argument("--groups-per-problem", type=int, default=4)
    ap.add_argument("--drop-invalid", action="store_true", help="remove invalid workflows (default: keep as 0s)")


def run(run_dir, it, args):
    d = Path(run_dir) / f"iter_{it}"
    rows = read_jsonl(d / "rollouts.jsonl", required=ROLLOUT_KEYS)
    groups, stats = curate(rows, args.groups, args.n, args.group_size, args.min_var, args.max_combos,
                           args.groups_per_problem, args.drop_invalid, seed=it)
    write_jsonl_atomic(d / "groups.jsonl", groups)
    update_json(d / "stats.json", "curate", stats)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--iter", type=int, required=True)
    add_args(ap)
    args = ap.parse_args(argv)
    try:
        stats = run(args.run, args.iter, args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
