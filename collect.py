"""Sample m workflows per problem from the generator, run each in the sandbox, score -> rollouts.

    python collect.py --run runs/default --iter 0                      # embedded default, arith
    python collect.py --run runs/x --iter 1 --bench gsm8k --executor-url https://api.openai.com/v1 \
        --executor-model gpt-4o-mini --runs 3
    python collect.py --run runs/x --iter 1 --generator-url http://localhost:8000/v1 --generator-name base

One row per (problem, sample) is appended to runs/<run>/iter_<k>/rollouts.jsonl as soon as that
workflow is scored (ARCHITECTURE §11). Resumable: problems are sampled in fixed chunks with a seed per
chunk, so a restarted run regenerates exactly the same completions and only executes the missing
(problem, sample) rows; the finished file equals an uninterrupted run's, up to row order.
Settings not given on the command line come from runs/<run>/config.json (written by train.py).
With --generator-url a vLLM server samples (README "vLLM recipe"): iteration 0 from the base model
it serves as --generator-name, iteration k >= 1 from iter_k/adapter, which is loaded into the server
under a name of its own first (serve_generator).
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from jsonl import DataError, append_jsonl, read_json, read_jsonl, truncate_torn_tail, update_json
from operators import ExecutorError, InfraError

CAP_WARN = 0.10  # warn when more than this fraction of completions ran into the token cap
DEFAULTS = dict(model="smollm2-135m", bench="arith", data_dir=None, problems=10, m=8, runs=1,
                temperature=0.8, top_p=0.95, max_new_tokens=128, gen_batch=4, max_calls=6,
                executor="local", executor_model=None, timeout=30.0, workers=16, seed=0,
                generator_url=None, generator_name=None, device="cpu", dtype="auto", threads=0, call_tokens=0, servers=0,
                max_in_flight=0, max_fail_frac=0.5, fail_window=20, executor_retries=None, executor_backoff=None)


def add_args(ap):
    """Collection knobs (shared with train.py's driver). None = take config.json / DEFAULTS."""
    g = ap.add_argument_group("collect")
    g.add_argument("--model", help="generator: HF dir / hub id / .gguf / embedded name")
    g.add_argument("--bench", help="arith | gsm8k | math | humaneval | mbpp | hotpotqa | drop")
    g.add_argument("--data-dir", help="benchmark data dir (default $SPOGW_DATA or ./data)")
    g.add_argument("--problems", type=int, help="training problems per iteration")
    g.add_argument("--m", type=int, help="workflows sampled per problem")
    g.add_argument("--runs", type=int, help="executions per workflow (score = mean)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--max-new-tokens", type=int, help="generator completion length")
    g.add_argument("--gen-batch", type=int, help="problems per generation chunk (fixed: it seeds the chunks)")
    g.add_argument("--max-calls", type=int, help="operator calls allowed per workflow")
    g.add_argument("--executor", help="'local' (embedded server), 'none', or an OpenAI-compatible URL")
    g.add_argument("--executor-url", dest="executor", help="alias of --executor URL")
    g.add_argument("--executor-model", help="model name at the executor endpoint")
    g.add_argument("--servers", type=int, help="local executor: server processes (0 = auto: one per core, at most 4)")
    g.add_argument("--timeout", type=float, help="seconds per workflow run")
    g.add_argument("--workers", type=int, help="sandboxes run concurrently")
    g.add_argument("--seed", type=int)
    g.add_argument("--generator-url", help="sample workflows from a vLLM server instead (README: vLLM recipe)")
    g.add_argument("--generator-name", help="the base model's name at --generator-url (default: --model); "
                                            "iterations >= 1 load their adapter under a name of their own")
    g.add_argument("--device", help="cpu | cuda")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="generator weights and forward precision (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--threads", type=int, help="torch CPU threads here (0 = auto: leave a core to the local executor)")
    g.add_argument("--call-tokens", type=int, help="cap on each executor reply, in tokens (0 = auto: 160 for the "
                                                   "local executor, the operators' own limits otherwise)")
    g.add_argument("--max-in-flight", type=int, help="executor requests at once across all sandboxes (API rate "
                                                     "tiers; 0 = unbounded)")
    g.add_argument("--max-fail-frac", type=float, help="stop (exit 2) when more than this fraction of the last "
                                                       "--fail-window executor calls failed after retries (1 = never)")
    g.add_argument("--fail-window", type=int, help="executor calls that --max-fail-frac looks back on")
    g.add_argument("--executor-retries", type=int, help="retries of an executor call on 429 / 5xx / timeouts / "
                                                        "connection errors (default 5; local executor 2)")
    g.add_argument("--executor-backoff", type=float, help="seconds before the first retry, doubled each time (default 1)")


