"""A loopback OpenAI chat-completions server for tests: scripted faults, canned replies."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    """`faults`: a list consumed one per request: "500", "429:<retry-after>", "hang:<s>",
    "malformed", "404", or None (answer normally). `reply(messages) -> str` makes the answer.
    `.requests` holds every request body received."""

    def __init__(self, reply=lambda messages: "hello", faults=()):
        self.reply, self.faults, self.requests = reply, list(faults), []
        self.times = []
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

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    stub.times.append(time.monotonic())
                    fault = stub.faults.pop(0) if stub.faults else None
                try:
                    if fault == "500":
                        return self.send(500, '{"error": {"message": "boom"}}')
                    if fault == "404":
                        return self.send(404, '{"error": {"message": "no such model"}}')
                    if fault and fault.startswith("429"):
                        return self.send(429, '{"error": {"message": "slow down"}}', [("Retry-After", fault[4:])])
                    if fault == "malformed":
                        return self.send(200, '{"choices": [{"message": ')
                    if fault and fault.startswith("hang"):
                        time.sleep(float(fault[5:]))
                    text = stub.reply(body["messages"])
                    self.send(200, json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
