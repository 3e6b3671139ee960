"""A loopback stand-in for a vLLM server (`vllm serve --enable-lora`, runtime LoRA updating on):
GET /v1/models, POST /v1/load_lora_adapter, POST /v1/completions with token-id prompts, n, seed and
logprobs. It samples with real models -- the tiny base model, or the base with the adapter loaded
under the requested name -- and is as strict as vLLM where spogw could go wrong unnoticed (what it
models was read in vLLM's source, README "vLLM recipe"):

- seeds: every prompt of a request gets the request's one seed, and child i of n is seeded
  seed + i (vllm/v1/engine/parallel_sampling.py), so identical prompts sample identically;
- stops: on the tokenizer's eos and on every eos id of the model dir's generation_config.json
  (SamplingParams.update_from_generation_config), the stop token kept in the ids;
- defaults: a sampling field the request leaves out (None) comes from generation_config.json
  (ModelConfig.get_diff_sampling_param: repetition_penalty, temperature, top_k, top_p, min_p,
  max_new_tokens), else OpenAI's neutral value, and the stub then really samples with it;
- refusals: HTTP 400 when prompt + max_tokens exceeds max_model_len, for top_k < -1, and for n > 1
  at temperature 0; error bodies {"error": {...}} (vLLM >= 0.10.1, PR 22099) or, with flat_errors, the older
  {"object": "error", "message", "type", "param", "code"};
- log-probs of the unscaled distribution, tokens as "token_id:<id>".
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import model
from openai_stub import Bounded, over_limit
import lora
import sampling

# CompletionRequest._DEFAULT_SAMPLING_PARAMS: used when neither the request nor generation_config sets one
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "temperature": 1.0,
           "top_p": 1.0, "top_k": 0, "min_p": 0.0}
FROM_GENERATION_CONFIG = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


class VLLMStub(Bounded):
    """`make_base()` -> a fresh base model; `tok` decodes the text fields. Knobs: `lora=False` serves
    no /v1/load_lora_adapter (vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING), `refuse` answers every
    load with that HTTP 400 message, `token_ids=False` leaves out return_token_ids' fields (older
    vLLM: the ids come only as the logprobs' tokens), `id_tokens=False` ignores return_tokens_as_token_ids
    (a server that names the logprobs' tokens by text only), `model_dir` is where generation_config.json
    is read from, `max_model_len` the context it refuses past, `flat_errors` the pre-0.10.1 error body,
    `length_first` the stop check of older vLLM V1 (max_tokens tested before eos, so an eos landing on
    the cap is reported "length"). `.requests` holds (method, path, body), `.replies` every completion
    reply in the order answered, `.answered` (body, reply) pairs, `.loras` {name: path} (set it to fake
    earlier loads)."""

    def __init__(self, make_base, tok, base_name="base", lora=True, refuse=None, token_ids=True, id_tokens=True,
                 model_dir=None, max_model_len=8192, flat_errors=False, length_first=False):
        self.make_base, self.tok, self.base_name = make_base, tok, base_name
        self.lora, self.refuse, self.token_ids, self.id_tokens = lora, refuse, token_ids, id_tokens
        self.max_model_len, self.flat_errors, self.length_first = max_model_len, flat_errors, length_first
        gc_path = Path(model_dir) / "generation_config.json" if model_dir else None
        self.gen_config = json.loads(gc_path.read_text()) if gc_path and gc_path.is_file() else {}
        eos = self.gen_config.get("eos_token_id")
        self.stops = {tok.eos_token_id} | ({eos} if isinstance(eos, int) else set(eos or ()))
        self.requests, self.replies, self.answered, self.loras, self.models = [], [], [], {}, {}
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, code, body):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)  # vLLM answers a successful adapter load in plain text
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if over_limit(stub, self):
                    return
                with stub.lock:
                    stub.requests.append(("GET", self.path, None))
                if self.path != "/v1/models":
                    return self.send(404, {"detail": "Not Found"})
                cards = [{"id": stub.base_name, "object": "model", "root": "/models/base", "parent": None,
                          "max_model_len": stub.max_model_len}]
                cards += [{"id": n, "object": "model", "root": p, "parent": stub.base_name} for n, p in stub.loras.items()]
                self.send(200, {"object": "list", "data": cards})

            def do_POST(self):
                if over_limit(stub, self):
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(("POST", self.path, body))
                    if self.path == "/v1/load_lora_adapter" and stub.lora:
                        return self.send(*stub.load(body))
                    if self.path == "/v1/completions":
                        return self.send(*stub.complete(body))
                self.send(404, {"detail": "Not Found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.bound()

    def error(self, code, message, kind="BadRequestError"):
        info = {"message": message, "type": kind, "param": None, "code": code}
        return code, ({"object": "error", **info} if self.flat_errors else {"error": info})

    def load(self, body):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self.error(400, "lora_name and lora_path are both required")
        if name in self.loras:
            return self.error(400, f"The lora adapter '{name}' has already been loaded.")
        if self.refuse:
            return self.error(400, self.refuse)
        try:
            self.models[name] = lora.load_adapter(self.make_base(), path)
        except (model.ModelError, OSError) as e:
            return self.error(404, f"Loading lora {name} failed: {e}", "NotFoundError")
        self.loras[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def model_for(self, name):
        if name == self.base_name:
            return self.models.setdefault(name, self.make_base())
        return self.models.get(name) if name in self.loras else None

    def params(self, body):
        """The request's sampling parameters as vLLM resolves them: request > generation_config > neutral."""
        p = {k: body[k] if body.get(k) is not None else self.gen_config.get(k, v) if k in FROM_GENERATION_CONFIG else v
             for k, v in NEUTRAL.items()}
        p["max_tokens"] = body["max_tokens"] if body.get("max_tokens") is not None else self.gen_config.get("max_new_tokens", 16)
        p["n"], p["seed"] = body.get("n", 1), body.get("seed")
        return p

    def refusal(self, p, prompts):
        """vLLM's 400 for this request, or None."""
        if p["top_k"] < -1:
            return self.error(400, f"top_k must be 0 (disable), or at least 1, got {p['top_k']}.")
        if p["temperature"] < 1e-5 and p["n"] > 1:
            return self.error(400, f"n must be 1 when using greedy sampling, got {p['n']}.")
        for q in prompts:
            if len(q) + p["max_tokens"] > self.max_model_len:
                return self.error(400, f"'max_tokens' or 'max_completion_tokens' is too large: {p['max_tokens']}. "
                                       f"This model's maximum context length is {self.max_model_len} tokens and your "
                                       f"request has {len(q)} input tokens ({p['max_tokens']} > {self.max_model_len} - {len(q)}).")
        return None

    def complete(self, body):
        mdl = self.model_for(body.get("model"))
        if mdl is None:
            return self.error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        prompts = [prompt] if prompt and all(isinstance(t, int) for t in prompt) else prompt
        if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            return self.error(400, "this stub samples token-id prompts only")  # vLLM would tokenize text itself
        p = self.params(body)
        refused = self.refusal(p, prompts)
        if refused:
            return refused
        choices = []
        for q in prompts:
            for i in range(p["n"]):
                gen = torch.Generator().manual_seed(p["seed"] + i) if p["seed"] is not None else None
                ids, lps = self.decode(mdl, q, p, gen)
                choices.append(self.choice(len(choices), ids, lps, q, p, body))
        reply = {"id": "cmpl-stub", "object": "text_completion", "model": body["model"], "choices": choices,
                 "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0, "total_tokens": 0}}
        self.replies.append(reply)
        self.answered.append((body, reply))  # paired here: concurrent requests are answered in any order
        return 200, reply

    def choice(self, index, ids, lps, prompt, p, body):
        stopped = bool(ids) and ids[-1] in self.stops
        if self.length_first and len(ids) >= p["max_tokens"]:
            stopped = False  # older check_stop: the length cap is tested before the eos
        ch = {"index": index, "text": self.tok.decode(ids, skip_special_tokens=True),
              "finish_reason": "stop" if stopped else "length",
              "stop_reason": ids[-1] if stopped and ids[-1] != self.tok.eos_token_id else None}
        if body.get("logprobs") is not None:
            as_ids = body.get("return_tokens_as_token_ids") and self.id_tokens
            tokens = [f"token_id:{t}" if as_ids else self.tok.decode([t]) for t in ids]
            ch["logprobs"] = {"tokens": tokens, "token_logprobs": lps, "text_offset": list(range(len(ids))),
                              "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps)]}
        if body.get("return_token_ids") and self.token_ids:
            ch["token_ids"], ch["prompt_token_ids"] = ids, prompt
        return ch

    def decode(self, mdl, prompt, p, gen):
        """(ids, log-probs) of one sample. With neutral top-k, min-p and penalties it is sampling.decode's
        draw (what the tests' references compute); otherwise a plain loop that applies them."""
        neutral = all(p[k] == NEUTRAL[k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"))
        if neutral and p["top_k"] in (0, -1):
            return sampling.decode(mdl, [prompt], 1, p["max_tokens"], p["temperature"], p["top_p"], self.stops, 0, gen)[0]
        ids, lps = [], []
        with torch.no_grad():
            for _ in range(p["max_tokens"]):
                raw = mdl(input_ids=torch.tensor([prompt + ids])).logits[0, -1].float()
                logits = processed(raw, prompt, ids, p)
                t = int(sampling._pick(logits[None], torch.tensor([p["temperature"]]), p["top_p"], gen)[0])
                ids.append(t)
                lps.append(float(raw.log_softmax(-1)[t]))
                if t in self.stops:
                    break
        return ids, lps


def processed(logits, prompt, out, p):
    """vLLM's order: penalties (repetition over prompt and output, frequency and presence over the
    output), then top-k, then min-p relative to the most likely token at the temperature."""
    x = logits.clone()
    seen = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long)
    if p["repetition_penalty"] != 1.0:
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p["repetition_penalty"], v * p["repetition_penalty"])
    if out:
        counts = torch.bincount(torch.tensor(out), minlength=x.numel()).float()
        x -= p["frequency_penalty"] * counts + p["presence_penalty"] * (counts > 0).float()
    if p["top_k"] > 0:
        x[x < x.topk(min(p["top_k"], x.numel())).values[-1]] = float("-inf")
    if p["min_p"] > 0:
        probs = torch.softmax(x / max(p["temperature"], 1e-5), -1)
        x[probs < p["min_p"] * probs.max()] = float("-inf")
    return x