def settings(run_dir, args):
    """config.json of the run, overridden by explicit CLI values, filled from DEFAULTS."""
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in read_json(Path(run_dir) / "config.json", {}).items() if k in DEFAULTS})
    cfg.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return cfg


def executor_cache(cfg):
    """One on-disk executor cache per machine: re-running any step, or evaluating the same workflow
    twice, costs no executor call (keys include the executor's model name)."""
    import model as M
    return str(M.cache_root() / "executor")


def preflight_generator(cfg):
    """GET /models of --generator-url before any sampling: an unreachable server or a name it does
    not serve fails here in seconds (InfraError naming the URL and the server's answer)."""
    url, name = cfg.get("generator_url"), cfg.get("generator_name") or cfg.get("model")
    if not url:
        return
    try:
        ids = served_models(url)
    except GeneratorError as e:  # before any work: the run cannot start, like a failed executor preflight
        raise InfraError(str(e), fatal=True) from None
    if name not in ids:
        raise InfraError(f"generator at {url} does not serve {name!r} (it serves {', '.join(map(repr, ids)) or 'nothing'}); "
                         f"set --generator-name", fatal=True)


@contextlib.contextmanager
def open_executor(cfg, generator=True):
    """`with open_executor(cfg) as ex:` -- the run's executor (operators.make_executor), checked by
    one request (Executor.preflight) before it is handed out, and --generator-url's /models when
    `generator` (the step samples from it). The local executor runs one single-threaded server per
    core: while workflows execute the generator is mostly idle, and a second server turned that
    idle core into ~1.3-1.5x executor throughput."""
    import os
    import operators as O
    for k, lo, hi in (("max_in_flight", 0, None), ("max_fail_frac", 0, 1), ("fail_window", 1, None),
                      ("executor_retries", 0, None), ("executor_backoff", 0, None)):
        v = cfg.get(k)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            raise DataError(f"--{k.replace('_', '-')} must be {'between %g and %g' % (lo, hi) if hi else '>= %g' % lo}, got {v}")
    if generator:
        preflight_generator(cfg)
    if cfg["executor"] == "local":
        import torch
        if torch.cuda.is_available():
            print("note: --executor local serves on the CPU; on a GPU serve the executor there and pass "
                  "--executor-url (README, Scaling up)", file=sys.stderr)
    client = dict(max_in_flight=cfg.get("max_in_flight"), max_fail_frac=cfg.get("max_fail_frac"),
                  fail_window=cfg.get("fail_window"), max_retries=cfg.get("executor_retries"),
                  base_delay=cfg.get("executor_backoff"))
    servers = cfg["servers"] or max(1, min(4, os.cpu_count() or 1))
    with O.make_executor(cfg["executor"], cfg["executor_model"], executor_cache(cfg), servers=servers,
                         **{k: v for k, v in client.items() if v is not None}) as ex:
        if ex is not None:
            ex.preflight()
        yield ex


def require_scored(lost, out):
    """After a step: rows left out because the executor failed (`lost`: one message each) stop the
    run with InfraError. The rows written stay; a rerun redoes only the missing ones."""
    if lost:
        raise InfraError(f"{len(lost)} workflow(s) not scored because the executor failed; the rows scored so far "
                         f"are kept in {out}, rerun to redo the rest. Last failure: {lost[-1]}")


def set_threads(cfg):
    """Torch's OpenMP threads spin while they wait: on a small CPU shared with the local executor
    server and the sandboxes, two threads ran ~10x slower than one. Auto = every core but one
    when the executor runs on this machine."""
    import os
    import torch
    n = cfg["threads"] or (max(1, (os.cpu_count() or 2) - 1) if cfg["executor"] == "local" else 0)
    if n:
        torch.set_num_threads(n)


