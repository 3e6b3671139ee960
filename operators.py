"""Operators that workflows call, the executor client, the static workflow checker and the
generator prompt (ARCHITECTURE §3, §4)."""

# ==== executor client ====

import collections
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import threading
import time

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
_PRICE_WARNED = set()  # models already warned about, once per process


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


# A 4xx that this request's content caused (a prompt over the context window, a content filter, a
# 413 body too large): the workflow's fault. Asking again -- or resuming -- would fail the same way,
# so stopping the run for it would stop every rerun at the same workflow.
_WORKFLOW_4XX = re.compile(r"context_length_exceeded|maximum context length|context length|prompt is too long|"
                           r"reduce the length|max_new_tokens` must be|content_filter|content_policy|"
                           r"content management policy", re.I)


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
        import openai

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

    def _params(self, messages, temperature, max_tokens):
        if self.reasoning:
            return dict(model=self.model, messages=messages, max_completion_tokens=max_tokens + self.reasoning_tokens)
        return dict(model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens)

    def chat(self, messages, temperature=0.0, max_tokens=512, sample_index=0):
        """(text, usage) with usage = {prompt_tokens, completion_tokens, cost_usd, cached}. A cache
        hit reports the tokens and the notional cost of the original call (so a workflow's cost
        does not depend on what happened to be cached) and sends nothing."""
        key = hashlib.sha256(json.dumps([self.cache_name, messages, temperature, max_tokens, sample_index],
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
        text, usage = self._request(messages, temperature, max_tokens)
        if self.cache_dir:  # one file per key, written atomically: concurrent writers both win
            path = self._cache_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"model": self.model, "text": text, "usage": usage}, f)
            os.replace(tmp, path)
        return text, dict(usage, cached=False)

    def _send(self, i, messages, temperature, max_tokens, timeout=None):
        """One request to replica i -> (text, usage); counts what it spent."""
        client = self.clients[i] if timeout is None else self.clients[i].with_options(timeout=timeout)
        resp = client.chat.completions.create(**self._params(messages, temperature, max_tokens))
        text = resp.choices[0].message.content
        if not isinstance(text, str):
            raise ValueError("reply has no message content")
        u = getattr(resp, "usage", None)
        pt, ct = int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)
        usage = {"prompt_tokens": pt, "completion_tokens": ct, "cost_usd": self._cost(pt, ct)}
        with self.lock:
            self.prompt_tokens += pt
            self.completion_tokens += ct
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
            n, w = sum(self.recent), self.recent.maxlen
        if failed and n > self.max_fail_frac * w:
            self._trip(f"{n} of the last {w} executor calls failed (--max-fail-frac {self.max_fail_frac:g}); "
                       f"the last: {msg}")
            return True
        return False

    def _request(self, messages, temperature, max_tokens):
        import openai

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
                    out = self._send(i, messages, temperature, max_tokens)
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
                    ra = e.response.headers.get("retry-after") if e.response is not None else None
                    try:
                        wait = min(float(ra), 120.0) if ra is not None else None
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
            if attempt < self.max_retries:
                if wait is None:  # bounded exponential backoff with full jitter on top
                    d = min(self.max_delay, self.base_delay * 2 ** attempt)
                    wait = d + random.uniform(0, d)
                time.sleep(wait)
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
        import openai

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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_architectures(model_dir):
    """`transformers serve` picks the model class from config.json "architectures"; a config
    written from a GGUF load has none. Then serve a temp view of the dir (symlinks + a completed
    config) rather than edit someone else's cache. Returns the view's path, or None if not needed."""
    import tempfile

    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("architectures"):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type"))
    if arch is None:
        raise ExecutorError(f"{cfg_path} names no architecture and its model_type is not a causal LM")
    view = tempfile.mkdtemp(prefix="spogw-serve-model-")
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(model_dir, name), os.path.join(view, name))
    with open(os.path.join(view, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(cfg, architectures=[arch]), f, indent=2)
    return view


def _transformers_cli():
    """argv prefix that runs the `transformers` console script with *this* interpreter. Looking for
    the script file next to sys.executable fails in a venv (realpath leads to the base interpreter's
    bin/) and PATH may hold another install; the entry point's module, run by sys.executable, is
    always the transformers this process imports."""
    import importlib.metadata
    import importlib.util
    import sys

    eps = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "transformers"]
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if not eps or missing:
        raise ExecutorError(f"the `transformers` CLI with its server is missing ({', '.join(missing) or 'no entry point'}) "
                            f"in {sys.executable}: pip install 'transformers[serving]'")
    module, _, func = eps[0].value.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = 'transformers'; sys.exit({func}())"]


