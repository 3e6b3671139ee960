"""The executor: an OpenAI-compatible chat client, and the local server that stands in for one (ARCHITECTURE §4).

    python -c "import executor; print(executor.price_of('gpt-4o-mini-2024-07-18'))"     # (0.15, 0.6)
    python bench.py executor --servers 2                                                 # local server throughput

Executor.chat is the one way operators reach a language model: retries with backoff on 429 / 5xx /
timeouts, an on-disk cache keyed by endpoint, model and request, token and dollar accounting, and a
failure breaker. What the endpoint caused (auth, unreachable, too many failures) is InfraError and
stops the run; what the request caused (a prompt over the context) is the workflow's error.
local_executor serves the embedded model with serve.py on loopback ports (it samples per request;
`transformers serve` did not). No torch here: a workflow runner that only calls an executor starts fast.
"""
import atexit
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

# USD per 1M tokens (prompt, completion), list prices of 2025; override with Executor(prices=...).
# A model is priced by the longest key that is its name or a prefix of it followed by "-", so dated
# snapshots (gpt-4o-mini-2024-07-18) cost what their family costs; a snapshot with its own price
# gets its own key. Loopback servers cost 0; an unknown model costs 0 with a warning.
PRICES = {
    "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
    "gpt-3.5-turbo": (0.50, 1.50), "o1": (15.00, 60.00), "o1-mini": (1.10, 4.40), "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40), "o4-mini": (1.10, 4.40), "gpt-5": (1.25, 10.00), "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}


DEFAULT_API_MODEL = os.environ.get("SPOGW_EXECUTOR_MODEL", "gpt-4o-mini")
# the embedded model (model.EMBEDDED): the local executor's and the generator's default (config
# --model); named here, where config.py and model.py both can import it without torch
DEFAULT_MODEL = "smollm2-135m"
# Part of every cache key. 2: requests at temperature > 0 carry a seed and the local server samples;
# before, `transformers serve` answered them greedily, so an older entry is a copy of the greedy reply.
CACHE_VERSION = 2


_PRICE_WARNED = set()  # models already warned about, once per process
# A 4xx that this request's content caused (a prompt over the context window, a content filter, a
# 413 body too large): the workflow's fault. Asking again -- or resuming -- would fail the same way,
# so stopping the run for it would stop every rerun at the same workflow.
_WORKFLOW_4XX = re.compile(r"context_length_exceeded|maximum context length|context length|prompt is too long|"
                           r"reduce the length|max_new_tokens` must be|content_filter|content_policy|"
                           r"content management policy", re.I)


class ExecutorError(RuntimeError):
    """The executor could not answer a workflow's call. Operators let it through; the sandbox turns
    it into an exception inside the workflow, so a run gets an error, never a crash."""


class BudgetError(ExecutorError):
    """The workflow used up its call or token budget."""


class InfraError(ExecutorError):
    """The executor endpoint failed, not the workflow: bad key, a rejected request, no quota, an
    unreachable server, retries used up. Never a score: the broker reports it beside the result
    (`infra_error`) and the collecting step leaves the row out or stops (exit 2). `fatal`: asking
    again cannot help (401, 400, insufficient_quota) or too many recent calls failed; the Executor
    then fails every later request at once, so the run stops within seconds."""

    def __init__(self, msg, fatal=False):
        super().__init__(msg)
        self.fatal = fatal


def price_of(model, table=PRICES):
    """(prompt, completion) USD per 1M tokens of `model` by longest prefix in `table` (a provider
    prefix such as "openai/" is ignored), or None when no key matches."""
    name = str(model).rsplit("/", 1)[-1]
    keys = [k for k in table if name == k or name.startswith(k + "-")]
    return tuple(table[max(keys, key=len)]) if keys else None


def is_reasoning_model(model):
    """OpenAI o-series and gpt-5: they reject `max_tokens` and any non-default temperature (400)."""
    return re.match(r"(o\d+(-|$)|gpt-5)", str(model).rsplit("/", 1)[-1]) is not None


def server_text(e):
    """The server's own words from an openai.APIStatusError: error.code and error.message of the
    JSON body when there is one, else the raw text."""
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        code = err.get("code") or err.get("type")
        return (f"{code}: " if code else "") + str(err["message"])[:300]
    return str(e)[:300]