def call_tokens(cfg):
    """The per-reply token cap of this run (None = none). The embedded 135M executor on a CPU makes
    ~40 tokens/s and, once it has not answered in ~150 tokens, mostly loops: capping it at 160 keeps
    runs short without changing what it gets right. Real executors keep the operators' limits."""
    n = cfg.get("call_tokens") or (160 if cfg.get("executor") == "local" else 0)
    return n or None


def run_context(problem, cfg, sample_index=0):
    """What operators see of one run: the problem's fields, the run index, the reply cap."""
    cap = call_tokens(cfg)
    return {**problem, "sample_index": sample_index, **({"max_tokens": cap} if cap else {})}


def chunk_seed(seed, it, chunk):
    return int(hashlib.sha256(f"{seed}:{it}:{chunk}".encode()).hexdigest()[:8], 16)


def problems_for(cfg, it):
    import benchmarks
    # a fresh seeded subset each iteration: the generator sees new problems every round
    return benchmarks.load(cfg["bench"], "train", cfg["data_dir"], limit=cfg["problems"], seed=cfg["seed"] * 1000 + it)


def load_generator(cfg, run_dir, it):
    """(model, tokenizer) of iteration `it`: the base model + the adapter trained at iteration it-1
    (saved as iter_<it>/adapter). With --generator-url the server samples: (None, tokenizer), and
    only the tokenizer is loaded (the full model in fp32 would be ~30 GB for a 7B one)."""
    import model as M
    if cfg["generator_url"]:
        return None, M.load_tokenizer(cfg["model"])
    mdl, tok = M.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    if it > 0:
        M.load_adapter(mdl, adapter_dir(run_dir, it))
    return mdl, tok


def adapter_dir(run_dir, it):
    """iter_<it>/adapter, checked: the generator of iteration it >= 1 is the one trained at it-1."""
    d = Path(run_dir) / f"iter_{it}" / "adapter"
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise DataError(f"{d}: missing or incomplete (iteration {it} needs the adapter trained at iteration {it - 1})")
    return d


# ---- the vLLM generator (--generator-url) ----------------------------------------------------------
# Plain urllib, not the openai client: load_lora_adapter is no OpenAI endpoint and answers plain text,
# the sampled ids come back in fields the client's types do not declare, and a failure should stop
# the step at once (the client retries silently) with the server's own message.

GENERATOR_TIMEOUT = 600.0  # seconds per request: one request samples n completions of several prompts


class GeneratorError(ValueError):
    """The --generator-url server failed: unreachable, refused an adapter or a request, or answered
    something that is not a vLLM reply. An infrastructure fault, never a sample; the CLIs exit 2."""


def vllm_request(url, path, body=None, timeout=GENERATOR_TIMEOUT):
    """(HTTP status, reply text) of GET <url>/<path> (body None) or POST of the JSON `body`. A status
    >= 400 is returned for the caller to word; no answer at all is a GeneratorError naming the URL."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("VLLM_API_KEY"):  # the key a `vllm serve --api-key` / $VLLM_API_KEY server wants
        headers["Authorization"] = f"Bearer {os.environ['VLLM_API_KEY']}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: not an http(s) URL
        reason = getattr(e, "reason", None) or e
        raise GeneratorError(f"generator at {url}: {'GET' if body is None else 'POST'} /{path}: no answer "
                             f"({type(reason).__name__}: {reason}); is the vLLM server up?") from None


def server_message(text):
    """The error message of a vLLM error body ({"error": {"message"}} or {"message"}), else the text."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    err = obj.get("error") if isinstance(obj, dict) else None
    msg = err.get("message") if isinstance(err, dict) else obj.get("message") if isinstance(obj, dict) else None
    return str(msg if msg is not None else text.strip())[:500]


