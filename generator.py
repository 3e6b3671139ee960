"""The generator: where workflows come from. A local model (base + the adapter of the iteration)
or a vLLM server that loads each iteration's adapter itself (ARCHITECTURE §10, README "vLLM recipe").

    python collect.py --run runs/x --iter 1 --generator-url http://localhost:8000/v1 --generator-name base

sampler() hides which: it returns sample(messages_list, n, temperature, seed, prefill), the same
rows from both sources (text, token ids, prompt ids, hit_cap), so collect.py and the refine
meta-agent need not know; the held-out evaluation of a SPOGW checkpoint asks for the local model
(local=True) even with --generator-url. The vLLM path is plain urllib, not the openai client:
load_lora_adapter is no OpenAI endpoint and answers plain text, the sampled ids come back in fields
the client's types do not declare, and a failure should stop the step at once (the client retries
silently) with the server's own message.
"""
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attention
import config
import executor
import lora
import model
import sampling
from jsonl import DataError

def load_generator(cfg, run_dir, it):
    """(model, tokenizer) of iteration `it`: the base model + the adapter trained at iteration it-1
    (saved as iter_<it>/adapter). With --generator-url the server samples: (None, tokenizer), and
    only the tokenizer is loaded (the full model in fp32 would be ~30 GB for a 7B one)."""
    if cfg["generator_url"]:
        return None, model.load_tokenizer(cfg["model"])
    mdl, tok = model.load_model(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    if it > 0:
        lora.load_adapter(mdl, adapter_dir(run_dir, it))
    return attention.use(mdl, cfg["prompt_kv"]), tok


def adapter_dir(run_dir, it):
    """iter_<it>/adapter, checked: the generator of iteration it >= 1 is the one trained at it-1."""
    d = Path(run_dir) / f"iter_{it}" / "adapter"
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise DataError(f"{d}: missing or incomplete (iteration {it} needs the adapter trained at iteration {it - 1})")
    return d


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


MAX_IN_FLIGHT = 64  # sample requests at once: vLLM batches concurrent requests; more would only queue


def sample_seed(seed, prompt, sample):
    """The seed of sample `sample` of prompt `prompt` (its index in the call) in a call seeded `seed`.
    vLLM gives every prompt of a request the request's seed and child i of n seed + i
    (vllm/v1/engine/parallel_sampling.py), so one request per chunk drew sample i of two identical
    prompts alike. A hash per (seed, prompt, sample), one n=1 request each, makes every sample its
    own draw, as the local sampler's one random stream does, and the same draw on a resumed run."""
    return config.seed_of(seed, prompt, sample)


def sample_remote(url, name, messages_list, n, max_new_tokens, temperature, top_p, seed, prefill, tokenizer,
                  stops=None):
    """n workflows per prompt from a vLLM server serving `name` (serve_generator):
    [[{text, token_ids, logprobs, prompt_ids, finish_reason}] * n] * len(messages_list), as sampling.sample.

    The prompts are rendered and tokenized here (sampling.prompt_ids: chat template + prefill, what
    training uses) and sent as token ids to /v1/completions, so the server continues exactly those
    tokens; a chat endpoint would render its own (a Qwen3 template inserts an empty think block
    before a continued assistant turn). Each sample is one n=1 request with its own seed
    (sample_seed), all sent at once; n=1 also keeps temperature 0 legal (vLLM refuses n > 1 there).
    `stops`: the stop ids of the model spogw reads (tokenizer eos + generation_config eos ids, as
    vLLM stops on), default the tokenizer's eos; complete_one checks the server stopped exactly there."""
    prompts = [sampling.prompt_ids(tokenizer, m, prefill) for m in messages_list]
    if not prompts:
        return []
    stops = stops or sampling.stop_ids(None, tokenizer)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_IN_FLIGHT, len(jobs))))
    try:
        futures = [pool.submit(complete_one, url, name, prompts[i], max_new_tokens, temperature, top_p,
                               sample_seed(seed, i, j), tokenizer, stops) for i, j in jobs]
        out = [f.result() for f in futures]  # the first failure raises; the rest are cancelled below
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def complete_one(url, name, prompt, max_new_tokens, temperature, top_p, seed, tokenizer, stops):
    """One sample of one token-id prompt: POST /completions with n=1 and `seed`. The reply's sampled
    ids (return_token_ids, and the logprobs' "token_id:<id>" tokens, which older servers support
    alone) are stored as they are, the stop token included; `logprobs` are the server's (vLLM V1's
    default --logprobs-mode raw_logprobs: the unscaled distribution, like sampling.sample; training
    recomputes pi_old itself); `text` is decoded here from the ids, without a final stop token, as
    sampling.sample's is."""
    # vLLM fills a sampling field the request leaves out from the model's generation_config.json
    # (Qwen2.5: top_k 20, repetition_penalty 1.05); sampling.sample applies temperature and top-p
    # only. top_k -1 is "off" in every vLLM (older ones refuse 0; current ones take -1 quietly).
    body = {"model": name, "prompt": prompt, "n": 1, "max_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "seed": seed, "logprobs": 0, "return_tokens_as_token_ids": True,
            "return_token_ids": True}
    code, text = vllm_request(url, "completions", body)
    where = f"generator at {url}: POST /completions (model {name!r})"
    if code != 200:
        msg = server_message(text)
        hint = (" (the prompt plus --max-new-tokens, --refine-tokens for the meta-agent, must fit the server's "
                "--max-model-len; README: vLLM recipe)") if re.search(r"context length|max_model_len", msg) else ""
        raise GeneratorError(f"{where}: HTTP {code}: {msg}{hint}")
    try:
        choices = json.loads(text)["choices"]
    except (ValueError, KeyError, TypeError):
        raise GeneratorError(f"{where}: not a completion: {text[:200]!r}") from None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise GeneratorError(f"{where}: {len(choices) if isinstance(choices, list) else 'no'} choices for n=1")
    ch = choices[0]
    ids, logprobs = sampled_ids(where, ch, prompt)
    check_stops(where, ids, max_new_tokens, stops)
    text_ids = ids[:-1] if ids and ids[-1] in stops else ids
    return {"text": tokenizer.decode(text_ids, skip_special_tokens=True), "token_ids": ids, "logprobs": logprobs,
            "prompt_ids": list(prompt), "finish_reason": ch.get("finish_reason")}


