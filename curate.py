"""Rollouts -> groups with advantages (SPOGW data processing, ARCHITECTURE §6).

    python curate.py --run runs/default --iter 0                    # default: group sharpening
    python curate.py --run runs/default --iter 0 --groups all       # ablation: one group of all m
    python curate.py --run runs/w4s --iter 0 --mode refine          # W4S: one group per refinement turn
    python curate.py --run runs/mixed --iter 0 --cost-weight 0.3    # score = correct - 0.3 * relative cost

A rollout's score is its correctness minus --cost-weight times its executor tokens in units of a
reference fixed workflow's mean (reward; rollout.cost_reference). For each problem: drop it when
all scores are equal (no signal); draw n-subsets of its m scored workflows (all C(m, n) when that is <= --max-combos, else that many random ones); keep subsets
whose score variance >= --min-var; sharpen each to its top-t and bottom-t (group size 2t);
de-duplicate; keep the --groups-per-problem highest-variance groups; advantages inside each group.
"""
import argparse
import itertools
import math
import random
import statistics
from pathlib import Path

import config
import losses
import refine
import rollout
from jsonl import read_jsonl, update_json, write_jsonl_atomic

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


def cost(row, ref_tokens):
    """Executor tokens (prompt + completion) of one run of the row's workflow, in units of
    `ref_tokens`. An invalid workflow ran nothing, but is charged one unit: at zero cost it would
    outscore every valid wrong answer, and the update would learn to write broken code."""
    if not row["valid"]:
        return 1.0
    runs = max(1, len(row.get("scores") or [0]))
    return (row["prompt_tokens"] + row["completion_tokens"]) / runs / ref_tokens


def reward(row, cost_weight=0.0, ref_tokens=None, cost_on="all"):
    """The score a group compares. cost_on "all": correctness (the scorer's, mean over runs) - lambda
    * cost, the papers' utility (MaAS): in a group where every workflow is wrong, cost alone ranks
    them and the cheapest wrong answer gets the positive advantage. "correct": correctness *
    max(0, 1 - lambda * cost): only a right answer is paid for, a wrong one scores 0 whatever it
    spent (such a group has no variance and is dropped), and a right one never scores below it.
    The rollout row keeps both parts, so any lambda and either rule can be curated again."""
    if not cost_weight:
        return float(row["score"])
    if cost_on == "correct":
        return float(row["score"]) * max(0.0, 1.0 - cost_weight * cost(row, ref_tokens))
    return float(row["score"]) - cost_weight * cost(row, ref_tokens)


def curate(rows, mode="sharpen", n=6, group_size=4, min_var=0.01, max_combos=1000,
           groups_per_problem=4, drop_invalid=False, seed=0, cost_weight=0.0, ref_tokens=None, std_floor=0.0,
           cost_on="all"):
    """rollout rows -> (group rows, stats). Members' `score` is the reward (correctness - lambda *
    cost); `correct` and `cost` are its parts."""
    if cost_weight and not ref_tokens:
        raise ValueError("a cost weight needs the reference workflow's mean tokens (ref_tokens > 0)")
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    out = []
    for k, (pid, rs) in enumerate(sorted(by_problem.items())):
        rs = sorted(rs, key=lambda r: r["sample"])
        if drop_invalid:
            rs = [r for r in rs if r["valid"]]
        scores = [reward(r, cost_weight, ref_tokens, cost_on) for r in rs]
        for g in problem_groups(scores, mode, n, group_size, min_var, max_combos, groups_per_problem,
                                config.seed_of(seed, k)):
            g_scores = [scores[i] for i in g]
            adv = losses.advantages(g_scores, std_floor)
            members = [{"sample": rs[i]["sample"], "completion": rs[i]["completion"],
                        "completion_ids": rs[i]["completion_ids"], "score": s, "advantage": a,
                        **({"guide": True} if rs[i].get("guide") else {}),
                        **({"correct": float(rs[i]["score"]), "cost": cost(rs[i], ref_tokens)} if cost_weight else {})}
                       for i, s, a in zip(g, g_scores, adv)]
            group = {"problem_id": pid, "prompt": rs[0]["prompt"], "prefill": rs[0].get("prefill", "")}
            group.update(shared_prompt_ids([rs[i] for i in g], members))
            out.append({**group, "members": members,
                        "std": statistics.pstdev(g_scores), "mil": interval_length(g_scores)})
    kept = len({g["problem_id"] for g in out})
    sampled = [r for r in rows if not r.get("guide")]  # the generator's own rows (--guides adds fixed ones)
    stats = {
        "problems": len(by_problem), "problems_kept": kept, "groups": len(out),
        "mean_group_std": statistics.fmean([g["std"] for g in out]) if out else 0.0,
        "median_mil": statistics.median([g["mil"] for g in out]) if out else 0.0,
        "valid_fraction": sum(bool(r["valid"]) for r in sampled) / max(len(sampled), 1),
        "mean_score": statistics.fmean([float(r["score"]) for r in sampled]) if sampled else 0.0,
    }
    if cost_weight:
        stats.update(cost_weight=cost_weight, ref_tokens=ref_tokens,
                     mean_cost=statistics.fmean([cost(r, ref_tokens) for r in sampled]) if sampled else 0.0)
    return out, stats