def adapter_name(run_dir, it, adapter):
    """The served name of iteration `it`'s adapter: <run dir name>-<12 hex>-iter<it>, the hex from the
    adapter's absolute path and the bytes of its two files. vLLM refuses to load a second adapter
    under a name it has, so each run, iteration and adapter version gets its own; and one name
    always means one path with one content, which is what lets a restart reuse it (serve_generator)."""
    h = hashlib.sha256(str(Path(adapter).resolve()).encode())
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(b"\0" + (Path(adapter) / f).read_bytes())
    run = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(run_dir).resolve().name) or "run"
    return f"{run}-{h.hexdigest()[:12]}-iter{it}"


def served_models(url):
    """{id: model card} of GET <url>/models (vLLM lists its base model(s) and every loaded adapter,
    an adapter's card with `root` = the path it was loaded from)."""
    code, text = vllm_request(url, "models", timeout=60.0)
    if code != 200:
        raise GeneratorError(f"generator at {url}: GET /models: HTTP {code}: {server_message(text)}")
    try:
        return {m["id"]: m for m in json.loads(text)["data"]}
    except (ValueError, KeyError, TypeError):
        raise GeneratorError(f"generator at {url}: GET /models: not a model list: {text[:200]!r}") from None


def serve_generator(cfg, run_dir, it):
    """The name to sample iteration `it` under at --generator-url: the base model (--generator-name,
    default --model) at it = 0; else iter_<it>/adapter, loaded first (POST /load_lora_adapter, which
    needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server) under adapter_name's fresh name.
    vLLM answers 400 "has already been loaded" when the name exists, e.g. after this run restarted
    against the same server: that counts as loaded only when the server lists the name with our
    adapter's path as its root -- the name fixes the path and the bytes, the root confirms it is ours.
    A refusal (LoRA disabled, rank over --max-lora-rank, a path the server cannot read) is a
    GeneratorError with the server's message."""
    url = cfg["generator_url"]
    if it == 0:
        return cfg["generator_name"] or cfg["model"]
    path = adapter_dir(run_dir, it).resolve()
    name = adapter_name(run_dir, it, path)
    code, text = vllm_request(url, "load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    if code == 200:
        return name
    msg = server_message(text)
    if code == 400 and "already" in msg.lower():
        card = served_models(url).get(name)
        if card is not None and card.get("root") == str(path):
            return name
        raise GeneratorError(f"generator at {url} already has an adapter named {name!r}, loaded from "
                             f"{card.get('root') if card else '(not listed)'}, not {path}; restart the server")
    hint = (" (start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --max-lora-rank >= "
            "--lora-r, and let it read the run directory; README: vLLM recipe)")
    raise GeneratorError(f"generator at {url}: loading adapter {path} as {name!r}: HTTP {code}: {msg}{hint}")


def sample_remote(url, name, messages_list, n, max_new_tokens, temperature, top_p, seed, prefill, tokenizer):
    """n workflows per prompt from a vLLM server serving `name` (serve_generator):
    [[{text, token_ids, logprobs, prompt_ids, finish_reason}] * n] * len(messages_list), as model.sample.

    The prompts are rendered and tokenized here (model.prompt_ids: chat template + prefill, what
    training uses) and sent as token ids to /v1/completions, so the server continues exactly those
    tokens; a chat endpoint would render its own (a Qwen3 template inserts an empty think block
    before a continued assistant turn). The reply's sampled ids (return_token_ids, and the logprobs'
    "token_id:<id>" tokens, which older servers support alone) are stored as they are, the stop
    token included when the model stopped on one; `logprobs` are the server's (vLLM V1's default
    --logprobs-mode raw_logprobs: the unscaled distribution, like model.sample; training recomputes
    pi_old itself); `text` is decoded here from the ids. One request
    carries every prompt with `seed` (vLLM seeds the i-th of the n samples with seed + i), so a
    resumed run regenerates the same samples where the server honours seeds."""
    import model as M
    prompts = [M.prompt_ids(tokenizer, m, prefill) for m in messages_list]
    if not prompts:
        return []
    # vLLM fills a sampling field the request leaves out from the model's generation_config.json
    # (Qwen2.5: top_k 20, repetition_penalty 1.05); model.sample applies temperature and top-p only
    body = {"model": name, "prompt": prompts, "n": n, "max_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "seed": seed, "logprobs": 0, "return_tokens_as_token_ids": True,
            "return_token_ids": True}
    code, text = vllm_request(url, "completions", body)
    where = f"generator at {url}: POST /completions (model {name!r})"
    if code != 200:
        raise GeneratorError(f"{where}: HTTP {code}: {server_message(text)}")
    try:
        choices = json.loads(text)["choices"]
    except (ValueError, KeyError, TypeError):
        raise GeneratorError(f"{where}: not a completion: {text[:200]!r}") from None
    if not isinstance(choices, list) or len(choices) != len(prompts) * n:
        raise GeneratorError(f"{where}: {len(choices) if isinstance(choices, list) else 'no'} choices for "
                             f"{len(prompts)} prompts x n={n}")
    out = []
    for i, ch in enumerate(choices):  # vLLM orders them prompt-major, the n of prompt 0 first
        p = prompts[i // n]
        lp = ch.get("logprobs") if isinstance(ch, dict) else None
        tokens, logprobs = (lp.get("tokens"), lp.get("token_logprobs")) if isinstance(lp, dict) else (None, None)
        if (not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs)
                or not all(isinstance(x, (int, float)) for x in logprobs)):
            raise GeneratorError(f"{where}: choice {i} has no per-token logprobs")
        found = [re.fullmatch(r"token_id:(\d+)", t) if isinstance(t, str) else None for t in tokens]
        if not all(found):
            raise GeneratorError(f"{where}: the logprobs name tokens by text, not by id, so the sampled ids are "
                                 f"unknown; use a vLLM that supports return_tokens_as_token_ids, or start it with "
                                 f"--return-tokens-as-token-ids")
        ids = [int(f.group(1)) for f in found]
        if ch.get("token_ids") is not None and list(ch["token_ids"]) != ids:
            raise GeneratorError(f"{where}: choice {i}: token_ids and the logprobs' tokens differ")
        if ch.get("prompt_token_ids") is not None and list(ch["prompt_token_ids"]) != p:
            raise GeneratorError(f"{where}: choice {i}: the server sampled after other prompt ids than were sent")
        out.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                    "logprobs": [float(x) for x in logprobs], "prompt_ids": list(p),
                    "finish_reason": ch.get("finish_reason")})
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def capped(sample, cap, stops):
    """Did this completion run into the token cap? A server says so itself (finish_reason "length");
    locally it is a completion at the cap whose last token is no stop id."""
    import model as M
    if sample.get("finish_reason") is not None:
        return sample["finish_reason"] == "length"
    return M.hit_cap(sample["token_ids"], cap, stops)


