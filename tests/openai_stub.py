"""A loopback OpenAI chat-completions server for tests: scripted faults, canned replies."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Error bodies as the OpenAI API sends them (status, body); the clients read error.code / message.
ERRORS = {
    "401": (401, {"message": "Incorrect API key provided: sk-bad. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.",
                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}),
    "400": (400, {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                             "Use 'max_completion_tokens' instead.",
                  "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}),
    "quota": (429, {"message": "You exceeded your current quota, please check your plan and billing details.",
                    "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}),
    "context": (400, {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                                 "resulted in 200000 tokens.",
                      "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}),
    "500": (500, {"message": "boom"}),
    "404": (404, {"message": "no such model"}),
}


# Bounds of every stub server: loopback only, at most this many requests and this many seconds.
MAX_REQUESTS, LIFETIME_S = 5000, 600.0


def over_limit(stub, handler):
    """True (and a 503 sent) once `stub` has answered stub.max_requests requests: a runaway retry
    loop in the code under test ends here instead of spinning."""
    with stub.lock:
        stub.served += 1
        over = stub.served > stub.max_requests
    if over:
        handler.send_response(503)
        handler.end_headers()
    return over


class Bounded:
    """Start and stop of a loopback test server (self.httpd, self.thread, self.lock) that answers at
    most max_requests requests and closes itself after `lifetime` seconds: a test that hangs cannot
    leave it behind."""

    def bound(self, max_requests=MAX_REQUESTS, lifetime=LIFETIME_S):
        self.served, self.max_requests, self.closed = 0, max_requests, False
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.close()


class StubServer(Bounded):
    """`faults`: a list consumed one per chat request: a key of ERRORS, "429:<retry-after>",
    "hang:<s>", "malformed", "refuse" (drop this connection and stop listening: every later
    connection is refused), or None (answer normally). `reply(messages) -> str` makes the answer.
    `.requests` holds every chat request body received, `.max_active` the most handled at once.
    GET /v1/models lists `models`. `port`: bind this port (a restarted server on the old URL).
    `usage(messages, text) -> (prompt_tokens, completion_tokens)` (default 10 and 5)."""

    def __init__(self, reply=lambda messages: "hello", faults=(), models=("stub-model",), port=0,
                 max_requests=MAX_REQUESTS, lifetime=LIFETIME_S, usage=lambda messages, text: (10, 5)):
        self.reply, self.faults, self.requests = reply, list(faults), []
        self.usage = usage  # (prompt_tokens, completion_tokens) of an answer
        self.times = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, code, body, headers=()):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if over_limit(stub, self):
                    return
                if self.path.rstrip("/").endswith("/models"):
                    return self.send(200, json.dumps({"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in models]}))
                self.send(404, '{"error": {"message": "not found"}}')

            def do_POST(self):
                if over_limit(stub, self):
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    stub.times.append(time.monotonic())
                    fault = stub.faults.pop(0) if stub.faults else None
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                try:
                    if fault in ERRORS:
                        code, err = ERRORS[fault]
                        return self.send(code, json.dumps({"error": err}))
                    if fault and fault.startswith("429"):
                        return self.send(429, '{"error": {"message": "slow down"}}', [("Retry-After", fault[4:])])
                    if fault == "malformed":
                        return self.send(200, '{"choices": [{"message": ')
                    if fault == "refuse":  # stop listening before this connection drops, so a retry is refused
                        stub.httpd.socket.shutdown(socket.SHUT_RDWR)  # Linux: leaves LISTEN at once
                        threading.Thread(target=stub.close).start()  # not from this thread: shutdown() waits
                        self.close_connection = True
                        return
                    if fault and fault.startswith("hang"):
                        time.sleep(float(fault[5:]))
                    text = stub.reply(body["messages"])
                    pt, ct = stub.usage(body["messages"], text)
                    self.send(200, json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with stub.lock:
                        stub.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.bound(max_requests, lifetime)
