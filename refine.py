"""W4S-style multi-turn workflow refinement, trained with reward-weighted regression (ARCHITECTURE §7).

    python collect.py  --mode refine --run runs/w4s --iter 0                  # iteration 0's episodes
    python train.py    --mode refine --loss rwr --run runs/w4s --iter 2       # (collect -> groups -> RWR) x 2, eval
    python evaluate.py --mode refine --run runs/w4s --iter 2 --turns 3        # T turns with iteration 2's meta-agent
    python train.py    --mode refine --run runs/w4s-smoke --iter 1 --smoke    # the whole loop, tiny

Here the generator is a *meta-agent*: it does not write one workflow per problem, it improves the
workflow of a whole task (a benchmark) from validation feedback. An episode:
  state 0  = the io baseline and its accuracy on a batch of `--val-problems` validation problems;
  turn t   : the meta-agent reads the state (task, example workflows, the current workflow, its
             accuracy, a few failure cases, "accuracy went from X to Y") and samples `--candidates`
             actions (a new solve(problem) in one ```python block, then a one-sentence analysis);
             each is checked statically and run on one validation problem; when that fails (invalid,
             raises, crashes) the meta-agent sees the error and tries again, `--max-repairs` times at
             most, then the candidate is skipped (accuracy 0). Survivors are scored on the batch; the
             best becomes the current workflow of turn t+1.
Reward of a candidate (w4s_reward): 1 if it beats the best accuracy so far, 0.5 if it beats the
current workflow, else 0; 0.1 less when its accuracy is below 0.3.

Files of iteration K: iter_K/refine.jsonl (one row per candidate as it finishes, plus one "init" row
per episode at turn -1), iter_K/refine_val.jsonl (one row per candidate x validation problem),
iter_K/groups.jsonl (curate.refine_groups: one group per turn, score = reward: what train.update(loss="rwr")
reads). Resumable: a turn's candidates come from a seed per (iteration, episode, turn), its repairs
from one per (candidate, round), and the state of turn t is rebuilt from the rows of turns < t, so a
restarted run regenerates the same candidates and only runs what is missing.
"""
import hashlib
import statistics
import time
from pathlib import Path

from tqdm import tqdm

import benchmarks
import config
import executor
import generator
import operators
import report
import rollout
import sandbox
import scorers
import workflow
from jsonl import DataError, append_jsonl, read_jsonl, truncate_torn_tail, write_json_atomic

# The action starts inside the block, at the first operator call, like the SPOGW generator's
# (workflow.PREFILLS): a 135M meta-agent left to open the block itself mostly chats, and one started
# at an "# Analysis:" comment wrote prose and solve_recursively() code (0/6 valid candidates). So
# W4S's analysis comes after the block, as one sentence; the checker never sees it.


# self-check errors that the code caused and the meta-agent can fix; timeouts and budget errors are
# scored as they are (a slow workflow is not a broken one)
REPAIRABLE = ("invalid:", "syntax:", "exception:", "crash:", "bad output:")
# W4S shows io, cot and cot_sc; where the task family has a programmer operator its fixed baseline is
# shown too, last, because a 135M meta-agent copies the last example. With only W4S's three, it
# copies cot_sc, which scores 0 on arith: every candidate of a turn then earns the same reward, and
# RWR learns nothing from a turn whose rewards are equal (curate.refine_groups drops it).
EXAMPLES = ("io", "cot", "cot_sc", "programmer")
TASKS = {
    "arith": "Arithmetic questions: one or two operations, sometimes a one-sentence word problem. "
             "The answer is an integer.",
    "mixed": "Three kinds of question: arithmetic (the answer is a number), is a review positive or negative, "
             "and yes/no questions about stated facts. Each question says how to answer.",
    "gsm8k": "Grade-school math word problems. The answer is a number.",
    "math": "Competition math problems. The answer is a number or an expression.",
    "hotpotqa": "Questions that need facts from two paragraphs given with the question. The answer is a short phrase.",
    "drop": "Reading comprehension with counting and arithmetic over a passage. The answer is a number or a short phrase.",
    "humaneval": "Write the Python function described by a signature and docstring; hidden unit tests check it.",
    "mbpp": "Write the Python function described in a sentence; hidden unit tests check it.",
}
ROW_KEYS = ("kind", "episode", "turn", "candidate", "code", "valid", "accuracy")


