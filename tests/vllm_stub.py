"""A loopback stand-in for a vLLM server (`vllm serve --enable-lora`, runtime LoRA updating on):
GET /v1/models, POST /v1/load_lora_adapter, POST /v1/completions with token-id prompts, n, seed and
logprobs. It samples with real models -- the tiny base model, or the base with the adapter loaded
under the requested name -- the way vLLM does it: the i-th of n samples seeded with seed + i, the
stop token kept in the ids, log-probs of the unscaled distribution, tokens as "token_id:<id>"."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import model
from openai_stub import Bounded, over_limit
import lora
import sampling


class VLLMStub(Bounded):
    """`make_base()` -> a fresh base model; `tok` decodes the text fields. Knobs: `lora=False` serves
    no /v1/load_lora_adapter (vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING), `refuse` answers every
    load with that HTTP 400 message, `token_ids=False` leaves out return_token_ids' fields (older
    vLLM: the ids come only as the logprobs' tokens), `id_tokens=False` ignores return_tokens_as_token_ids
(a server that names the logprobs' tokens by text only). `.requests` holds (method, path, body),
    `.replies` every completion reply, `.loras` {name: path} (set it to fake earlier loads)."""

    def __init__(self, make_base, tok, base_name="base", lora=True, refuse=None, token_ids=True, id_tokens=True):
        self.make_base, self.tok, self.base_name = make_base, tok, base_name
        self.lora, self.refuse, self.token_ids, self.id_tokens = lora, refuse, token_ids, id_tokens
        self.requests, self.replies, self.loras, self.models = [], [], {}, {}
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
                cards = [{"id": stub.base_name, "object": "model", "root": "/models/base", "parent": None}]
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

    @staticmethod
    def error(code, message):
        return code, {"error": {"message": message, "type": "BadRequestError", "code": code}}

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
            return self.error(404, f"Loading lora {name} failed: {e}")
        self.loras[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def model_for(self, name):
        if name == self.base_name:
            return self.models.setdefault(name, self.make_base())
        return self.models.get(name) if name in self.loras else None

    def complete(self, body):
        mdl = self.model_for(body.get("model"))
        if mdl is None:
            return self.error(404, f"The model `{body.get('model')}` does not exist.")
        prompt = body.get("prompt")
        prompts = [prompt] if prompt and all(isinstance(t, int) for t in prompt) else prompt
        if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            return self.error(400, "this stub samples token-id prompts only")  # vLLM would tokenize text itself
        n, seed, eos = body.get("n", 1), body.get("seed"), self.tok.eos_token_id
        choices = []
        for p in prompts:
            for i in range(n):
                gen = torch.Generator().manual_seed(seed + i) if seed is not None else None
                ids, lps = sampling.decode(mdl, [p], 1, body["max_tokens"], body.get("temperature", 1.0),
                                    body.get("top_p", 1.0), eos, 0, gen)[0]
                ch = {"index": len(choices), "text": self.tok.decode(ids, skip_special_tokens=True),
                      "finish_reason": "stop" if ids and ids[-1] == eos else "length", "stop_reason": None}
                if body.get("logprobs") is not None:
                    as_ids = body.get("return_tokens_as_token_ids") and self.id_tokens
                    tokens = [f"token_id:{t}" if as_ids else self.tok.decode([t]) for t in ids]
                    ch["logprobs"] = {"tokens": tokens, "token_logprobs": lps, "text_offset": list(range(len(ids))),
                                      "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps)]}
                if body.get("return_token_ids") and self.token_ids:
                    ch["token_ids"], ch["prompt_token_ids"] = ids, p
                choices.append(ch)
        reply = {"id": "cmpl-stub", "object": "text_completion", "model": body["model"], "choices": choices,
                 "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0, "total_tokens": 0}}
        self.replies.append(reply)
        return 200, reply
