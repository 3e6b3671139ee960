"""refine.py (W4S refinement): reward rule, repair loop, resume after SIGKILL, groups -> RWR update.
The meta-agent is a canned function; the executor a loopback stub whose accuracy depends on the
instruction a workflow passes to custom()."""
import json
import random
import signal
import subprocess
import sys

import pytest

import benchmarks
import executor
import operators
import workflow
import refine as R
from conftest import ROOT
from openai_stub import StubServer
import lora
import config
import curate
import rollout

# ---- a fake task: the executor is right on a share of problems set by the instruction word ----

SHARE = {"alpha": 0.25, "beta": 0.5, "gamma": 1.0}
GOLD = {p["problem"]: p["answer"] for split in ("train", "validate", "test") for p in benchmarks.arith(split)}


def stub_reply(messages):
    instruction, _, problem = messages[-1]["content"].partition("\n\n")
    gold = GOLD.get(problem.strip())
    share = SHARE.get(instruction.strip(), 0.0)
    if gold is None:
        return "I do not know."
    right = int(config.seed_of("stub", problem)) % 1000 < share * 1000
    return f"The answer is {gold if right else int(gold) + 1}."


def action(drafts, ret="drafts[0]", note="x"):
    """A canned meta-agent completion: continues the prefill (inside `drafts = [`), closes the
    block, then the one-sentence analysis."""
    return f"{drafts}]\n    return {ret}\n```\n{note}\n"


GOOD = {w: action(f'custom(problem, "{w}")', note=w) for w in SHARE}
RAISES = action('custom(problem, "beta")', "drafts[0][9999]", "index")  # IndexError at run time
INVALID = action('"5"', note="no operator")  # static check: no operator call


def ids_of(text):
    return [4 + ord(c) % 59 for c in text][:40] + [2]


def canned(pool, repair=None, log=None):
    """propose(messages_list, n, seed): n draws from `pool` by seed; a conversation longer than the
    state prompt is a repair request, answered by repair(messages)."""
    def propose(messages_list, n, seed):
        out = []
        for m in messages_list:
            if log is not None:
                log.append(m)
            if len(m) > 2:
                texts = [repair(m)] * n
            else:
                rng = random.Random(seed)
                texts = [rng.choice(pool) for _ in range(n)]
            out.append([{"text": t, "token_ids": ids_of(t)} for t in texts])
        return out
    return propose


def cfg(**kw):
    c = dict(bench="arith", data_dir=None, max_calls=6, timeout=20.0, workers=2, runs=1, seed=0,
             **config.defaults(("refine",)))
    c.update(kw)
    return c


# ---- reward ----

@pytest.mark.parametrize("acc,best,prev,want", [
    (0.75, 0.5, 0.25, 1.0),    # beats the best so far
    (0.5, 0.75, 0.25, 0.5),    # beats the previous turn only
    (0.25, 0.75, 0.25, -0.1),  # ties the previous turn: no bonus, and below 0.3
    (0.5, 0.75, 0.5, 0.0),     # neither
    (0.25, 0.2, 0.1, 0.9),     # beats the best, but low accuracy
    (0.2, 0.5, 0.1, 0.4),      # beats the previous turn, low accuracy
    (0.0, 0.0, 0.0, -0.1),     # broken / skipped
    (0.3, 0.5, 0.4, 0.0),      # 0.3 is not "below 0.3"
])
def test_w4s_reward_table(acc, best, prev, want):
    assert R.w4s_reward(acc, best, prev) == pytest.approx(want)


def test_rewards_along_a_hand_made_episode():
    """A whole sequence: state accuracy = best of the previous turn, best = running max."""
    seq = [[0.5, 0.25], [0.375, 0.125], [0.625, 0.5]]  # turn -> candidate accuracies; init 0.25
    best = prev = 0.25
    got = []
    for accs in seq:
        got.append([R.w4s_reward(a, best, prev) for a in accs])
        prev, best = max(accs), max(best, max(accs))
    assert got == [[1.0, -0.1], [0.0, -0.1], [1.0, 0.5]]


