"""An OpenAI-compatible chat server that answers the lyrics request after a delay (stack tests).

The answer is the structured form of `LYRICS`, so the refine_lyrics stage accepts it; the delay
keeps a CPU task running long enough for a test to break something underneath it.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LYRICS = "I walk the line\nI hold the key\n\nla la love me\nla la leave me"
STRUCTURED = "[verse]\nI walk the line\nI hold the key\n\n[chorus]\nla la love me\nla la leave me"


class SlowLlm:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.calls += 1
                time.sleep(owner.delay_s)
                body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": STRUCTURED},
                     "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"SONGPIPE_LLM_URL": self.url, "SONGPIPE_LLM_MODEL": "slow", "SONGPIPE_LLM_TIMEOUT_S": "120",
                "SONGPIPE_LLM_MAX_RETRIES": "0"}

    def close(self) -> None:
        self.server.shutdown()
