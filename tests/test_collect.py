"""collect.py end to end without a real model: a tiny generator whose `sample` returns canned
workflows, a loopback executor, the real sandbox. SIGKILL at a random row, restart, compare."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from openai_stub import StubServer

RUNNER = r'''
import random, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import model
import sampling
from conftest import tiny_llama, tiny_tokenizer

# continuations of workflow.PREFILLS["math"] ("```python\ndef solve(problem):\n    drafts = [")
WORKFLOWS = [
    "programmer(problem)]\n    return drafts[0]\n```",
    "custom(problem, 'Give only the final answer.')]\n    return drafts[0]\n```",
    "]\n    import os\n    return custom(problem, 'x')\n```",          # invalid: import
    "custom(problem, 'Think.'), programmer(problem)]\n    return ensemble(problem, drafts)\n```",
]

def fake_load_model(name, device="cpu", dtype=None):
    return tiny_llama(), tiny_tokenizer()

def fake_sample(model, tok, messages_list, n=1, seed=0, **kw):
    rng = random.Random(seed)  # deterministic per chunk seed, like the real sampler
    out = []
    for _ in messages_list:
        per = []
        for _ in range(n):
            text = rng.choice(WORKFLOWS)
            per.append({{"text": text, "token_ids": tok(text, add_special_tokens=False)["input_ids"], "logprobs": []}})
        out.append(per)
    return out

model.load_model, sampling.sample = fake_load_model, fake_sample
import collect
collect.main(sys.argv[1:])
'''


def reply(messages):
    text = messages[-1]["content"]
    if "Python program" in text:  # programmer: a program that prints the right answer
        expr = text.split("What is ")[-1].split("?")[0] if "What is " in text else "0"
        return f"```python\nprint(int({expr}))\n```"
    return "7"


@pytest.fixture
def executor():
    with StubServer(reply) as srv:
        yield srv


def run_collect(tmp_path, run, executor, kill_after=None, extra=()):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    args = [sys.executable, str(script), "--run", str(run), "--iter", "0", "--model", "tiny",
            "--executor", executor.url, "--executor-model", "stub", "--problems", "6", "--m", "4",
            "--gen-batch", "2", "--workers", "2", "--timeout", "10", "--threads", "1", *extra]
    env = dict(os.environ, SPOGW_CACHE=str(tmp_path / "cache"))
    if kill_after is None:
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    out = run / "iter_0" / "rollouts.jsonl"
    t0 = time.time()
    while time.time() - t0 < 120:
        if out.exists() and out.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()


WORKFLOWS_0 = "programmer(problem)]\n    return drafts[0]\n```"  # RUNNER's first canned workflow


def key_rows(path):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    keep = ("problem_id", "sample", "completion", "completion_ids", "code", "valid", "reason", "scores", "score", "answers")
    return sorted((json.dumps({k: r[k] for k in keep}, sort_keys=True) for r in rows))


def test_collect_rows_and_resume_after_sigkill(tmp_path, executor):
    run_collect(tmp_path, tmp_path / "full", executor)
    full = key_rows(tmp_path / "full" / "iter_0" / "rollouts.jsonl")
    assert len(full) == 24
    rows = [json.loads(r) for r in full]
    assert any(not r["valid"] and r["reason"].startswith("import") for r in rows)
    assert any(r["valid"] and r["score"] == 1.0 for r in rows)  # programmer got it right
    stats = json.loads((tmp_path / "full" / "iter_0" / "stats.json").read_text())["collect"]
    assert stats["rows"] == 24 and 0 < stats["valid_fraction"] < 1

    kill_at = random.Random(os.getpid()).randint(1, 20)
    run_collect(tmp_path, tmp_path / "killed", executor, kill_after=kill_at)
    partial = (tmp_path / "killed" / "iter_0" / "rollouts.jsonl").read_text().count("\n")
    assert partial < 24, "the kill came too late to test anything"
    run_collect(tmp_path, tmp_path / "killed", executor)
    assert key_rows(tmp_path / "killed" / "iter_0" / "rollouts.jsonl") == full


def test_torn_last_row_is_redone(tmp_path, executor):
    run_collect(tmp_path, tmp_path / "r", executor)
    path = tmp_path / "r" / "iter_0" / "rollouts.jsonl"
    full = key_rows(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])  # a kill mid-write
    (tmp_path / "r" / "iter_0" / "stats.json").unlink()
    run_collect(tmp_path, tmp_path / "r", executor)
    assert key_rows(path) == full


def test_malformed_row_in_the_middle_is_an_error(tmp_path, executor):
    run_collect(tmp_path, tmp_path / "m", executor)
    path = tmp_path / "m" / "iter_0" / "rollouts.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = '{"problem_id": "broken"\n'
    path.write_text("".join(lines))
    before = path.read_bytes()
    script = tmp_path / "runner.py"
    r = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "m"), "--iter", "0", "--model", "tiny",
                        "--executor", "none", "--problems", "6", "--m", "4", "--gen-batch", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "rollouts.jsonl:4" in r.stderr
    assert path.read_bytes() == before  # nothing written over


def test_prompt_states_the_max_calls_the_checker_enforces(tmp_path, executor):
    """The generator is told the operator-call limit that --max-calls sets (it used to say 6 always)."""
    run_collect(tmp_path, tmp_path / "r", executor, extra=("--max-calls", "3", "--problems", "2"))
    rows = [json.loads(l) for l in (tmp_path / "r" / "iter_0" / "rollouts.jsonl").read_text().splitlines()]
    text = "\n".join(m["content"] for m in rows[0]["prompt"])
    assert "at most 3 operator calls" in text and "at most 6" not in text


@pytest.mark.parametrize("family", ["math", "mixed", "qa", "code"])
def test_guide_completions_are_the_fewshot_workflows_after_the_prefill(family):
    import scorers
    import workflow
    guides = workflow.guide_completions(family)
    assert [scorers.extract_code(workflow.PREFILLS[family] + g) for g in guides] == [c for _, c in workflow.FEWSHOT[family]]
    for (problem, _), g in zip(workflow.FEWSHOT[family], guides):
        code = scorers.extract_code(workflow.PREFILLS[family] + g)
        assert workflow.check_workflow(code, problem)[0], code


def test_guides_join_every_problem_after_its_samples(tmp_path, executor):
    import workflow
    from conftest import tiny_tokenizer
    run = tmp_path / "guided"
    run_collect(tmp_path, run, executor, extra=("--guides", "fewshot"))
    out = run / "iter_0" / "rollouts.jsonl"
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    guides, tok = workflow.guide_completions("math"), tiny_tokenizer()
    assert len(rows) == 6 * (4 + len(guides))
    for r in rows:
        assert bool(r.get("guide")) == (r["sample"] >= 4)
        if r.get("guide"):
            text = guides[r["sample"] - 4]
            assert r["completion"] == text and r["valid"]
            assert r["completion_ids"] == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # each guide ran on its own problem like a sample: programmer -> format answers what the sampled
    # `programmer(problem)` workflow answers there (the stub's program prints the right number)
    assert all(r["calls"] >= 1 and r["errors"] == [None] for r in rows if r.get("guide"))
    (pf,) = [i + 4 for i, g in enumerate(guides) if g.startswith("programmer(problem)]")]
    by = {(r["problem_id"], r["completion"] if r["sample"] < 4 else r["sample"]): r for r in rows}
    checked = [(by[pid, pf]["answers"], by[pid, WORKFLOWS_0]["answers"]) for pid, key in by if key == WORKFLOWS_0]
    assert checked and all(a == b and b[0] not in ("7", None) for a, b in checked)
    sampled = [r for r in rows if not r.get("guide")]
    stats = json.loads((run / "iter_0" / "stats.json").read_text())["collect"]
    assert stats["rows"] == len(rows) and stats["guide_rows"] == 6 * len(guides)
    assert stats["valid_fraction"] == sum(r["valid"] for r in sampled) / len(sampled)
    # resume: drop the guide rows of one problem, rerun: the same rows come back
    before = key_rows(out)
    pid = rows[0]["problem_id"]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if not (r["problem_id"] == pid and r.get("guide"))))
    run_collect(tmp_path, run, executor, extra=("--guides", "fewshot"))
    assert key_rows(out) == before