def rows_for(accs_by_turn, init=0.25):
    rows = [{"kind": "init", "episode": 0, "turn": -1, "candidate": 0, "code": "io", "valid": True, "accuracy": init,
             "failures": [], "n_val": 8}]
    for t, accs in enumerate(accs_by_turn):
        for c, a in enumerate(accs):
            rows.append({"kind": "candidate", "episode": 0, "turn": t, "candidate": c, "code": f"t{t}c{c}",
                         "valid": a is not None, "accuracy": a or 0.0, "failures": [], "n_val": 8})
    return rows


def test_episode_state_is_rebuilt_from_earlier_turns():
    rows = rows_for([[0.5, 0.625], [None, None], [0.125, 0.125]])
    s = R.episode_state(rows, 0)
    assert (s["code"], s["accuracy"], s["history"], s["best"]) == ("io", 0.25, [0.25], 0.25)
    s = R.episode_state(rows, 2)  # turn 1 had no valid candidate: the state stays
    assert (s["code"], s["accuracy"], s["history"], s["best"]) == ("t0c1", 0.625, [0.25, 0.625], 0.625)
    s = R.episode_state(rows, 3)  # turn 2's best is worse but still becomes current (ties: lower index)
    assert (s["code"], s["accuracy"], s["history"], s["best"]) == ("t2c0", 0.125, [0.25, 0.625, 0.125], 0.625)
    assert R.best_workflow(rows)["code"] == "t0c1"
    msgs = R.state_prompt("arith", s, 6)
    assert "accuracy went from 0.62 to 0.12" in msgs[-1]["content"] and "t2c0" in msgs[-1]["content"]


def test_first_solve_drops_what_follows_the_workflow():
    block = ('def solve(problem):\n    # why\n    x = custom(problem, "a")\n\n    return x\n\n'
             'def custom(p):\n    return 1\n# Example workflow:\ndef solve(problem):\n    return 2\n')
    wf = R.first_solve(block)
    assert wf == 'def solve(problem):\n    # why\n    x = custom(problem, "a")\n\n    return x\n'
    assert workflow.check_workflow(wf, "What is 47 * 6?", operators.OPERATOR_SETS["math"], 6) == (True, "ok")
    assert workflow.check_workflow(block, "What is 47 * 6?", operators.OPERATOR_SETS["math"], 6)[0] is False
    assert R.first_solve("x = 1\n") == "x = 1\n"  # no solve: left to the checker to reject


# ---- repair loop ----

def test_repair_loop_reprompts_with_the_error_then_skips():
    problems = benchmarks.load("arith", "validate", limit=4, seed=0)
    fixes = {"count": 0}

    def repair(m):  # candidate 1 is fixed on its second repair; candidate 0 never
        text = m[-2]["content"]
        if "index" in text:
            return RAISES
        fixes["count"] += 1
        return GOOD["gamma"] if fixes["count"] >= 2 else INVALID

    log = []
    pool_draw = canned([RAISES], repair, log)
    samples = [{"text": RAISES, "token_ids": [5]}, {"text": INVALID, "token_ids": [6]}, {"text": GOOD["beta"], "token_ids": [7]}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "state"}]
    with StubServer(stub_reply) as srv:
        ex = executor.Executor(srv.url, "stub", max_retries=0)
        st = R.self_check_and_repair(msgs, samples, [0, 1, 2], problems[0], cfg(max_repairs=3), ex, pool_draw, 7)
    # candidate 0 raises every time: 3 repairs, then skipped with the error
    assert st[0]["valid"] is False and len(st[0]["attempts"]) == 3
    assert "skipped after 3 repairs" in st[0]["reason"] and "IndexError" in st[0]["reason"]
    assert all(a["error"].startswith("exception: IndexError") for a in st[0]["attempts"])
    # candidate 1: invalid, invalid again, then fixed
    assert st[1]["valid"] is True and len(st[1]["attempts"]) == 2 and st[1]["completion"] == GOOD["gamma"]
    assert st[1]["attempts"][0]["error"] == "invalid: no operator call"
    assert st[1]["completion_ids"] == ids_of(GOOD["gamma"])
    # candidate 2 works at once
    assert st[2]["valid"] is True and st[2]["attempts"] == [] and st[2]["completion"] == GOOD["beta"]
    # the repair prompts: the conversation grows by (failed action, error) each round
    reps0 = [m for m in log if "index" in m[2]["content"]]
    assert [len(m) for m in reps0] == [4, 6, 8]
    for m in reps0:
        assert m[:2] == msgs and m[-2]["role"] == "assistant" and m[-2]["content"] == workflow.PREFILLS["math"] + RAISES
        assert m[-1]["role"] == "user" and "IndexError" in m[-1]["content"] and "Fix it" in m[-1]["content"]
    assert len(log) == 3 + 2  # three repairs of candidate 0, two of candidate 1, none for 2
    assert st[2]["prompt_tokens"] == 10 and st[0]["prompt_tokens"] == 40  # 1 call per self-check run