def sampled_ids(where, ch, prompt):
    """(token ids, log-probs) of one completion choice, checked against each other and the prompt."""
    lp = ch.get("logprobs")
    tokens, logprobs = (lp.get("tokens"), lp.get("token_logprobs")) if isinstance(lp, dict) else (None, None)
    if (not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs)
            or not all(isinstance(x, (int, float)) for x in logprobs)):
        raise GeneratorError(f"{where}: the choice has no per-token logprobs")
    found = [re.fullmatch(r"token_id:(\d+)", t) if isinstance(t, str) else None for t in tokens]
    if not all(found):
        raise GeneratorError(f"{where}: the logprobs name tokens by text, not by id, so the sampled ids are "
                             f"unknown; use a vLLM that supports return_tokens_as_token_ids, or start it with "
                             f"--return-tokens-as-token-ids")
    ids = [int(f.group(1)) for f in found]
    if ch.get("token_ids") is not None and list(ch["token_ids"]) != ids:
        raise GeneratorError(f"{where}: token_ids and the logprobs' tokens differ")
    if ch.get("prompt_token_ids") is not None and list(ch["prompt_token_ids"]) != list(prompt):
        raise GeneratorError(f"{where}: the server sampled after other prompt ids than were sent")
    return ids, [float(x) for x in logprobs]


def check_stops(where, ids, cap, stops):
    """A completion ends on its first stop id or at the cap, as sampling.decode's do. A server that
    went on past a stop id, or ended early on another token, stops on other ids than spogw (another
    model or generation_config.json than --model): its samples are another distribution, refused."""
    early = next((k for k, t in enumerate(ids[:-1]) if t in stops), None)
    odd = early is not None or (len(ids) < cap and not (ids and ids[-1] in stops))
    if odd:
        what = (f"went on past stop token {ids[early]} (position {early})" if early is not None else
                f"ended after {len(ids)} of {cap} tokens on token {ids[-1] if ids else None}, no stop token")
        raise GeneratorError(f"{where}: the server {what}; spogw's stop ids are {sorted(stops)} (the tokenizer's "
                             f"eos and generation_config.json's eos_token_id of --model): serve the same model dir")