def workflow_row(problem, j, prompt, prefill, completion, ids, family_ops, max_calls, prompt_ids=None, hit_cap=None):
    """The row before execution: verbatim completion, extracted code, static check. prompt_ids: the
    token ids the sampler saw (template + prefill), which training uses instead of re-rendering
    `prompt`; hit_cap: the completion ran into max_new_tokens (counted in the stats)."""
    import operators as O
    code = O.extract_code(prefill + completion)
    if code is None:
        ok, reason = False, "no python block"
    else:
        ok, reason = O.check_workflow(code, problem["problem"], allowed_ops=family_ops, max_calls=max_calls)
    row = {"problem_id": problem["id"], "sample": j, "prompt": prompt, "prefill": prefill,
           "completion": completion, "completion_ids": ids, "code": code, "valid": bool(ok),
           "reason": None if ok else reason}
    if prompt_ids is not None:
        row["prompt_ids"] = list(prompt_ids)
    if hit_cap is not None:
        row["hit_cap"] = bool(hit_cap)
    return row


def cap_warning(rows, knob, cap):
    """(fraction of rows whose completion hit the token cap, a warning line or None). Defaults sized
    for a 135M model cut a bigger model's workflows off mid-block; the run says so."""
    frac = statistics.fmean(bool(r.get("hit_cap")) for r in rows) if rows else 0.0
    if frac <= CAP_WARN:
        return frac, None
    return frac, (f"warning: {frac:.0%} of the completions hit {knob} {cap} and were cut off; "
                  f"raise {knob} for this model")