# ---- a whole collection, and its resume after SIGKILL ----

SCRIPT = r'''
import json, os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import executor, refine as R, rollout, test_refine as TR
from openai_stub import StubServer
# KILL_AT=k: SIGKILL this process at its k-th appended row (candidate or validation row), after
# writing the first bytes of that row when TORN=1 (a kill in the middle of a write)
kill_at, torn, seen, real = int(os.environ.get("KILL_AT", "0")), os.environ.get("TORN") == "1", [0], R.append_jsonl
def append(f, row):
    seen[0] += 1
    if seen[0] == kill_at:
        if torn:
            f.write(json.dumps(row)[:25])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(f, row)
R.append_jsonl = rollout.append_jsonl = append
pool = [TR.GOOD["alpha"], TR.GOOD["beta"], TR.GOOD["gamma"], TR.RAISES, TR.INVALID]
propose = TR.canned(pool, repair=lambda m: TR.GOOD["alpha"] if "index" in m[-2]["content"] else TR.INVALID)
cfg = TR.cfg(turns=2, candidates=3, val_problems=3, episodes=1, max_repairs=1)
with StubServer(TR.stub_reply) as srv:
    ex = executor.Executor(srv.url, "stub", max_retries=0)
    print(json.dumps(R.collect_refine(sys.argv[1], 0, cfg, ex, propose=propose)))
'''