def preflight_generator(cfg):
    """GET /models of --generator-url before any sampling: an unreachable server or a name it does
    not serve fails here in seconds (InfraError naming the URL and the server's answer)."""
    url, name = cfg.get("generator_url"), cfg.get("generator_name") or cfg.get("model")
    if not url:
        return
    try:
        ids = served_models(url)
    except GeneratorError as e:  # before any work: the run cannot start, like a failed executor preflight
        raise executor.InfraError(str(e), fatal=True) from None
    if name not in ids:
        raise executor.InfraError(f"generator at {url} does not serve {name!r} (it serves {', '.join(map(repr, ids)) or 'nothing'}); "
                         f"set --generator-name", fatal=True)


def stop_ids_of(model_name, mdl, tok):
    """The ids that end a completion, for both samplers: the tokenizer's eos and every eos id of the
    model's generation_config (vLLM stops on all of them too). Without a loaded model (the remote
    path loads the tokenizer alone) generation_config.json is read from `model_name`'s dir (--model)."""
    gc = getattr(mdl, "generation_config", None) if mdl is not None else model.load_generation_config(model_name)
    return sampling.stop_ids(mdl, tok, gc)


def sampler(cfg, run_dir, it, loaded=None, max_new_tokens=None, local=False):
    """sample(messages_list, n, temperature, seed, prefill, guides=()) -> [[{text, token_ids, logprobs,
    prompt_ids, hit_cap}] * n + one entry per guide text (guide: True)] per prompt, from iteration
    `it`'s generator: --generator-url's server (unless `local`) or `loaded` = (model, tokenizer), else
    loaded by load_generator on first use (so a finished step resumes without loading anything).
    hit_cap: the completion ran into max_new_tokens (default cfg["max_new_tokens"]). A sampler is one
    state of the generator: locally it keeps the prompts' shared prefix's keys/values between calls
    (sampling._prefill), so the weights must not change while it is used; make a new one after training."""
    held = {"prefixes": {}}  # the rest filled on the first call: (model or None, tokenizer), served name, stop ids
    cap = max_new_tokens or cfg["max_new_tokens"]
    remote = bool(cfg["generator_url"]) and not local

    def sample(messages_list, n, temperature, seed, prefill, guides=()):
        if "generator" not in held:
            held["generator"] = loaded or load_generator(cfg, run_dir, it)
            held["served_name"] = serve_generator(cfg, run_dir, it) if remote else None
            held["stops"] = stop_ids_of(cfg["model"], *held["generator"])
        mdl, tok = held["generator"]
        if remote:
            out = sample_remote(cfg["generator_url"], held["served_name"], messages_list, n, cap, temperature, cfg["top_p"],
                                seed, prefill, tok, held["stops"])
        else:
            out = sampling.sample(mdl, tok, messages_list, n=n, max_new_tokens=cap, temperature=temperature,
                                  top_p=cfg["top_p"], seed=seed, prefill=prefill, prefixes=held["prefixes"])
        # the ids decide, on both paths: older vLLM reports an eos landing exactly on the cap as "length"
        out = [[dict(s, hit_cap=sampling.hit_cap(s["token_ids"], cap, held["stops"])) for s in per] for per in out]
        # guides: given completions after each prompt's n samples, tokenized as the sampler would end them
        # (text, then the turn's end), with the prompt ids its samples saw; no log-probs (nothing sampled them)
        ends = [tok.eos_token_id] if tok.eos_token_id is not None else []
        guide_ids = [tok(g, add_special_tokens=False)["input_ids"] + ends for g in guides]  # once, not per prompt
        return [per + [{"text": g, "token_ids": list(ids), "logprobs": None, "hit_cap": False, "guide": True,
                        "prompt_ids": per[0].get("prompt_ids") if per else None} for g, ids in zip(guides, guide_ids)]
                for per in out]
    return sample
