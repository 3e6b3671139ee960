"""The local executor: an OpenAI-compatible chat server for a local model that samples per request (ARCHITECTURE §4).

    python serve.py --port 8001                                   # the embedded SmolLM2-135M on 127.0.0.1:8001
    curl -s 127.0.0.1:8001/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'
    python serve.py path/to/hf_dir --port 8001 --threads 2        # any local causal LM
    python serve.py Qwen/Qwen2.5-7B-Instruct --device cuda         # on a GPU (then --executor-url)

executor.local_executor starts one per core and talks to it like to any API. Why our own and not
`transformers serve`: its continuous batching takes the sampling settings of the first request for
all later ones, and it switches sampling off for temperature 0 but never on, so a model without
`do_sample` in its generation_config answered every request greedily (issue 21).

Here each request is decoded on its own terms: temperature 0 is the argmax; temperature > 0 draws
from softmax(logits / T) (and top_p, when sent) with a torch.Generator seeded by the request's
`seed` (0 when absent), so a reply depends on the request alone, not on the requests it was
batched with -- up to the float rounding of a batched forward, which moves a draw only when it
lands within ~1e-6 of a token boundary. Requests queue; one inference thread takes every waiting
request (up to --max-batch) and decodes them together (sampling.decode: the shared chat-template
prefix once, each answered as it stops). A request over the context window gets a 400 that says
so (the workflow's fault, executor.py). The server exits within a second of its parent's death,
so a driver killed with SIGKILL leaves no server behind.
"""
import argparse
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import sampling
from model import DEFAULT_MODEL, load_model


class BadRequest(ValueError):
    """A request the server refuses with 400; `code` as OpenAI names it."""

    def __init__(self, msg, code="invalid_request"):
        super().__init__(msg)
        self.code = code


def request_params(body, max_context):
    """(messages, temperature, top_p, max_tokens, seed) of a chat request body, checked."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         for m in msgs):
        raise BadRequest("messages must be a non-empty list of {role, content} objects with string content")
    temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)  # OpenAI's default
    top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if not (0 <= temperature <= 5 and 0 < top_p <= 1 and isinstance(max_tokens, int) and 0 < max_tokens <= max_context):
        raise BadRequest("temperature must be in [0, 5], top_p in (0, 1], max_tokens a positive integer "
                         f"<= {max_context}")
    seed = body.get("seed")
    return msgs, temperature, top_p, max_tokens, int(seed) if seed is not None else 0


class Engine:
    """The model and one inference thread that decodes the queued requests in batches."""

    def __init__(self, name, threads, max_batch, device="cpu"):
        torch.set_num_threads(threads)
        self.model, self.tok = load_model(name, device=device)
        self.name, self.max_batch = str(name), max_batch
        self.stops = sampling.stop_ids(self.model, self.tok)
        eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos if eos is not None else min(self.stops))
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.queue = queue.Queue()
        self.tok_lock = threading.Lock()  # one tokenizer, many handler threads
        threading.Thread(target=self.loop, daemon=True).start()

    def submit(self, body):
        """A chat request body -> a Future of (text, prompt_tokens, completion_tokens, finish_reason)."""
        msgs, temperature, top_p, max_tokens, seed = request_params(body, self.max_context)
        with self.tok_lock:
            ids = sampling.prompt_ids(self.tok, msgs)
        if len(ids) + max_tokens > self.max_context:
            raise BadRequest(f"This model's maximum context length is {self.max_context} tokens; the prompt has "
                             f"{len(ids)} and max_tokens is {max_tokens}.", "context_length_exceeded")
        fut = Future()
        self.queue.put((ids, temperature, top_p, max_tokens, seed, fut))
        return fut

    def loop(self):
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            for top_p in sorted({r[2] for r in batch}):  # decode takes one top_p per call
                self.decode([r for r in batch if r[2] == top_p], top_p)

    def decode(self, reqs, top_p):
        def answer(i, toks, _logprobs):  # as soon as request i's reply ends
            stopped = bool(toks) and toks[-1] in self.stops
            with self.tok_lock:
                text = self.tok.decode(toks[:-1] if stopped else toks, skip_special_tokens=True)
            reqs[i][5].set_result((text, len(reqs[i][0]), len(toks), "stop" if stopped else "length"))
        try:
            gens = [torch.Generator(self.model.device).manual_seed(seed) for _, _, _, _, seed, _ in reqs]
            sampling.decode(self.model, [r[0] for r in reqs], 1, [r[3] for r in reqs], [r[1] for r in reqs],
                            top_p, self.stops, self.pad, gens, on_done=answer)
        except Exception as e:  # a bad batch fails its requests, never the server
            for r in reqs:
                if not r[5].done():
                    r[5].set_exception(e)


def handler_class(engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections

        def log_message(self, *args):  # one line per request would flood the run's log
            pass

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status, msg, kind="invalid_request_error", code=None):
            self.reply(status, {"error": {"message": msg, "type": kind, "code": code or str(status)}})

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok"})
            elif self.path.rstrip("/") == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "spogw"}]})
            else:
                self.error(404, f"no route {self.path}")

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self.error(404, f"no route {self.path}")
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                text, pt, ct, finish = engine.submit(body).result()
            except (BadRequest, ValueError, TypeError) as e:
                return self.error(400, str(e), code=getattr(e, "code", None))
            except Exception as e:
                return self.error(500, f"{type(e).__name__}: {e}", "server_error")
            self.reply(200, {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                             "created": int(time.time()), "model": engine.name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": finish}],
                             "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})
    return Handler


def exit_with_parent():
    """Poll the parent pid: once the process that started us is gone (killed with SIGKILL, so it
    could not stop us), we are orphaned and exit. Polling, not PR_SET_PDEATHSIG: that fires when
    the *thread* that forked us ends, and local_executor may run in a worker thread."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF dir / .gguf / embedded name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the sandboxes and a second server "
                                                            "use the other cores)")
    ap.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the model's precision: model.load_model's default)")
    ap.add_argument("--orphan-exit", action="store_true", help="exit when the parent process dies")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.max_batch < 1:
        ap.error("--threads and --max-batch must be >= 1")
    if args.orphan_exit:
        exit_with_parent()
    try:
        engine = Engine(args.model, args.threads, args.max_batch, args.device)
    except ValueError as e:  # ModelError: a name or dir that cannot be loaded
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    server = ThreadingHTTPServer((args.host, args.port), handler_class(engine))
    server.daemon_threads = True
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