def execute(rows, problems, cfg, executor, bench, f, progress=None):
    """Run every valid workflow cfg['runs'] times in the sandbox pool; append each row when its
    last run is scored. Invalid workflows are written at once with score 0. A run that met an
    executor failure (result["infra_error"]) is no score: its row is left out (a rerun redoes it)
    and returned as one message in the list this returns; once the executor has tripped (a fatal
    error, too many failures) InfraError stops the step at once, the rows written so far kept."""
    import benchmarks
    import operators as O
    import sandbox
    by_id = {p["id"]: p for p in problems}
    ops = {k: O.OPERATORS[k] for k in O.OPERATOR_SETS[benchmarks.family(bench)]}
    jobs, owners = [], []
    for i, row in enumerate(rows):
        if not row["valid"]:
            row.update(scores=[0.0], score=0.0, answers=[None], errors=[f"invalid: {row['reason']}"], calls=0,
                       prompt_tokens=0, completion_tokens=0, cost_usd=0.0, seconds=0.0)
            append_jsonl(f, row)
            if progress:
                progress(row)
            continue
        p = by_id[row["problem_id"]]
        for r in range(cfg["runs"]):
            jobs.append(dict(code=row["code"], problem=p["problem"], executor=executor, operators=ops,
                             context=run_context(p, cfg, r), timeout=cfg["timeout"], max_calls=cfg["max_calls"]))
            owners.append(i)
    results = {i: [] for i in set(owners)}
    lost = []
    for k, res in sandbox.run_many(jobs, workers=cfg["workers"]):
        i = owners[k]
        if res["infra_error"] and getattr(executor, "tripped", None):
            raise InfraError(f"{executor.tripped}\nrows scored so far are kept in {f.name}; rerun to resume", fatal=True)
        res["score"] = 0.0 if res["error"] else benchmarks.score(bench, by_id[rows[i]["problem_id"]], res["answer"])
        results[i].append(res)
        if len(results[i]) == cfg["runs"]:
            rs, row = results.pop(i), rows[i]
            if any(x["infra_error"] for x in rs):
                lost.append(next(x["infra_error"] for x in rs if x["infra_error"]))
                continue
            row.update(scores=[x["score"] for x in rs], score=statistics.fmean(x["score"] for x in rs),
                       answers=[x["answer"] for x in rs], errors=[x["error"] for x in rs],
                       calls=sum(x["calls"] for x in rs), prompt_tokens=sum(x["prompt_tokens"] for x in rs),
                       completion_tokens=sum(x["completion_tokens"] for x in rs),
                       cost_usd=sum(x["cost_usd"] for x in rs), seconds=sum(x["seconds"] for x in rs))
            append_jsonl(f, row)
            if progress:
                progress(row)
    return lost


