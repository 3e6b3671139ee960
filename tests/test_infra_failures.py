"""Executor infrastructure failures are never scores: a loopback endpoint that fails mid-run with a
bad key (401), a rejected request (400), refused connections or an exhausted quota (429
insufficient_quota) stops `evaluate.py` with exit 2 and a message naming the endpoint, the model and
the server's error; the rows written before stay, none is scored from the failure, and a rerun once
the endpoint recovers completes the same rows as a run that never failed."""
import json
import time
from pathlib import Path

import pytest

import benchmarks
import evaluate
from openai_stub import ERRORS, StubServer

LIMIT = 4
PROBLEMS = benchmarks.load("arith", "test", None, limit=LIMIT, seed=0)
# the stub answers half the problems right, so the rows' scores differ and a mix-up would show
ANSWERS = {p["problem"]: (p["answer"] if i % 2 == 0 else "0") for i, p in enumerate(PROBLEMS)}


def reply(messages):
    return ANSWERS.get(messages[-1]["content"].split("\n\n", 1)[-1], "unknown problem")


def argv(url, *extra):
    # short retries and a small failure window through the knobs, not by patching the client
    return ["--bench", "arith", "--split", "test", "--baseline", "io", "--limit", str(LIMIT), "--executor-url", url,
            "--executor-model", "stub-model", "--workers", "1", "--executor-retries", "1", "--executor-backoff",
            "0.01", "--fail-window", "2", "--max-fail-frac", "0.4", "--timeout", "20", *extra]


def run_eval(args, capsys):
    t = time.monotonic()
    try:
        evaluate.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, time.monotonic() - t, out.out, out.err


def rows_of(cwd):
    files = list(Path(cwd).glob("runs/baselines/*/io.jsonl"))
    assert len(files) <= 1
    if not files:
        return {}
    rows = [json.loads(l) for l in files[0].read_text().splitlines()]
    assert len({r["problem_id"] for r in rows}) == len(rows)
    return {r["problem_id"]: {k: r[k] for k in ("score", "answers", "errors", "valid", "calls")} for r in rows}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPOGW_CACHE", str(tmp_path / "cache"))  # a fresh executor cache
    return tmp_path


def reference(tmp_path, capsys, monkeypatch):
    """The rows of a run against an endpoint that never fails."""
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.chdir(ref)
    with StubServer(reply=reply) as srv:
        code, _, out, err = run_eval(argv(srv.url), capsys)
    assert code == 0 and "accuracy 50.0 %" in out, err
    monkeypatch.chdir(tmp_path)
    rows = rows_of(ref)
    assert len(rows) == LIMIT and sorted(r["score"] for r in rows.values()) == [0.0, 0.0, 1.0, 1.0]
    return rows


@pytest.mark.parametrize("fault", ["401", "400", "refuse", "quota"])
def test_failure_mid_run_stops_with_exit_2_and_a_rerun_completes_the_rows(fault, workdir, capsys, monkeypatch):
    ref = reference(workdir, capsys, monkeypatch)
    # the preflight and two workflows pass, then every request fails
    srv = StubServer(reply=reply, faults=[None, None, None] + [fault] * 50).__enter__()
    try:
        code, seconds, out, err = run_eval(argv(srv.url), capsys)
        assert code == 2 and seconds < 30, (code, seconds, err)
        assert err.startswith("error: ") and srv.url in err and "stub-model" in err
        assert (ERRORS[fault][1]["message"] if fault in ERRORS else "Connection refused") in err, err
        assert "rerun" in err and "accuracy" not in out
        done = rows_of(workdir)
        assert len(done) == 2 and all(done[pid] == ref[pid] for pid in done)  # kept, none scored from the fault
        if fault == "refuse":  # the server comes back on the same address
            srv.close()
            srv = StubServer(reply=reply, port=srv.port).__enter__()
        else:
            srv.faults.clear()
        code, _, out, err = run_eval(argv(srv.url), capsys)
        assert code == 0 and "accuracy 50.0 %" in out, err
        assert rows_of(workdir) == ref
        assert len(srv.requests) == (LIMIT - 2 + 1 if fault == "refuse" else 3 + 1 + 1 + LIMIT - 2)
    finally:
        srv.close()


def test_a_dead_endpoint_fails_the_preflight_in_seconds(workdir, capsys):
    with StubServer() as srv:
        url = srv.url
    code, seconds, out, err = run_eval(argv(url, "--executor-retries", "5", "--executor-backoff", "1"), capsys)
    assert code == 2 and seconds < 10 and url in err and "Connection refused" in err and "first request" in err
    assert rows_of(workdir) == {}


def test_transient_failures_leave_rows_out_then_stop(workdir, capsys, monkeypatch):
    """Retries used up on one workflow, under the failure fraction: the other rows are scored, the
    lost one is not written, the step exits 2 at its end, and a rerun redoes only that one."""
    ref = reference(workdir, capsys, monkeypatch)
    with StubServer(reply=reply, faults=[None, None, "500", "500"]) as srv:
        code, _, out, err = run_eval(argv(srv.url, "--fail-window", "20", "--max-fail-frac", "0.5"), capsys)
        assert code == 2 and "1 workflow(s) not scored" in err and "HTTP 500" in err and srv.url in err, err
        done = rows_of(workdir)
        assert len(done) == LIMIT - 1 and all(done[pid] == ref[pid] for pid in done)
        code, _, out, err = run_eval(argv(srv.url), capsys)
        assert code == 0 and rows_of(workdir) == ref
        assert len(srv.requests) == 1 + LIMIT + 1 + 1 + 1  # preflight, 3 + 1 retry, preflight, the lost one

