#!/usr/bin/env python3
"""A tiny sample app for the Outrigger quick start (standard library only).

It serves plain HTTP on 127.0.0.1:$PORT (default 8080):
  GET /          a JSON greeting naming the sidecar it runs beside
  GET /healthz   200 "ok" (for probes)
and stops cleanly on SIGTERM, finishing the request in flight.
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))


class Handler(BaseHTTPRequestHandler):
    server_version = "sample-app/1"

    def do_GET(self):
        if self.path == "/healthz":
            self.reply(200, "text/plain", b"ok\n")
            return
        body = {
            "hello": "from the sample app",
            "path": self.path,
            "sidecar_admin": os.environ.get("OUTRIGGER_ADMIN_ADDRESS"),
            "service": os.environ.get("OUTRIGGER_SERVICE"),
        }
        caller = self.headers.get("x-forwarded-client-cert")
        if caller:
            body["caller"] = caller
        self.reply(200, "application/json", (json.dumps(body) + "\n").encode())

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stdout.write("sample-app: %s %s\n" % (self.address_string(), fmt % args))
        sys.stdout.flush()


def main():
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)

    def stop(signum, _frame):
        print("sample-app: got signal %d, stopping" % signum, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("sample-app: listening on http://127.0.0.1:%d" % PORT, flush=True)
    server.serve_forever()
    server.server_close()
    print("sample-app: stopped", flush=True)


if __name__ == "__main__":
    main()