def run_script(path, run_dir, **env):
    import os
    r = subprocess.run([sys.executable, str(path), str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    return r


def comparable(path):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def test_collect_resumes_after_sigkill(tmp_path):
    script = tmp_path / "collect_refine.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    ref = run_script(script, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    stats = json.loads(ref.stdout.splitlines()[-1])
    assert stats["rows"] == 7 and stats["candidates"] == 6
    d = tmp_path / "ref" / "iter_0"
    rows = [json.loads(l) for l in (d / "refine.jsonl").read_text().splitlines()]
    vals = (d / "refine_val.jsonl").read_text().splitlines()
    assert len({(r["episode"], r["turn"], r["candidate"]) for r in rows}) == 7
    assert len(vals) == 3 * (1 + sum(r["valid"] for r in rows[1:]))
    assert any(r["repairs"] for r in rows[1:]) and not all(r["valid"] for r in rows)  # the run repairs and skips
    # rewards follow the rule against the state each turn saw
    for t in range(2):
        st = R.episode_state(rows, t)
        for r in (r for r in rows if r["turn"] == t):
            assert r["reward"] == R.w4s_reward(r["accuracy"], st["best"], st["accuracy"])
            assert r["prompt"] == R.state_prompt("arith", st, 6)

    k, torn = random.randint(1, len(rows) + len(vals) - 1), random.choice(["0", "1"])
    run = tmp_path / "killed"
    killed = run_script(script, run, KILL_AT=str(k), TORN=torn)
    assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
    again = run_script(script, run)
    assert again.returncode == 0, again.stderr
    for name in ("refine.jsonl", "refine_val.jsonl"):
        assert comparable(run / "iter_0" / name) == comparable(d / name), (name, k, torn)

    # groups for RWR: one per turn with unequal rewards, members = that turn's valid candidates
    g = curate.refine_groups(tmp_path / "ref", 0)
    groups = [json.loads(l) for l in (d / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == g["groups"] and g["groups"] + g["dropped_equal_rewards"] == 2
    for grp in groups:
        t = int(grp["problem_id"].split("-t")[1])
        mine = sorted((r for r in rows if r["turn"] == t and r["valid"]), key=lambda r: r["candidate"])
        assert [m["score"] for m in grp["members"]] == [r["reward"] for r in mine]
        assert [m["completion"] for m in grp["members"]] == [r["completion"] for r in mine]
        assert grp["prompt"] == mine[0]["prompt"] and grp["prefill"] == workflow.PREFILLS["math"]


def test_groups_train_with_rwr(tmp_path):
    """write_groups output goes through train.update(loss='rwr') unchanged: the best-rewarded action
    gains the most log-probability (the tiny model generalises, so the others rise too)."""
    import losses
    import train
    from conftest import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    prompt = [{"role": "user", "content": "improve: return custom(problem)"}]
    rows = [{"kind": "init", "episode": 0, "turn": -1, "candidate": 0, "code": "c", "valid": True, "accuracy": 0.2}]
    for c, (text, rew) in enumerate([("return 1", 1.0), ("x = 2", -0.1), ("y = 33", 0.5)]):
        rows.append({"kind": "candidate", "episode": 0, "turn": 0, "candidate": c, "code": "c", "valid": True,
                     "accuracy": 0.5, "prompt": prompt, "prefill": "", "completion": text, "repairs": 0,
                     "completion_ids": tok(text, add_special_tokens=False)["input_ids"] + [2], "reward": rew})
    # a candidate skipped after its repairs is no member: RWR would imitate the broken action
    rows.append(dict(rows[-1], candidate=3, valid=False, accuracy=0.0, reward=-0.1, completion="return nope()"))
    d = tmp_path / "iter_0"
    d.mkdir()
    (d / "refine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curate.refine_groups(tmp_path, 0)["groups"] == 1
    mdl = lora.add_lora(tiny_llama(), r=4, alpha=8)
    groups = [json.loads(l) for l in (d / "groups.jsonl").read_text().splitlines()]
    assert [m["sample"] for m in groups[0]["members"]] == [0, 1, 2]

    def mean_logps():
        seqs = train.sequences(groups, tok, losses.make(dict(config.defaults(), loss="rwr")), 0)[0]
        return [sum(x) / len(x) for x in train.seq_logprobs(mdl, seqs, 4096, 1024)]

    before = mean_logps()
    c = dict(config.defaults(), seed=0, model="tiny", loss="rwr", lr=1e-2, epochs=2, groups_per_step=1)
    train.update(tmp_path, 0, c, mdl, tok)
    after = mean_logps()
    gain = [a - b for a, b in zip(after, before)]
    assert gain[0] > max(gain[1:]), gain
    assert (tmp_path / "iter_1" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("script,argv,msg", [
    ("collect.py", ["--run", "RUN", "--iter", "0", "--turns", "0", "--executor", "none"], "--turns must be"),
    ("evaluate.py", ["--run", "RUN"], "needs --run DIR --iter K"),
    ("train.py", ["--run", "RUN", "--iter", "1", "--loss", "grpo", "--executor", "none"], "--loss rwr"),
])
def test_cli_bad_input_exits_2(tmp_path, script, argv, msg):
    argv = [a.replace("RUN", str(tmp_path / "run")) for a in argv]
    r = subprocess.run([sys.executable, script, "--mode", "refine", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_evaluate_refine_scores_the_best_validation_workflow_on_test(tmp_path):
    c = cfg(turns=1, eval_candidates=3, val_problems=4, max_repairs=0)
    propose = canned([GOOD["alpha"], GOOD["beta"]])  # seeded draws of 3
    with StubServer(stub_reply) as srv:
        ex = executor.Executor(srv.url, "stub", max_retries=0)
        s = R.evaluate_refine(None, c, ex, 1, tmp_path, "refine_iter_0", test_problems=12, propose=propose)
    rows = [json.loads(l) for l in (tmp_path / "refine_iter_0.jsonl").read_text().splitlines()]
    best = R.best_workflow(rows)
    assert s["final"]["code"] == best["code"] and s["final"]["val_accuracy"] == best["accuracy"]
    word = best["code"].split('"')[1] if best["turn"] >= 0 else None
    test = benchmarks.load("arith", "test", limit=12, seed=0)
    # naive reference: the stub is right on a known subset of problems for each instruction word
    want = sum(int(config.seed_of("stub", p["problem"])) % 1000 < SHARE.get(word, 0.0) * 1000 for p in test) / 12
    assert 0 < want < 1 and s["test"]["n"] == 12 and s["test"]["accuracy"] == pytest.approx(want)
    assert s["executor_tokens"]["test"] == 12 * 15
    assert json.loads((tmp_path / "refine_iter_0_T1.json").read_text())["test"]["accuracy"] == s["test"]["accuracy"]