class Executor:
    """Chat client for any OpenAI-compatible endpoint, with our own retries (429 honouring
    Retry-After, 5xx, timeouts, connection errors, malformed replies), an on-disk response cache and
    token/dollar counters. Thread-safe: one instance serves all sandboxes of a collection run.
    The counters are what was really spent: cache hits add to `cache_hits` only.

    Failures of the endpoint raise InfraError (see there), a request the workflow's content broke
    (context length, content filter) a plain ExecutorError. `max_in_flight` bounds concurrent
    requests across all sandboxes (API rate tiers; 0 = unbounded). More than `max_fail_frac` of the
    last `fail_window` calls failing after their retries trips the executor like a fatal error.
    Reasoning models get `max_completion_tokens` = max_tokens + `reasoning_tokens` (their hidden
    reasoning counts against that cap: without room for it a 400-token reply is often empty) and no
    temperature."""

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", cache_dir=None, timeout=60.0,
                 max_retries=5, prices=None, base_delay=1.0, max_delay=30.0, cache_name=None,
                 max_in_flight=0, max_fail_frac=0.5, fail_window=20, reasoning_tokens=4096):

        self.urls = [base_url] if isinstance(base_url, str) or base_url is None else list(base_url)
        self.base_url, self.model, self.timeout = ", ".join(map(str, self.urls)), model, timeout
        # the cache key names the endpoint too: one model name at two servers is two executors.
        # The local executor passes a stable name instead (its ports change every run).
        self.cache_name = cache_name or f"{self.base_url} {model}"
        self.max_retries, self.base_delay, self.max_delay = max_retries, base_delay, max_delay
        # max_retries=0: ours are the only retries, so the bound and the backoff are ours to state.
        # Several URLs = replicas of one model (e.g. one local server per core): each request goes
        # to the one with the fewest requests in flight.
        self.clients = [openai.OpenAI(base_url=u, api_key=os.environ.get(api_key_env) or "EMPTY",
                                      timeout=timeout, max_retries=0) for u in self.urls]
        self.in_flight = [0] * len(self.urls)
        self.local = all(re.match(r"https?://(localhost|127\.|\[::1\])", u or "") for u in self.urls)
        price = price_of(model, PRICES if prices is None else prices)
        if price is None and prices is None and not self.local and model not in _PRICE_WARNED:
            _PRICE_WARNED.add(model)
            print(f"warning: no price known for executor model {model!r}; its cost is reported as $0 "
                  f"(known: {', '.join(sorted(PRICES))})", file=sys.stderr)
        self.price = (0.0, 0.0) if (self.local and prices is None) or price is None else price
        self.reasoning, self.reasoning_tokens = is_reasoning_model(model), reasoning_tokens
        self.slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else contextlib.nullcontext()
        self.max_fail_frac, self.recent = max_fail_frac, collections.deque(maxlen=max(1, fail_window))
        self.tripped = None  # the message of the fatal failure that stops every later request
        self.cache_dir = None if cache_dir is None else os.path.abspath(cache_dir)
        self.lock = threading.Lock()
        self.requests = self.cache_hits = self.failures = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0

    def _cost(self, prompt_tokens, completion_tokens):
        return (prompt_tokens * self.price[0] + completion_tokens * self.price[1]) / 1e6

    def _cache_path(self, key):
        return os.path.join(self.cache_dir, key[:2], key + ".json")

    def _params(self, messages, temperature, max_tokens, seed=None):
        if self.reasoning:
            return dict(model=self.model, messages=messages, max_completion_tokens=max_tokens + self.reasoning_tokens)
        extra = {"seed": seed} if temperature > 0 and seed is not None else {}
        return dict(model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens, **extra)

    def chat(self, messages, temperature=0.0, max_tokens=512, sample_index=0):
        """(text, usage) with usage = {prompt_tokens, completion_tokens, cost_usd, cached}. A cache
        hit reports the tokens and the notional cost of the original call (so a workflow's cost
        does not depend on what happened to be cached) and sends nothing. At temperature > 0 the
        request carries a seed from the whole key: sample_index k of a prompt draws the same reply
        on every rerun, and other indices and other prompts draw independently."""
        key = hashlib.sha256(json.dumps([CACHE_VERSION, self.cache_name, messages, temperature, max_tokens, sample_index],
                                        sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if self.cache_dir:
            try:
                with open(self._cache_path(key), encoding="utf-8") as f:
                    hit = json.load(f)
                with self.lock:
                    self.cache_hits += 1
                return hit["text"], dict(hit["usage"], cached=True)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # missing or torn entry: ask again
        text, usage = self._request(messages, temperature, max_tokens, int(key[:8], 16))
        if self.cache_dir:  # one file per key, written atomically: concurrent writers both win
            path = self._cache_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"model": self.model, "text": text, "usage": usage}, f)
            os.replace(tmp, path)
        return text, dict(usage, cached=False)

    def _send(self, i, messages, temperature, max_tokens, timeout=None, seed=None):
        """One request to replica i -> (text, usage); counts what it spent."""
        client = self.clients[i] if timeout is None else self.clients[i].with_options(timeout=timeout)
        resp = client.chat.completions.create(**self._params(messages, temperature, max_tokens, seed))
        text = resp.choices[0].message.content
        if not isinstance(text, str):
            raise ValueError("reply has no message content")
        reported = getattr(resp, "usage", None)
        prompt, completion = (int(getattr(reported, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens"))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": self._cost(prompt, completion)}
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.cost_usd += usage["cost_usd"]
        return text, usage

    def _trip(self, msg):
        with self.lock:
            self.tripped = self.tripped or msg
        return InfraError(msg, fatal=True)

    def _outcome(self, failed, msg=""):
        """Record one call's outcome in the window; True when that trips the executor (more than
        max_fail_frac of the last fail_window calls failed)."""
        with self.lock:
            self.recent.append(failed)
            failures, window = sum(self.recent), self.recent.maxlen
        if failed and failures > self.max_fail_frac * window:
            self._trip(f"{failures} of the last {window} executor calls failed (--max-fail-frac {self.max_fail_frac:g}); "
                       f"the last: {msg}")
            return True
        return False

    def _request(self, messages, temperature, max_tokens, seed=None):
        last = None
        for attempt in range(self.max_retries + 1):
            if self.tripped:
                raise InfraError(self.tripped, fatal=True)
            wait = None
            with self.slots:
                with self.lock:
                    self.requests += 1
                    n = len(self.clients)  # fewest in flight; ties rotate, so a retry tries the next replica
                    i = min(range(n), key=lambda j: (self.in_flight[j], (j - self.requests) % n))
                    self.in_flight[i] += 1
                where = f"executor {self.model} at {self.urls[i]}"
                try:
                    out = self._send(i, messages, temperature, max_tokens, seed=seed)
                    self._outcome(False)
                    return out
                except openai.APIStatusError as e:
                    last = f"HTTP {e.status_code}: {server_text(e)}"
                    if e.status_code == 413 or (400 <= e.status_code < 500 and _WORKFLOW_4XX.search(last)):
                        raise ExecutorError(f"{where}: {last}") from None  # this prompt's fault
                    quota = e.status_code == 429 and "insufficient_quota" in last
                    if quota or (e.status_code not in (408, 409, 429) and e.status_code < 500):
                        # a bad key, a rejected request, an empty account: asking again cannot help
                        with self.lock:
                            self.failures += 1
                        raise self._trip(f"{where}: {last}") from None
                    retry_after = e.response.headers.get("retry-after") if e.response is not None else None
                    try:
                        wait = min(float(retry_after), 120.0) if retry_after is not None else None
                    except ValueError:
                        wait = None
                except (openai.APIConnectionError, openai.APITimeoutError) as e:
                    cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
                    last = f"{type(e).__name__}: {e}{cause}"
                except Exception as e:  # malformed body, missing fields: the server had a bad moment
                    last = f"malformed reply: {type(e).__name__}: {e}"
                finally:
                    with self.lock:
                        self.in_flight[i] -= 1
            if attempt < self.max_retries and not self.tripped:
                if wait is None:  # bounded exponential backoff with full jitter on top
                    backoff = min(self.max_delay, self.base_delay * 2 ** attempt)
                    wait = backoff + random.uniform(0, backoff)
                time.sleep(wait)
        if self.tripped:
            raise InfraError(self.tripped, fatal=True)
        with self.lock:
            self.failures += 1
        msg = f"{where}: {last} (after {self.max_retries + 1} attempts)"
        if self._outcome(True, msg):
            raise InfraError(self.tripped, fatal=True)
        raise InfraError(msg)

    def preflight(self):
        """One tiny uncached request to every endpoint, no retries, before a run starts: a bad key,
        a wrong model name or a dead server fails here in seconds with InfraError naming the
        endpoint, the model and the server's own message, not after the first workflows."""

        msgs = [{"role": "user", "content": "Reply with OK."}]
        for i, url in enumerate(self.urls):
            with self.lock:
                self.requests += 1
            try:
                self._send(i, msgs, 0.0, 8, timeout=self.timeout if self.local else min(self.timeout, 30.0))
            except openai.APIStatusError as e:
                raise InfraError(f"executor {self.model} at {url} failed its first request: HTTP {e.status_code}: "
                                 f"{server_text(e)}", fatal=True) from None
            except Exception as e:
                cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
                raise InfraError(f"executor {self.model} at {url} failed its first request: "
                                 f"{type(e).__name__}: {e}{cause}", fatal=True) from None

    def stats(self):
        with self.lock:
            return dict(requests=self.requests, cache_hits=self.cache_hits, failures=self.failures,
                        prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        cost_usd=self.cost_usd)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")


@contextlib.contextmanager
def local_executor(name=DEFAULT_MODEL, cache_dir=None, servers=1, threads=1, max_batch=32,
                   startup_timeout=300.0, timeout=300.0, extra_args=(), client=None):
    """Start `servers` copies of serve.py for a local model on free loopback ports, wait until they
    answer, yield one Executor that spreads requests over them, and stop them (each whole process
    group) on exit, Ctrl-C, exception or interpreter exit; they also exit by themselves when this
    process dies (serve.py --orphan-exit), SIGKILL included.

    threads=1: on a shared 2-core box two torch threads in one server ran 3x slower than one (they
    spin against the sandboxes and each other); a second single-threaded server instead uses the
    core that the generator leaves idle. `client`: more Executor arguments (max_in_flight, ...)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []  # (process, log file, url)
    made = []  # the Executor, once made

    def stop():
        _stop_servers(procs)

    def on_signal(signum, frame):
        # Ctrl-C or SIGTERM: trip the executor and stop the servers first, so that calls in flight
        # fail at once instead of waiting for their batch; then stop as the program would have
        for ex in made:
            ex._trip(f"stopped by {signal.Signals(signum).name}")
        stop()
        prev = previous_handlers.get(signum)
        if callable(prev):
            prev(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)  # a plain `kill` would skip atexit and finally

    atexit.register(stop)  # covers a sys.exit() or an uncaught error elsewhere in the program
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(max(1, servers)):
            procs.append(_start_server(name, threads, max_batch, extra_args, env))
        _wait_healthy(procs, startup_timeout)
        # cache_name: the model as named here, stable across runs (the ports are not)
        made.append(Executor([url + "/v1" for _, _, url in procs], str(name), cache_dir=cache_dir, timeout=timeout,
                             **{"max_retries": 2, **(client or {}), "prices": {}, "cache_name": str(name)}))
        yield made[0]
    finally:
        stop()
        atexit.unregister(stop)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        for _, log, _ in procs:
            log.close()


def _start_server(name, threads, max_batch, extra_args, env):
    """One serve.py in its own process group (so that stopping it stops everything it started),
    its output in a temporary file: (process, log file, base url)."""
    port = _free_port()
    cmd = [sys.executable, SERVE, str(name), "--port", str(port), "--threads", str(max(1, threads or 1)),
           "--max-batch", str(max_batch), "--orphan-exit", *extra_args]
    log = tempfile.TemporaryFile(prefix="spogw-serve-")
    return (subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True), log, f"http://127.0.0.1:{port}")


def _wait_healthy(procs, startup_timeout):
    """Wait until every server answers /health; one that exits or is not healthy within
    `startup_timeout` seconds (all together) is an ExecutorError with the end of its log."""
    t0 = time.monotonic()
    for proc, log, url in procs:  # they load in parallel; wait for each in turn
        while True:
            if proc.poll() is not None:
                raise ExecutorError(f"the local executor server exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > startup_timeout:
                raise ExecutorError(f"the local executor server not healthy after {startup_timeout:g} s:\n"
                                    f"{_log_tail(log)}")
            time.sleep(0.25)


def _log_tail(log):
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-3000:]


def _stop_servers(procs):
    """SIGTERM every server's process group, then SIGKILL a group whose leader is not gone in 5 s."""
    for proc, _, _ in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc, _, _ in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def make_executor(spec, model=None, cache_dir=None, servers=1, **client):
    """`with make_executor(spec) as ex:` -- "none" gives None (every operator call fails inside the
    workflow), "local" the embedded model behind `servers` local servers, a URL an Executor for it.
    `client`: Executor arguments (max_in_flight, max_retries, base_delay, max_fail_frac, fail_window)."""
    if spec in (None, "none"):
        yield None
    elif spec == "local":
        with local_executor(model or DEFAULT_MODEL, cache_dir=cache_dir, servers=servers, client=client) as ex:
            yield ex
    elif re.match(r"https?://", spec):
        yield Executor(spec, model or DEFAULT_API_MODEL, cache_dir=cache_dir, **client)
    else:
        raise ValueError(f"executor must be none, local or an http(s) URL, got {spec!r}")
