"""The jobs API in Python (standard library only), for strata serve's reverse proxy.

Prints `port N` on its first line, then serves until killed. `GET /_calls` reports the
handler calls per endpoint (it is not a cached route, so it always reaches this process).
"""

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
CALLS = {}
STORE = {}


def called(endpoint):
    with LOCK:
        CALLS[endpoint] = CALLS.get(endpoint, 0) + 1


def jobs_of(user):
    with LOCK:
        if user not in STORE:
            STORE[user] = {
                i: {"id": i, "owner": user, "status": "queued",
                    "description": f"Summarize the filings of portfolio {i} for {user}"}
                for i in list(range(1, 21)) + [42]
            }
        return STORE[user]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def user(self):
        user = self.headers.get("x-user")
        if not user:
            self.answer(401, {"error": "x-user is required"})
        return user

    def do_GET(self):
        if self.path == "/_calls":
            with LOCK:
                return self.answer(200, dict(CALLS))
        if self.path == "/jobs":
            called("list")
            user = self.user()
            if user:
                self.answer(200, list(jobs_of(user).values()))
            return
        match = re.fullmatch(r"/jobs/(\d+)", self.path)
        if match:
            called("job")
            user = self.user()
            if user:
                job = jobs_of(user).get(int(match.group(1)))
                self.answer(200, job) if job else self.answer(404, {"error": "no such job"})
            return
        self.answer(404, {"error": "not found"})

    def do_PUT(self):
        match = re.fullmatch(r"/jobs/(\d+)", self.path)
        length = int(self.headers.get("Content-Length", "0"))
        update = json.loads(self.rfile.read(length) or b"{}")
        if not match:
            return self.answer(404, {"error": "not found"})
        called("update")
        user = self.user()
        if not user:
            return
        job = jobs_of(user).get(int(match.group(1)))
        if not job:
            return self.answer(404, {"error": "no such job"})
        with LOCK:
            job["status"] = update.get("status", job["status"])
        self.answer(200, job)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