def w4s_reward(acc, best_so_far, prev):
    """W4S reward of one candidate: 1 if it beats the best accuracy so far, 0.5 if it beats the
    previous turn's workflow, else 0; 0.1 less when acc < 0.3 (a workflow that runs but does not
    work is still a bad action)."""
    r = 1.0 if acc > best_so_far + 1e-9 else 0.5 if acc > prev + 1e-9 else 0.0
    return r - 0.1 if acc < 0.3 else r


# ---- the state prompt -----------------------------------------------------------------------------

def shorten(s, n):
    """At most n characters of s for a prompt, '...' where cut."""
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[:n] + "..."


def failure_cases(val_rows, problems, k=3):
    """The first k problems of the batch the workflow got wrong: problem, expected answer, what came out."""
    by_id = {p["id"]: p for p in problems}
    out = []
    for v in val_rows:
        if v["score"] >= 1.0 - 1e-9 or len(out) >= k:
            continue
        p = by_id[v["problem_id"]]
        got = v["answers"][0] if v["answers"][0] is not None else f"(error) {v['errors'][0]}"
        out.append({"problem": shorten(p["problem"], 300), "expected": shorten(p.get("answer"), 100) or None,
                    "got": shorten(got, 200)})
    return out


def state_prompt(bench, state, max_calls):
    """Chat messages of one state: task, operators, example workflows, the current workflow and its
    feedback, the rules, the request for an analysis plus a new workflow."""
    fam = benchmarks.family(bench)
    catalogue = workflow.catalogue(operators.OPERATOR_SETS[fam])
    examples = "\n".join(f"{name}:\n```python\n{workflow.BASELINES[fam][name]}```"
                         for name in EXAMPLES if name in workflow.BASELINES[fam])
    h = state["history"]
    change = f"accuracy went from {h[-2]:.2f} to {h[-1]:.2f}" if len(h) > 1 else "the starting workflow"
    fails = "\n".join(f"- problem: {f['problem']}\n  expected: {f['expected']}\n  got: {f['got']}"
                      if f["expected"] is not None else f"- problem: {f['problem']}\n  got: {f['got']}"
                      for f in state["failures"])
    user = (f"Task: {TASKS.get(bench, bench)}\n\nOperators:\n{catalogue}\n\nExample workflows:\n{examples}\n\n"
            f"Current workflow (turn {state['turn']}):\n```python\n{state['code']}```\n"
            f"Validation accuracy: {state['accuracy']:.2f} on {state['n']} problems ({change}; "
            f"best so far {state['best']:.2f}).\nFailure cases:\n{fails or '- none'}\n\n"
            f"Rules: define only solve(problem); call only the operators above and simple builtins; no import; "
            f"at most {max_calls} operator calls; loops only over range(N); the workflow must work for every "
            f"problem of the task, so never copy numbers or text from a problem.\n\n"
            f"Write a better workflow in one ```python block, then one sentence: why the current one fails "
            f"and what you changed.")
    return [{"role": "system", "content": "You improve Python workflows. A workflow is a function solve(problem) "
                                          "that solves a problem by calling operators; each operator asks a "
                                          "language model and returns a string."},
            {"role": "user", "content": user}]


def first_solve(code):
    """The first top-level `def solve` of the block and its body. A small meta-agent often goes on
    after the workflow (more functions, "# Example workflow:" copies); those lines are not the
    action's workflow, so they are neither checked nor run. The completion stays verbatim."""
    lines = code.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("def solve")), None)
    if start is None:
        return code
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
        end += 1
    return "\n".join(lines[start:end]).rstrip() + "\n"


def repair_message(error):
    return (f"Running this workflow on a validation problem failed:\n{shorten(error, 1500)}\n\n"
            f"Fix it. Answer with the corrected workflow as one ```python block.")


