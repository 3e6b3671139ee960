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