def run(run_dir, it, cfg, ref_tokens=None):
    """iter_<it>/rollouts.jsonl -> iter_<it>/groups.jsonl (and the curate stats), with cfg's knobs.
    ref_tokens: the cost unit (rollout.cost_reference), needed when cfg["cost_weight"] > 0."""
    iter_dir = Path(run_dir) / f"iter_{it}"
    rows = read_jsonl(iter_dir / "rollouts.jsonl", required=ROLLOUT_KEYS)
    groups, stats = curate(rows, cfg["groups"], cfg["n"], cfg["group_size"], cfg["min_var"], cfg["max_combos"],
                           cfg["groups_per_problem"], bool(cfg["drop_invalid"]),
                           seed=config.seed_of(cfg["seed"], "groups", it), cost_weight=cfg["cost_weight"],
                           ref_tokens=ref_tokens, std_floor=config.std_floor(cfg), cost_on=cfg["cost_on"])
    write_jsonl_atomic(iter_dir / "groups.jsonl", groups)
    update_json(iter_dir / "stats.json", "curate", stats)
    return stats


def refine_groups(run_dir, it):
    """iter_<it>/refine.jsonl -> iter_<it>/groups.jsonl: one group per (episode, turn), members = its
    valid candidates (a repaired one with its final action, under the turn's state prompt: RWR learns
    to write the working version directly), score = W4S reward, advantage 0 (unused by rwr).
    Candidates skipped after their repairs are not members: exp(r/0.4) weights every member, and with
    rewards 0 and -0.1 a broken action kept ~17 % of a group's weight -- one RWR update on such groups
    taught the meta-agent invented operator names (0/6 valid actions). A turn with fewer than two
    members or equal rewards is dropped: RWR would only imitate it as it is."""
    iter_dir = Path(run_dir) / f"iter_{it}"
    rows = read_jsonl(iter_dir / "refine.jsonl", required=refine.ROW_KEYS)
    by_turn = {}
    for r in rows:
        if r["kind"] == "candidate":
            by_turn.setdefault((r["episode"], r["turn"]), []).append(r)
    groups, dropped = [], 0
    for (e, t), rs in sorted(by_turn.items()):
        rs = sorted((r for r in rs if r["valid"]), key=lambda r: r["candidate"])
        rewards = [r["reward"] for r in rs]
        if len(rs) < 2 or max(rewards) - min(rewards) <= 1e-6:
            dropped += 1
            continue
        top = sorted(rewards, reverse=True)
        members = [{"sample": r["candidate"], "completion": r["completion"], "completion_ids": r["completion_ids"],
                    "score": r["reward"], "advantage": 0.0, "accuracy": r["accuracy"], "repairs": r["repairs"]} for r in rs]
        groups.append({"problem_id": f"refine-e{e}-t{t}", "prompt": rs[0]["prompt"], "prefill": rs[0]["prefill"],
                       **shared_prompt_ids(rs, members), "members": members,
                       "std": statistics.pstdev(rewards), "mil": top[0] - top[1]})
    write_jsonl_atomic(iter_dir / "groups.jsonl", groups)
    stats = {"groups": len(groups), "dropped_equal_rewards": dropped, "members": sum(len(g["members"]) for g in groups)}
    update_json(iter_dir / "stats.json", "groups", stats)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (its config.json supplies the knobs not given)")
    ap.add_argument("--iter", type=int, required=True)
    config.add_knobs(ap, ("run", "curate"))
    args = ap.parse_args(argv)

    def body():
        cfg = config.merge(args.run, args, ("run", "curate"))
        if cfg["mode"] == "refine":
            return refine_groups(args.run, args.iter)
        ref = None
        if cfg["cost_weight"]:  # the cost unit, with the run's executor (measured once, then read back)
            ref = rollout.cost_reference(args.run, {**config.merge(args.run, argparse.Namespace(), ("collect",)), **cfg})
        return run(args.run, args.iter, cfg, ref)
    stats = config.cli(body)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