def pipelined(chunks, generate, run):
    """rows = generate(chunk) here while run(rows, chunk) of the previous chunk goes on in a second
    thread: sampling (a torch thread) and execution (the executor, the sandboxes) use different
    cores, so neither waits for the other. An error in either surfaces here."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        fut = None
        for chunk in chunks:
            if fut and fut.done():
                fut.result()  # a failed run stops us before the next (slow) sampling
            rows = generate(chunk)
            if fut:
                fut.result()
            fut = pool.submit(run, rows, chunk)
        if fut:
            fut.result()


def collect(run_dir, it, cfg, executor=None, generator=None):
    """Fill iter_<it>/rollouts.jsonl; returns the collect stats. `generator` = (model, tokenizer)
    to reuse a loaded one (the driver does), else it is loaded here."""
    import benchmarks
    import model as M
    import operators as O
    from tqdm import tqdm

    d = Path(run_dir) / f"iter_{it}"
    d.mkdir(parents=True, exist_ok=True)
    out = d / "rollouts.jsonl"
    problems = problems_for(cfg, it)
    fam = benchmarks.family(cfg["bench"])
    truncate_torn_tail(out)  # a kill mid-write leaves half a row: drop it, it will be redone
    done = {(r["problem_id"], r["sample"]) for r in read_jsonl(out)} if out.exists() else set()
    total = len(problems) * cfg["m"]
    t0 = time.time()
    if len(done) < total:
        mdl, tok = generator or load_generator(cfg, run_dir, it)
        served = serve_generator(cfg, run_dir, it) if cfg["generator_url"] else None
        stats = {"n": len(done), "valid": 0, "score": 0.0, "tokens": 0, "seen": 0}
        bar = tqdm(total=total, initial=len(done), desc=f"collect iter {it}", unit="wf", dynamic_ncols=True)

        def progress(row):
            stats["seen"] += 1
            stats["valid"] += row["valid"]
            stats["score"] += row["score"]
            stats["tokens"] += row["prompt_tokens"] + row["completion_tokens"]
            bar.update(1)
            bar.set_postfix(valid=f"{stats['valid'] / stats['seen']:.0%}", score=f"{stats['score'] / stats['seen']:.2f}",
                            exec_tok=stats["tokens"])

        stops = M.stop_ids(mdl, tok)
        B = cfg["gen_batch"]
        chunks = [(c // B, problems[c:c + B]) for c in range(0, len(problems), B)]
        chunks = [(k, ch) for k, ch in chunks if not all((p["id"], j) in done for p in ch for j in range(cfg["m"]))]

        def generate(item):
            k, chunk = item
            msgs = [O.build_prompt(p["problem"], fam, max_calls=cfg["max_calls"]) for p in chunk]
            seed = chunk_seed(cfg["seed"], it, k)  # per chunk: a resumed run regenerates the same samples
            if cfg["generator_url"]:
                samples = sample_remote(cfg["generator_url"], served, msgs, cfg["m"], cfg["max_new_tokens"],
                                        cfg["temperature"], cfg["top_p"], seed, O.PREFILLS[fam], tok)
            else:
                samples = M.sample(mdl, tok, msgs, n=cfg["m"], max_new_tokens=cfg["max_new_tokens"],
                                   temperature=cfg["temperature"], top_p=cfg["top_p"], seed=seed,
                                   prefill=O.PREFILLS[fam])
            return [workflow_row(p, j, m, O.PREFILLS[fam], s["text"], s["token_ids"], O.OPERATOR_SETS[fam], cfg["max_calls"],
                                 prompt_ids=s.get("prompt_ids"), hit_cap=capped(s, cfg["max_new_tokens"], stops))
                    for p, m, per in zip(chunk, msgs, samples) for j, s in enumerate(per) if (p["id"], j) not in done]

        lost = []
        with open(out, "a", encoding="utf-8") as f:
            pipelined(chunks, generate,
                      lambda rows, item: lost.extend(execute(rows, item[1], cfg, executor, cfg["bench"], f, progress)))
        bar.close()
        require_scored(lost, out)
    rows = read_jsonl(out)
    if len(rows) != total or len({(r["problem_id"], r["sample"]) for r in rows}) != total:
        raise DataError(f"{out}: expected {total} distinct (problem, sample) rows, found {len(rows)}")
    stats = {"rows": total, "valid_fraction": sum(r["valid"] for r in rows) / total,
             "mean_score": statistics.fmean(r["score"] for r in rows),
             "mean_score_valid": statistics.fmean([r["score"] for r in rows if r["valid"]] or [0.0]),
             "executor_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
             "cost_usd": sum(r["cost_usd"] for r in rows), "seconds": time.time() - t0}
    stats["hit_cap_fraction"], warning = cap_warning(rows, "--max-new-tokens", cfg["max_new_tokens"])
    if warning:
        print(warning, file=sys.stderr)
    update_json(d / "stats.json", "collect", stats)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--iter", type=int, required=True)
    add_args(ap)
    ap.add_argument("--mode", choices=["spogw", "refine"], default="spogw",
                    help="refine: W4S multi-turn workflow refinement trained with RWR (refine.py)")
    import refine
    refine.add_args(ap)
    args = ap.parse_args(argv)
    if args.mode == "refine":
        return refine.collect_main(args)
    try:
        cfg = settings(args.run, args)
        set_threads(cfg)
        with open_executor(cfg) as ex:
            stats = collect(args.run, args.iter, cfg, executor=ex)
    except (DataError, ValueError, ExecutorError) as e:  # here: the endpoint's, never a workflow's
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