@contextlib.contextmanager
def local_executor(model="smollm2-135m", cache_dir=None, servers=1, threads=1, kv_tokens=16384,
                   startup_timeout=300.0, timeout=300.0, extra_args=(), client=None):
    """Start `servers` copies of `transformers serve` for a local model on free loopback ports,
    wait until they answer, yield one Executor that spreads requests over them, and stop them (each
    whole process group) on exit, Ctrl-C, exception or interpreter exit. The servers are pinned to
    the model, so requests name the same directory.

    threads=1: on a shared 2-core box two torch threads in one server ran 3x slower than one (they
    spin against the sandboxes and each other); a second single-threaded server instead uses the
    core that the generator leaves idle. kv_tokens sizes each paged KV cache explicitly: left to
    itself continuous batching sizes it from free memory and spent ~25 s allocating it on the first
    request. 16k tokens = 16 concurrent requests of ~1k tokens (SmolLM2-135M: 46 KB/token).
    `client`: more Executor arguments (max_in_flight, max_retries, ...)."""
    import atexit
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import urllib.request

    import model as model_mod

    model_dir = model_mod.resolve_model_dir(model)
    shim = _with_architectures(model_dir)
    served = shim or model_dir
    serve = _transformers_cli()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []  # (process, log file, url)

    def stop():
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

    def tail(log):
        log.flush()
        log.seek(0)
        return log.read().decode("utf-8", "replace")[-3000:]

    atexit.register(stop)  # covers a sys.exit() or an uncaught error elsewhere in the program
    # a plain `kill` would skip atexit and finally: turn SIGTERM into SystemExit while we run
    old_term = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    try:
        for _ in range(max(1, servers)):
            port = _free_port()
            cmd = [*serve, "serve", served, "--device", "cpu", "--continuous-batching", "--host", "127.0.0.1",
                   "--port", str(port), "--cb-block-size", "64", "--cb-num-blocks", str(max(1, kv_tokens // 64)),
                   "--cb-max-batch-tokens", "1024", *extra_args]
            log = tempfile.TemporaryFile(prefix="spogw-serve-")
            procs.append((subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True), log, f"http://127.0.0.1:{port}"))
        t0 = time.monotonic()
        for proc, log, url in procs:  # they load in parallel; wait for each in turn
            while True:
                if proc.poll() is not None:
                    raise ExecutorError(f"transformers serve exited with {proc.returncode}:\n{tail(log)}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() - t0 > startup_timeout:
                    raise ExecutorError(f"transformers serve not healthy after {startup_timeout:g} s:\n{tail(log)}")
                time.sleep(0.5)
        # cache_name: the model as named here, stable across runs (the ports are not)
        yield Executor([url + "/v1" for _, _, url in procs], served, cache_dir=cache_dir, timeout=timeout,
                       **{"max_retries": 2, **(client or {}), "prices": {}, "cache_name": str(model)})
    finally:
        stop()
        atexit.unregister(stop)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        for _, log, _ in procs:
            log.close()
        if shim:
            shutil.rmtree(shim, ignore_errors=True)


@contextlib.contextmanager
def make_executor(spec, model=None, cache_dir=None, servers=1, **client):
    """`with make_executor(spec) as ex:` -- "none" gives None (every operator call fails inside the
    workflow), "local" the embedded model behind `servers` local servers, a URL an Executor for it.
    `client`: Executor arguments (max_in_flight, max_retries, base_delay, max_fail_frac, fail_window)."""
    if spec in (None, "none"):
        yield None
    elif spec == "local":
        with local_executor(model or "smollm2-135m", cache_dir=cache_dir, servers=servers, client=client) as ex:
            yield ex
    elif re.match(r"https?://", spec):
        yield Executor(spec, model or DEFAULT_API_MODEL, cache_dir=cache_dir, **client)
    else:
        raise ValueError(f"executor must be none, local or an http(s) URL, got {spec!r}")


class OpContext:
    """What operators see: the executor, this run's call/token budget and counters, and the
    per-problem data (context["public_tests"], ...). One per workflow run."""

    REPEAT_TEMPERATURE = 0.7

    def __init__(self, executor, context=None, max_calls=20, max_tokens_budget=None):
        self.executor, self.context = executor, dict(context or {})
        self.max_calls, self.max_tokens_budget = max_calls, max_tokens_budget
        self.calls = self.prompt_tokens = self.completion_tokens = 0
        self.ops = 0  # operator invocations, counted by the sandbox broker
        self.cost_usd = 0.0
        self.budget_error = None
        self.infra_error = None  # set by the sandbox broker: the endpoint failed, not the workflow
        self.temperature = float(self.context.get("temperature", 0.0))
        self.sample_index = int(self.context.get("sample_index", 0))
        self._seen = {}

    def chat(self, prompt, max_tokens=512):
        """One executor call on a user prompt (or a message list), within the budget. Asking the
        same thing twice in one run samples (temperature >= 0.7, a new cache slot): otherwise
        `[custom(p, i) for _ in range(3)]` would be three copies of one greedy answer."""
        if self.calls >= self.max_calls:
            raise BudgetError(f"more than {self.max_calls} executor calls")
        if self.max_tokens_budget is not None and self.prompt_tokens + self.completion_tokens >= self.max_tokens_budget:
            raise BudgetError(f"token budget of {self.max_tokens_budget} used up")
        self.calls += 1
        if "max_tokens" in self.context:  # a per-run cap, e.g. to keep a tiny CPU executor fast
            max_tokens = min(max_tokens, int(self.context["max_tokens"]))
        if self.executor is None:
            raise ExecutorError("no executor (--executor none)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        k = json.dumps(messages)
        n = self._seen[k] = self._seen.get(k, -1) + 1
        temp = self.temperature if n == 0 else max(self.temperature, self.REPEAT_TEMPERATURE)
        text, usage = self.executor.chat(messages, temperature=temp, max_tokens=max_tokens,
                                         sample_index=self.sample_index * 1000 + n)
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cost_usd += usage["cost_usd"]
        return text


# ==== operator library ====
# Each operator runs here in the parent as fn(ctx, *args) -> str; the workflow's sandbox holds only
# stubs that forward the call (sandbox.py). Prompts are short and concrete: the default executor is
# a 135M model that follows one plain instruction, rarely two.

PROGRAM_TIMEOUT = 5.0  # seconds for one executor-written program or one public-test run


def _s(x):
    return x if isinstance(x, str) else str(x)


def _code_of(reply):
    return extract_code(reply) or reply  # extract_code: the checker section below


def extract_answer(text):
    """The final answer inside a free-text solution: the last \\boxed{..}, else what follows the last
    "Answer:", else the last number, else the last non-empty line."""
    text = _s(text).strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    tagged = re.findall(r"answer(?:\s+is)?\s*[:=]\s*([^\n]+)", text, flags=re.I)
    if tagged and tagged[-1].strip(" .*$"):
        return tagged[-1].strip(" .*$")
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if nums:
        return nums[-1]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def normalize_answer(a):
    """For voting: case, spaces, $ and trailing dots ignored; "1,000.0" == "1000"."""
    a = re.sub(r"\s+", " ", _s(a)).strip().strip("$").rstrip(".").strip().lower()
    num = a.replace(",", "")
    try:
        f = float(num)
        return str(int(f)) if f.is_integer() else repr(f)
    except (ValueError, OverflowError):
        return a


def majority_vote(solutions):
    """The first solution whose extracted answer is the most common one."""
    keys = [normalize_answer(extract_answer(s)) for s in solutions]
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    best = max(counts.values())
    return solutions[next(i for i, k in enumerate(keys) if counts[k] == best)]


def op_custom(ctx, input, instruction):
    return ctx.chat(f"{_s(instruction)}\n\n{_s(input)}")


def op_answer_generate(ctx, input):
    return ctx.chat(f"{_s(input)}\n\nThink step by step. End with a line 'Answer: <final answer>'.")


def op_programmer(ctx, problem, analysis=""):
    """The executor writes a program that prints the answer; it runs in a fresh sandbox; on an
    error (or no output) the executor sees the error and tries again, twice at most. Returns the
    program's output, or "" when every attempt failed."""
    import sandbox

    prompt = f"Write one short Python program that prints the answer.\n\nProblem: {_s(problem)}\n"
    if analysis:
        prompt += f"Hint: {_s(analysis)}\n"
    messages = [{"role": "user", "content": prompt + "\nReply with only the code in a ```python block."}]
    for attempt in range(3):
        reply = ctx.chat(messages, max_tokens=400)
        r = sandbox.run_program(_code_of(reply), timeout=PROGRAM_TIMEOUT, mem_mb=256)
        out = r["stdout"].strip()
        if r["ok"] and out:
            return out
        err = (r["stderr"].strip()[-400:] or r["error"]) if not r["ok"] else "it printed nothing"
        messages = messages + [{"role": "assistant", "content": reply},
                               {"role": "user", "content": f"The program failed:\n{err}\n\nFix it. Reply with only "
                                                           "the corrected code in a ```python block."}]
    return ""


def op_ensemble(ctx, problem, solutions):
    """Self-consistency: the executor names the solution that agrees most with the others; when its
    reply names none (or all answers already agree) the majority vote of the answers decides."""
    sols = [_s(s).strip() for s in ([solutions] if isinstance(solutions, str) else list(solutions))]
    sols = [s for s in sols if s][:26]
    if not sols:
        return ""
    if len({normalize_answer(extract_answer(s)) for s in sols}) == 1:
        return sols[0]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(sols)]
    listing = "\n\n".join(f"({l}) {s}" for l, s in zip(letters, sols))
    reply = ctx.chat(f"Problem: {_s(problem)}\n\nSolutions:\n\n{listing}\n\n"
                     "Which solution agrees most with the others? Reply with one letter.", max_tokens=8).strip()
    m = (re.fullmatch(r"\W*([A-Z])\W*", reply) or re.search(r"\(([A-Z])\)", reply)
         or re.search(r"(?:solution|answer|option)\s*\(?([A-Z])\b", reply, flags=re.I))
    if m and m.group(1).upper() in letters:
        return sols[letters.index(m.group(1).upper())]
    return majority_vote(sols)


def op_review(ctx, problem, solution):
    return ctx.chat(f"Problem: {_s(problem)}\n\nSolution: {_s(solution)}\n\nIs this solution correct? If it is, "
                    "reply 'correct'. If not, name the first mistake in one sentence.", max_tokens=200)


def op_revise(ctx, problem, solution, feedback):
    return ctx.chat(f"Problem: {_s(problem)}\n\nSolution: {_s(solution)}\n\nFeedback: {_s(feedback)}\n\n"
                    "Write a corrected solution. End with a line 'Answer: <final answer>'.")


_BARE_NUMBER = re.compile(r"-?\$?\d[\d,]*(\.\d+)?")


def op_format(ctx, problem, solution):
    """Only the final answer. An empty or chatty reply falls back to the answer in the solution.
    A solution that already is a bare number (programmer's output) comes back as it is, without a
    call: the 135M executor asked for "the final answer" of "42" often answered something else, and
    `programmer -> format` scored far below programmer alone."""
    bare = _s(solution).strip()
    if _BARE_NUMBER.fullmatch(bare):
        return bare
    reply = ctx.chat(f"Problem: {_s(problem)}\n\nSolution: {_s(solution)}\n\n"
                     "What is the final answer? Reply with the answer only.", max_tokens=32).strip()
    line = re.sub(r"^(the\s+)?(final\s+)?answer(\s+is)?\s*[:=]?\s*", "", reply.splitlines()[0] if reply else "",
                  flags=re.I).strip().rstrip(".")
    return line if line else extract_answer(solution)


def op_code_generate(ctx, problem, entry_point, instruction=""):
    reply = ctx.chat(f"{_s(instruction)}\nWrite the Python function `{_s(entry_point)}` for this task. Reply with "
                     f"only the code in a ```python block.\n\n{_s(problem)}".lstrip(), max_tokens=600)
    return _code_of(reply)


def run_public_tests(code, entry_point, tests, timeout=PROGRAM_TIMEOUT):
    """Run each `assert ...candidate(...)` string against `code` in one sandbox. Returns the list
    of failures ("test -> error"), one per failing test; a crash fails them all."""
    import secrets
    import sandbox

    if not str(entry_point).isidentifier():
        raise ValueError(f"entry_point must be a Python name, got {entry_point!r}")
    tag = secrets.token_hex(8)  # the code under test cannot guess it to fake a pass
    harness = (f"\n\ncandidate = {entry_point}\n"
               f"for _t in {list(tests)!r}:\n"
               "    try:\n"
               "        exec(_t, globals())\n"
               f"        print({tag!r}, 'ok', flush=True)\n"
               "    except BaseException as _e:\n"
               f"        print({tag!r}, 'fail', repr(_t)[:200], '->', type(_e).__name__, str(_e)[:200], flush=True)\n")
    r = sandbox.run_program(code + harness, timeout=timeout, mem_mb=512)
    lines = [l[len(tag) + 1:] for l in r["stdout"].splitlines() if l.startswith(tag + " ")]
    fails = [l[5:] for l in lines if l.startswith("fail ")]
    if len(lines) < len(tests):  # the run died part-way: the rest did not pass
        why = r["error"] or "did not finish"
        tail = r["stderr"].strip().splitlines()[-1:] if r["stderr"].strip() else []
        fails += [f"{t[:200]!r} -> {why}" + (f" ({tail[0][:200]})" if tail else "") for t in tests[len(lines):]]
    return fails


def op_test(ctx, problem, solution, entry_point):
    """Run the public tests (ctx.context["public_tests"]); on failure show the executor the failing
    tests and let it repair the code, 3 rounds at most. Returns the version passing most tests."""
    tests = [t for t in ctx.context.get("public_tests") or [] if isinstance(t, str)]
    code = _code_of(_s(solution))
    if not tests:
        return code
    best, best_fails = code, None
    for round_ in range(4):
        fails = run_public_tests(code, entry_point, tests)
        if best_fails is None or len(fails) < len(best_fails):
            best, best_fails = code, fails
        if not fails or round_ == 3:
            break
        reply = ctx.chat(f"Task:\n{_s(problem)}\n\nThis code fails some tests:\n```python\n{code}\n```\n\nFailures:\n"
                         + "\n".join(fails[:5]) + "\n\nFix the code. Reply with only the corrected code in a "
                         "```python block.", max_tokens=600)
        code = _code_of(reply)
    return best


OPERATORS = {
    "custom": op_custom, "answer_generate": op_answer_generate, "programmer": op_programmer,
    "ensemble": op_ensemble, "review": op_review, "revise": op_revise, "format": op_format,
    "code_generate": op_code_generate, "test": op_test,
}
OPERATOR_SETS = {  # ARCHITECTURE §3 "offered for"
    "math": ["custom", "answer_generate", "programmer", "ensemble", "review", "revise", "format"],
    "qa": ["custom", "answer_generate", "ensemble", "review", "revise", "format"],
    "code": ["custom", "code_generate", "test", "ensemble", "review", "revise"],
}


# ==== static checker and generator prompt ====

import ast as _ast
import builtins as _builtins
import inspect as _inspect
import re as _re

# What the generator is told about each operator: signature and one line of semantics.
OPERATOR_DOCS = {
    "custom": ("custom(input, instruction)", "follows the instruction on the input; returns the reply"),
    "answer_generate": ("answer_generate(input)", "thinks step by step; returns the final answer"),
    "programmer": ("programmer(problem, analysis='')", "writes and runs a Python program; returns the answer it prints"),
    "ensemble": ("ensemble(problem, solutions)", "picks the most consistent answer from a list of solutions"),
    "review": ("review(problem, solution)", "returns a critique of the solution"),
    "revise": ("revise(problem, solution, feedback)", "returns the solution repaired using the feedback"),
    "format": ("format(problem, solution)", "returns only the final answer of the solution"),
    "code_generate": ("code_generate(problem, entry_point, instruction)", "returns Python code defining entry_point"),
    "test": ("test(problem, solution, entry_point)", "runs the public tests, repairs the code if they fail; returns code"),
}
FAMILY_OPERATORS = {fam: tuple(ops) for fam, ops in OPERATOR_SETS.items()}  # one source of truth: the library
ALL_OPERATORS = tuple(OPERATOR_DOCS)
SAFE_BUILTINS = frozenset("len range str int float min max sorted enumerate zip list dict set sum abs round "
                          "any all isinstance print".split())

# Few-shot turns per family: (problem, workflow). A 135M generator copies the *last* example far
# more than it follows any instruction, so the last one is the richest (EXAMPLE_WORKFLOWS) and
# the earlier ones vary the structure. Each starts like PREFILLS[family] continues.
_CODE_NAME = 'name = problem.split("def ")[-1].split("(")[0].strip()'  # entry point: the prompt's last def
FEWSHOT = {
    "math": [
        ("Ana has 12 stickers and buys 30 more. How many stickers does Ana have now?", '''def solve(problem):
    drafts = [custom(problem, "Solve it step by step."), answer_generate(problem)]
    return ensemble(problem, drafts)
'''),
        ("What is (17 + 25) * 3?", '''def solve(problem):
    drafts = [programmer(problem)]
    return format(problem, drafts[0])
'''),
        ("What is 35 * 4?", '''def solve(problem):
    drafts = [programmer(problem), custom(problem, "Think step by step, then give the final answer.")]
    return ensemble(problem, drafts)
'''),
    ],
    "qa": [
        ("Passage: The bridge opened in 1932 and was widened in 1958.\nQuestion: How many years after opening was "
         "the bridge widened?", '''def solve(problem):
    drafts = [answer_generate(problem)]
    feedback = review(problem, drafts[0])
    return format(problem, revise(problem, drafts[0], feedback))
'''),
        ("Question: Which river flows through the capital of France?\n\nContext:\nParis: Paris is the capital of "
         "France.\nSeine: The Seine flows through Paris.", '''def solve(problem):
    drafts = [answer_generate(problem), custom(problem, "Answer with a short phrase from the context.")]
    return format(problem, ensemble(problem, drafts))
'''),
    ],
    "code": [
        ('def add(a, b):\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n', f'''def solve(problem):
    {_CODE_NAME}
    drafts = [code_generate(problem, name, "Write the complete function.")]
    return test(problem, drafts[0], name)
'''),
        ('def is_even(n):\n    """Return True if n is even.\n    >>> is_even(4)\n    True\n    """\n', f'''def solve(problem):
    {_CODE_NAME}
    drafts = [code_generate(problem, name, "Write the function.") for _ in range(2)]
    return test(problem, ensemble(problem, drafts), name)
'''),
    ],
}
EXAMPLE_WORKFLOWS = {fam: shots[-1][1] for fam, shots in FEWSHOT.items()}


class _Reject(Exception):
    pass


# Parameters of each operator as the workflow calls it: (name, required) after `ctx`, read from the
# functions themselves so the arity check cannot drift from the library.
OP_PARAMS = {name: [(p.name, p.default is p.empty) for p in list(_inspect.signature(fn).parameters.values())[1:]]
             for name, fn in OPERATORS.items()}
# Names the workflow's run-time globals hold besides operators and SAFE_BUILTINS that valid code
# reads without calling: exception classes in `except ...:` (the sandbox gives full builtins).
_EXCEPTION_NAMES = frozenset(k for k, v in vars(_builtins).items() if isinstance(v, type)
                             and issubclass(v, BaseException)) | {"OperatorError"}


def _line(node):
    return f"(line {getattr(node, 'lineno', '?')})"


def _range_len(node):
    """Iterations of `range(K)` / `range(a, b)` / `range(a, b, s)` with literal ints, else None."""
    if not (isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 3):
        return None
    vals = [a.value if isinstance(a, _ast.Constant) else None for a in node.args]
    if not all(type(v) is int for v in vals):
        return None
    return len(range(*vals)) if vals[-1] != 0 or len(vals) < 3 else None


def _count_calls(node, ops):
    """Static upper bound on operator calls: literal-range loops multiply their body, an if takes
    its larger branch (statements after a return still count: a bound, not an exact count), a
    loop that calls operators without a literal bound is rejected."""
    def count(n):
        return _count_calls(n, ops)

    def total(nodes):
        return sum(count(n) for n in nodes)

    if isinstance(node, (_ast.For, _ast.AsyncFor)):
        body = total(node.body)
        k = _range_len(node.iter)
        if k is None and body:
            raise _Reject(f"unbounded loop {_line(node)}")
        return count(node.iter) + (k or 0) * body + total(node.orelse)
    if isinstance(node, (_ast.ListComp, _ast.SetComp, _ast.GeneratorExp, _ast.DictComp)):
        elts = [node.key, node.value] if isinstance(node, _ast.DictComp) else [node.elt]
        gens, n, mult = node.generators, 0, 1
        for i, g in enumerate(gens):  # each iter runs once per iteration of the generators before it
            n += mult * count(g.iter)
            k = _range_len(g.iter)
            inner = total(elts) + sum(total(h.ifs) for h in gens[i:]) + total(h.iter for h in gens[i + 1:])
            if k is None and inner:
                raise _Reject(f"unbounded loop {_line(node)}")
            mult *= k or 0
            n += mult * total(g.ifs)
        return n + mult * total(elts)
    if isinstance(node, (_ast.If, _ast.IfExp)):
        body, orelse = (node.body, node.orelse) if isinstance(node, _ast.If) else ([node.body], [node.orelse])
        return count(node.test) + max(total(body), total(orelse))
    own = int(isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id in ops)
    return own + total(_ast.iter_child_nodes(node))


def _problem_literals(problem):
    text = str(problem)
    nums = set(_re.findall(r"\d+(?:\.\d+)?", text)) | set(_re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")))
    return text, {n for n in nums if sum(c.isdigit() for c in n) >= 2}


def check_workflow(code, problem=None, allowed_ops=ALL_OPERATORS, max_calls=10):
    """Static check of a generated workflow, before any execution (ARCHITECTURE §3).
    Returns (ok, reason); reason is short and names the line, e.g. "import not allowed (line 3)"."""
    try:
        tree = _ast.parse(code)
    except SyntaxError as e:
        return False, f"syntax error (line {e.lineno})"
    except (ValueError, TypeError, MemoryError, RecursionError):  # null bytes, absurd nesting
        return False, "unparsable code"
    ops = set(allowed_ops)
    try:
        for n in _ast.walk(tree):  # first, so a top-level import is named as such
            if isinstance(n, (_ast.Import, _ast.ImportFrom)):
                raise _Reject(f"import not allowed {_line(n)}")
        body = tree.body
        if body and isinstance(body[0], _ast.Expr) and isinstance(body[0].value, _ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # a module docstring is fine
        solves = [n for n in body if isinstance(n, _ast.FunctionDef) and n.name == "solve"]
        if not solves:
            raise _Reject("no def solve(problem)")
        for n in body:
            if not (isinstance(n, _ast.FunctionDef) and n.name == "solve"):
                raise _Reject(f"top-level code not allowed {_line(n)}")
        if len(solves) > 1:
            raise _Reject(f"more than one solve {_line(solves[1])}")
        fn = solves[0]
        a = fn.args
        if (len(a.args) != 1 or a.posonlyargs or a.vararg or a.kwarg or a.kwonlyargs or a.defaults):
            raise _Reject(f"solve must take exactly one argument {_line(fn)}")
        if fn.decorator_list:
            raise _Reject(f"decorator not allowed {_line(fn)}")
        called = {id(n.func) for n in _ast.walk(fn) if isinstance(n, _ast.Call)}
        for n in _ast.walk(fn):
            if n is fn:
                continue
            if isinstance(n, (_ast.Import, _ast.ImportFrom)):
                raise _Reject(f"import not allowed {_line(n)}")
            if isinstance(n, _ast.While):
                raise _Reject(f"while loop not allowed {_line(n)}")
            if isinstance(n, (_ast.FunctionDef, _ast.AsyncFunctionDef, _ast.Lambda, _ast.ClassDef)):
                raise _Reject(f"nested function or class not allowed {_line(n)}")
            if isinstance(n, (_ast.Global, _ast.Nonlocal, _ast.Yield, _ast.YieldFrom, _ast.Await)):
                raise _Reject(f"{type(n).__name__.lower()} not allowed {_line(n)}")
            if isinstance(n, _ast.Name) and "__" in n.id:
                raise _Reject(f"dunder name {n.id} not allowed {_line(n)}")
            if isinstance(n, _ast.Attribute) and n.attr.startswith("_"):
                raise _Reject(f"attribute {n.attr} not allowed {_line(n)}")
            if isinstance(n, _ast.Attribute) and n.attr in ("format", "format_map"):
                raise _Reject(f"str.{n.attr} not allowed {_line(n)}")  # "{0.__class__}".format(x)
            if isinstance(n, _ast.Name) and n.id in ops and isinstance(n.ctx, _ast.Load) and id(n) not in called:
                raise _Reject(f"operator {n.id} must be called directly {_line(n)}")  # sorted(key=review)
            if isinstance(n, _ast.Call):
                if isinstance(n.func, _ast.Name):
                    if n.func.id not in ops and n.func.id not in SAFE_BUILTINS:
                        raise _Reject(f"call to {n.func.id} not allowed {_line(n)}")
                elif not isinstance(n.func, _ast.Attribute):
                    raise _Reject(f"indirect call not allowed {_line(n)}")
        _check_names(fn, ops)
        _check_arity(fn, ops)
        calls = sum(_count_calls(s, ops) for s in fn.body)
        if calls == 0:
            raise _Reject("no operator call")
        if calls > max_calls:
            raise _Reject(f"too many operator calls ({calls} > {max_calls})")
        if problem is not None:
            _check_copied(fn, *_problem_literals(problem))
    except _Reject as e:
        return False, str(e)
    except RecursionError:
        return False, "code nested too deeply"
    return True, "ok"


def _check_names(fn, ops):
    """Every name read in solve must exist at run time (a NameError there comes only after slow
    operator calls). Conservative: a name bound anywhere in solve counts as defined everywhere,
    whatever the order or branch, so valid code is never rejected."""
    defined = {fn.args.args[0].arg} | set(ops) | SAFE_BUILTINS | _EXCEPTION_NAMES
    for n in _ast.walk(fn):
        if isinstance(n, _ast.Name) and not isinstance(n.ctx, _ast.Load):
            defined.add(n.id)  # assignment, augmented, for, comprehension, with-as, walrus, del
        elif isinstance(n, (_ast.ExceptHandler, _ast.MatchAs, _ast.MatchStar)) and n.name:
            defined.add(n.name)  # bound by a plain string, not a Name node
        elif isinstance(n, _ast.MatchMapping) and n.rest:
            defined.add(n.rest)
    bad = [n for n in _ast.walk(fn) if isinstance(n, _ast.Name) and isinstance(n.ctx, _ast.Load) and n.id not in defined]
    if bad:
        bad = min(bad, key=lambda n: (n.lineno, n.col_offset))  # name the first one in the source
        raise _Reject(f"undefined name {bad.id} {_line(bad)}")


def _check_arity(fn, ops):
    """Operator calls must match the operator's signature (else an OperatorError at run time,
    possibly after other calls were paid for). Calls with *args or **kwargs are not checked."""
    calls = [n for n in _ast.walk(fn) if isinstance(n, _ast.Call) and isinstance(n.func, _ast.Name)
             and n.func.id in ops and n.func.id in OP_PARAMS]
    for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
        if any(isinstance(a, _ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
            continue
        name, params = n.func.id, OP_PARAMS[n.func.id]
        names = [p for p, _ in params]
        positional = names[:len(n.args)]
        for k in n.keywords:
            if k.arg not in names:
                raise _Reject(f"{name} has no argument {k.arg} {_line(n)}")
            if k.arg in positional:
                raise _Reject(f"{name} got argument {k.arg} twice {_line(n)}")
        given = set(positional) | {k.arg for k in n.keywords}
        lo, hi = sum(req for _, req in params), len(params)
        if len(n.args) > hi or any(req and p not in given for p, req in params):
            takes = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise _Reject(f"{name} takes {takes} arguments, got {len(n.args) + len(n.keywords)} {_line(n)}")


def _check_copied(fn, text, numbers):
    """No literal copied from the problem: numbers of 2+ digits (alone or inside a string) and
    strings of 8+ characters that occur in the problem text. The workflow must be structure,
    not the answer."""
    for n in _ast.walk(fn):
        if not isinstance(n, _ast.Constant):
            continue
        v = n.value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            s = repr(abs(v))
            if s in numbers or s.removesuffix(".0") in numbers:
                raise _Reject(f"literal {s} copied from the problem {_line(n)}")
        elif isinstance(v, str):
            if len(v.strip()) >= 8 and v.strip() in text:
                raise _Reject(f"string {v.strip()[:20]!r} copied from the problem {_line(n)}")
            for num in _re.findall(r"\d+(?:\.\d+)?", v):
                if num in numbers:
                    raise _Reject(f"literal {num} copied from the problem {_line(n)}")


def extract_code(completion):
    """Code of the first ```python (or ```py) block, else of the first ``` block of any kind; a
    missing closing fence is fine (generation stopped). None when there is no fence. With a
    prefill, pass prefill + completion."""
    for pat in (r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)(?:```|\Z)", r"```[^\n`]*\r?\n(.*?)(?:```|\Z)"):
        m = _re.search(pat, completion, flags=_re.S | _re.I)
        if m:
            return m.group(1)
    return None


# The completion starts inside the code block, at the first statement: `drafts = [` makes the
# tiny generator begin with operator calls instead of doing the arithmetic itself (measured on
# arith with SmolLM2-135M, T=0.8, top-p 0.95: ~5-25 % of workflows pass the checker with the
# prefill "```python\ndef solve(problem):", ~35-50 % with this one). It fixes only how the body
# starts; what goes in the list and what follows is the generator's choice.
PREFILLS = {
    "math": "```python\ndef solve(problem):\n    drafts = [",
    "qa": "```python\ndef solve(problem):\n    drafts = [",
    "code": f"```python\ndef solve(problem):\n    {_CODE_NAME}\n    drafts = [",
}
PREFILL = PREFILLS["math"]

SYSTEM_PROMPT = ("You write workflows. A workflow is a Python function solve(problem) that never solves the problem "
                 "itself: it passes `problem` to operators, which ask a language model and return strings.")
_REMIND = {"math": "it must not do the arithmetic itself", "qa": "it must not answer the question itself",
           "code": "it must not write the function itself"}


def prefill_for(family):
    return PREFILLS[family]


def build_prompt(problem, family, operators=None, max_calls=6):
    """Chat messages asking the generator for one workflow for `problem` (ARCHITECTURE §3): the role and
    the rules (system), few-shot turns, then the problem. Each user turn repeats the operator
    catalogue, then its problem. The completion is one ```python block; sample it after
    PREFILLS[family]. For a chat template without a system role (Gemma, older Mistral) the sampler
    folds the system text into the first user turn (model.chat_messages)."""
    if family not in FAMILY_OPERATORS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILY_OPERATORS)}")
    ops = list(operators or FAMILY_OPERATORS[family])
    catalogue = "\n".join(f"- {OPERATOR_DOCS[o][0]}: {OPERATOR_DOCS[o][1]}" for o in ops)
    rules = (f"Rules: define only solve(problem); call only the operators and simple builtins (len, str, int, "
             f"range, ...); no import, no eval; at most {max_calls} operator calls; loops only over range(N); "
             f"never copy numbers or text from the problem.")

    def turn(p):
        # the catalogue before the problem: it is then part of the prefix every prompt shares, so
        # sampling prefills only the problem (held-out sampling 1.5x faster)
        return f"Operators:\n{catalogue}\n\nProblem: {p}\n\nWrite solve(problem). It must call the operators; {_REMIND[family]}."

    msgs = [{"role": "system", "content": f"{SYSTEM_PROMPT}\n{rules}"}]
    for p, code in FEWSHOT[family]:
        msgs += [{"role": "user", "content": turn(p)}, {"role": "assistant", "content": f"```python\n{code}```"}]
    return msgs + [{"role": "user", "content": turn(problem)}]