def episode_state(rows, turn):
    """The state at `turn`, rebuilt from one episode's rows of turns < turn (the init row is turn -1):
    the current workflow is the best valid candidate of the latest turn that had one."""
    init = [r for r in rows if r["turn"] == -1]
    if not init:
        raise DataError(f"episode {rows[0]['episode'] if rows else '?'}: no init row")
    cur = init[0]
    history, best = [cur["accuracy"]], cur["accuracy"]
    for u in range(turn):
        valid = [r for r in rows if r["turn"] == u and r["valid"]]
        if valid:
            cur = max(valid, key=lambda r: (r["accuracy"], -r["candidate"]))
            history.append(cur["accuracy"])
            best = max(best, cur["accuracy"])
    return {"turn": turn, "code": cur["code"], "accuracy": cur["accuracy"], "failures": cur["failures"],
            "n": cur["n_val"], "history": history, "best": best}


def best_workflow(rows):
    """The episode's best workflow on validation (init included); ties go to the earliest."""
    pool = [r for r in rows if r["valid"]]
    return max(pool, key=lambda r: (r["accuracy"], -r["turn"], -r["candidate"]))


# ---- one turn -------------------------------------------------------------------------------------

def self_check_and_repair(msgs, samples, todo, problem, cfg, ex, propose, seed_base):
    """Static check + one sandbox run on `problem` for each candidate in `todo`; a repairable failure
    is shown to the meta-agent (the conversation grows by the failed action and the error) and the
    new action replaces it, at most cfg['max_repairs'] times. Rounds run the pending candidates'
    sandboxes together; each candidate's repairs have their own seeds, so a resumed run that redoes
    only some candidates gets the same actions. Returns {c: outcome}."""
    fam = benchmarks.family(cfg["bench"])
    prefill = workflow.PREFILLS[fam]
    ops, reply_cap = {k: operators.OPERATORS[k] for k in operators.OPERATOR_SETS[fam]}, config.call_tokens(cfg)
    # prompt_ids stay those of the turn's state prompt through repairs: RWR trains the final action on it
    cands = {c: {"conv": msgs, "completion": samples[c]["text"], "completion_ids": samples[c]["token_ids"],
              "prompt_ids": samples[c].get("prompt_ids"), "hit_cap": samples[c].get("hit_cap"),
              "attempts": [], "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "seconds": 0.0}
          for c in todo}
    pending = list(todo)
    for rnd in range(cfg["max_repairs"] + 1):
        errs, runs = {}, []
        for c in pending:
            cand = cands[c]
            code = scorers.extract_code(prefill + cand["completion"])
            cand["code"] = None if code is None else first_solve(code)
            ok, reason = (False, "no python block") if cand["code"] is None else workflow.check_workflow(
                cand["code"], problem["problem"], allowed_ops=operators.OPERATOR_SETS[fam], max_calls=cfg["max_calls"])
            if ok:
                runs.append(c)
            else:
                errs[c] = f"invalid: {reason}"
        jobs = [operators.job(cands[c]["code"], problem["problem"], executor=ex, operators=ops,
                              context=rollout.run_context(problem, reply_cap), timeout=cfg["timeout"], max_calls=cfg["max_calls"])
                for c in runs]
        for k, res in sandbox.run_many(jobs, workers=cfg["workers"]):
            if res["infra_error"]:  # the endpoint failed, not the candidate: stop, a rerun redoes this turn
                raise executor.InfraError(res["infra_error"])
            cand = cands[runs[k]]
            for key in ("prompt_tokens", "completion_tokens", "cost_usd", "seconds"):
                cand[key] += res[key]
            errs[runs[k]] = res["error"]
        again = []
        for c in pending:
            cand, err = cands[c], errs.get(c)
            cand["valid"], cand["reason"] = True, None
            if err is None or not err.startswith(REPAIRABLE):
                continue  # runs (or fails in a way that is not the code's fault): scored on the batch
            if rnd == cfg["max_repairs"]:
                cand["valid"], cand["reason"] = False, f"skipped after {rnd} repairs: {shorten(err, 300)}"
                continue
            cand["attempts"].append({"completion": cand["completion"], "error": shorten(err, 1500)})
            cand["conv"] = cand["conv"] + [{"role": "assistant", "content": prefill + cand["completion"]},
                                           {"role": "user", "content": repair_message(err)}]
            again.append(c)
        for c in again:
            new = propose([cands[c]["conv"]], 1, config.seed_of(seed_base, c, rnd))[0][0]
            cands[c]["completion"], cands[c]["completion_ids"], cands[c]["hit_cap"] = new["text"], new["token_ids"], new.get("hit_cap")
        pending = again
        if not pending:
            break
    return cands


def score_on_batch(cands, problems, cfg, ex, val_file, val_done, on_done):
    """Score each candidate {key: (episode, turn, candidate), code} on the validation batch through
    rollout.execute (same sandbox pool and scorer as SPOGW); per-problem rows are appended to `val_file`
    and remembered in `val_done`; on_done(cand, rows in batch order) fires when a candidate is complete."""
    ids = [p["id"] for p in problems]
    left, rows = {}, []
    for c in cands:
        miss = [pid for pid in ids if (*c["key"], pid) not in val_done]
        left[c["key"]] = len(miss)
        rows += [{"episode": c["key"][0], "turn": c["key"][1], "candidate": c["key"][2], "problem_id": pid,
                  "code": c["code"], "valid": True, "reason": None} for pid in miss]
    by_key = {c["key"]: c for c in cands}

    def progress(row):
        key = (row["episode"], row["turn"], row["candidate"])
        val_done[(*key, row["problem_id"])] = row
        left[key] -= 1
        if left[key] == 0:
            on_done(by_key[key], [val_done[(*key, pid)] for pid in ids])

    for c in cands:
        if left[c["key"]] == 0:
            on_done(c, [val_done[(*c["key"], pid)] for pid in ids])
    if rows:
        scored = rollout.execute(rows, problems, cfg, ex, val_file, progress)
        rollout.require_scored(scored, val_file.name)


def _tokens(row, extra):
    return {k: row.get(k, 0) + sum(v[k] for v in extra) for k in ("prompt_tokens", "completion_tokens", "cost_usd")}


def run_episodes(out, val_out, episodes, cfg, ex, propose, tag, turns, n, progress=None):
    """Run (or finish) episodes [(episode id, validation problems)] of `turns` turns with `n` actions
    per turn. Candidate rows go to `out`, per-problem rows to `val_out`, each appended as it finishes.
    Returns all rows of `out`."""
    fam = benchmarks.family(cfg["bench"])
    out, val_out = Path(out), Path(val_out)
    done, val_done = _resume(out, val_out, n)
    with open(out, "a", encoding="utf-8") as f, open(val_out, "a", encoding="utf-8") as val_file:
        def emit(row):
            append_jsonl(f, row)
            done[(row["episode"], row["turn"], row["candidate"])] = row
            if progress:
                progress(row)

        for ep, problems in episodes:
            if (ep, -1, 0) not in done:  # state 0: the io baseline, scored like any candidate
                code = workflow.BASELINES[fam]["io"]
                score_on_batch([{"key": (ep, -1, 0), "code": code}], problems, cfg, ex, val_file, val_done,
                               lambda c, vr: emit(_init_row(ep, code, vr, problems)))
            for t in range(turns):
                todo = [c for c in range(n) if (ep, t, c) not in done]
                if not todo:
                    continue
                # the state is rebuilt from the rows of turns < t and the seed is fixed per turn, so
                # a resumed turn samples the same candidates and runs only the missing ones
                state = episode_state([r for k, r in done.items() if k[0] == ep], t)
                msgs = state_prompt(cfg["bench"], state, cfg["max_calls"])
                seed = config.seed_of(cfg["seed"], tag, ep, t)
                samples = propose([msgs], n, seed)[0]
                cands = self_check_and_repair(msgs, samples, todo, problems[0], cfg, ex, propose, seed)
                turn = {"candidates": n, "seed": seed, "prompt": msgs, "prefill": workflow.PREFILLS[fam]}

                def row_of(c, vr):
                    return _candidate_row(ep, t, c, turn, cands[c], vr, state, problems)

                for c in todo:
                    if not cands[c]["valid"]:
                        emit(row_of(c, []))
                score_on_batch([{"key": (ep, t, c), "code": cands[c]["code"]} for c in todo if cands[c]["valid"]],
                               problems, cfg, ex, val_file, val_done, lambda c, vr: emit(row_of(c["key"][2], vr)))
    return read_jsonl(out, required=ROW_KEYS)


def _resume(out, val_out, n):
    """What earlier runs finished: ({(episode, turn, candidate): row}, {(episode, turn, candidate,
    problem id): per-problem row}). Rows made with another number of candidates per turn stop the run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in (out, val_out):
        truncate_torn_tail(p)  # a kill mid-write leaves half a row: it will be redone
    rows = read_jsonl(out, required=ROW_KEYS) if out.exists() else []
    bad = [r for r in rows if r["kind"] == "candidate" and r["candidates"] != n]
    if bad:
        raise DataError(f"{out}: rows were made with {bad[0]['candidates']} candidates per turn, now {n}; "
                        f"pass the same number or use a new run")
    done = {(r["episode"], r["turn"], r["candidate"]): r for r in rows}
    val_done = {(v["episode"], v["turn"], v["candidate"], v["problem_id"]): v
                for v in (read_jsonl(val_out) if val_out.exists() else [])}
    return done, val_done


def _init_row(ep, code, val_rows, problems):
    """The row of an episode's state 0: the io baseline scored on the batch."""
    return {"kind": "init", "episode": ep, "turn": -1, "candidate": 0, "code": code,
            "valid": True, "reason": None, "n_val": len(val_rows),
            "accuracy": statistics.fmean(v["score"] for v in val_rows),
            "failures": failure_cases(val_rows, problems), **_tokens({}, val_rows),
            "seconds": sum(v["seconds"] for v in val_rows)}


def _candidate_row(ep, t, c, turn, cand, val_rows, state, problems):
    """The row of candidate c of turn t: its action, repairs and accuracy on the batch (none when it
    stayed invalid), and its reward against the state the turn started from."""
    acc = statistics.fmean(v["score"] for v in val_rows) if val_rows else 0.0
    return {"kind": "candidate", "episode": ep, "turn": t, "candidate": c, **turn,
            "completion": cand["completion"], "completion_ids": cand["completion_ids"],
            **({"prompt_ids": cand["prompt_ids"]} if cand["prompt_ids"] is not None else {}),
            "hit_cap": cand["hit_cap"], "code": cand["code"], "valid": cand["valid"],
            "reason": cand["reason"], "repairs": len(cand["attempts"]), "attempts": cand["attempts"],
            "n_val": len(val_rows), "accuracy": acc,
            "reward": w4s_reward(acc, state["best"], state["accuracy"]),
            "best_so_far": state["best"], "prev": state["accuracy"],
            "failures": failure_cases(val_rows, problems), **_tokens(cand, val_rows),
            "seconds": cand["seconds"] + sum(v["seconds"] for v in val_rows)}


def proposer(sample, bench, temperature):
    """propose(messages_list, n, seed) -> [[{text, token_ids, prompt_ids, hit_cap}] * n]: the
    meta-agent's actions, drawn with `sample` (generator.sampler at --refine-tokens) at `temperature`
    after the prefill of `bench`'s family (evaluation with one candidate per turn passes 0: greedy)."""
    prefill = workflow.PREFILLS[benchmarks.family(bench)]
    return lambda messages_list, n, seed: sample(messages_list, n, temperature, seed, prefill)


# ---- collection, groups, evaluation ----------------------------------------------------------------

def episode_problems(cfg, it, ep):
    """Validation batch of training episode `ep`: the train split (for arith disjoint from the
    validate split the evaluation refines on), a fresh seeded subset per iteration and episode."""
    return benchmarks.load(cfg["bench"], "train", cfg["data_dir"], limit=cfg["val_problems"],
                           seed=config.seed_of(cfg["seed"], "episode", it, ep))


def episode_summary(rows, turns):
    """Per-turn figures of one episode: best accuracy of the turn's candidates, best so far, valid fraction."""
    init = next(r for r in rows if r["turn"] == -1)
    best, out = init["accuracy"], []
    for t in range(turns):
        rs = [r for r in rows if r["turn"] == t]
        accs = [r["accuracy"] for r in rs if r["valid"]]
        best = max([best] + accs)
        out.append({"turn": t, "best_of_turn": max(accs) if accs else None, "best_so_far": best,
                    "valid": statistics.fmean(r["valid"] for r in rs) if rs else 0.0,
                    "repairs": statistics.fmean(r["repairs"] for r in rs) if rs else 0.0})
    return {"init_accuracy": init["accuracy"], "per_turn": out}


def collect_refine(run_dir, it, cfg, ex=None, loaded=None, propose=None):
    """Fill iter_<it>/refine.jsonl with cfg['episodes'] episodes; returns (and saves) the stats.
    `loaded` = (model, tokenizer) to reuse a loaded generator, else it is loaded on first use."""
    iter_dir = Path(run_dir) / f"iter_{it}"
    eps = [(e, episode_problems(cfg, it, e)) for e in range(cfg["episodes"])]
    if propose is None:
        propose = proposer(generator.sampler(cfg, run_dir, it, loaded, max_new_tokens=cfg["refine_tokens"]),
                           cfg["bench"], cfg["temperature"])
    total = cfg["episodes"] * (1 + cfg["turns"] * cfg["candidates"])
    t0 = time.time()
    bar = tqdm(total=total, desc=f"refine iter {it}", unit="cand", dynamic_ncols=True)
    bar.update(len(read_jsonl(iter_dir / "refine.jsonl", tolerate_torn_tail=True)) if (iter_dir / "refine.jsonl").exists() else 0)

    def progress(row):
        bar.update(1)
        bar.set_postfix(turn=row["turn"], acc=f"{row['accuracy']:.2f}", reward=row.get("reward"))

    rows = run_episodes(iter_dir / "refine.jsonl", iter_dir / "refine_val.jsonl", eps, cfg, ex, propose, f"iter{it}",
                        cfg["turns"], cfg["candidates"], progress)
    bar.close()
    if len(rows) != total or len({(r["episode"], r["turn"], r["candidate"]) for r in rows}) != total:
        raise DataError(f"{iter_dir / 'refine.jsonl'}: expected {total} distinct rows, found {len(rows)}")
    cands = [r for r in rows if r["kind"] == "candidate"]
    stats = {"rows": total, "candidates": len(cands), "valid_fraction": statistics.fmean(r["valid"] for r in cands),
             "mean_repairs": statistics.fmean(r["repairs"] for r in cands),
             "mean_reward": statistics.fmean(r["reward"] for r in cands),
             "mean_accuracy": statistics.fmean(r["accuracy"] for r in cands),
             "episodes": [episode_summary([r for r in rows if r["episode"] == e], cfg["turns"]) for e, _ in eps]}
    return rollout.save_stats(iter_dir, "refine", stats, rows, t0, cands, "--refine-tokens", cfg["refine_tokens"])


def evaluate_refine(sample, cfg, ex, turns, out_dir, name, test_problems=200, propose=None):
    """T turns of one episode with the meta-agent behind `sample` (generator.sampler) on a fixed batch of the validate split, then the
    episode's best workflow (by validation accuracy) on `test_problems` of the test split.
    cfg['eval_candidates'] actions per turn, sampled at cfg['temperature'] from a fixed seed (the
    same search as in training); 1 = one greedy action per turn. Rows: <out_dir>/<name>.jsonl and
    _val.jsonl (the episode), <name>_test_<code hash>.jsonl; the summary: <name>_T<turns>.json."""
    out_dir = Path(out_dir)
    n = cfg["eval_candidates"]
    if propose is None:
        propose = proposer(sample, cfg["bench"], 0.0 if n == 1 else cfg["temperature"])  # 1: greedy
    val = benchmarks.load(cfg["bench"], "validate", cfg["data_dir"], limit=cfg["val_problems"], seed=cfg["seed"])
    rows = run_episodes(out_dir / f"{name}.jsonl", out_dir / f"{name}_val.jsonl", [(0, val)], cfg, ex,
                        propose, "eval", turns, n)
    rows = [r for r in rows if r["turn"] < turns]
    final = best_workflow(rows)
    test = benchmarks.load(cfg["bench"], "test", cfg["data_dir"], limit=test_problems, seed=0)
    sha = hashlib.sha256(final["code"].encode()).hexdigest()[:10]
    s = report.summarize(rollout.score_workflow(final["code"], test, cfg, ex, out_dir / f"{name}_test_{sha}.jsonl"))
    summary = {"name": name, "turns": turns, "candidates": n, **episode_summary(rows, turns),
               "final": {"turn": final["turn"], "candidate": final["candidate"], "val_accuracy": final["accuracy"],
                         "code": final["code"]},
               "test": s, "executor_tokens": {"refine": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
                                              "test": s["executor_tokens"]}}
    write_json_atomic(out_dir / f"{name}_T{turns}.json", summary)
    return summary
