#!/usr/bin/env python3
"""A line-counting receiver for bench/logs.sh: HTTP NDJSON (POST, Content-Length or chunked,
keep-alive) on one port, raw newline-delimited TCP on another. Counts lines and bytes and
writes `{"lines", "bytes", "first", "last", "requests"}` to STATE_FILE when the expected line
count is reached (and on SIGTERM).

Written so that it is not the bottleneck: each connection is a thread doing large recv()s and
`bytes.count(b"\\n")` (C speed, > 1 GB/s); there is no per-line Python work and no JSON parse.

    logs-receiver.py HTTP_PORT TCP_PORT EXPECTED_LINES STATE_FILE
"""
import json
import signal
import socket
import sys
import threading
import time

http_port, tcp_port, expected, state_file = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
)
lock = threading.Lock()
st = {"lines": 0, "bytes": 0, "first": None, "last": None, "requests": 0}
done = False


def add(lines, nbytes, request=False):
    global done
    with lock:
        now = time.time()
        if st["first"] is None:
            st["first"] = now
        st["lines"] += lines
        st["bytes"] += nbytes
        st["last"] = now
        if request:
            st["requests"] += 1
        if not done and st["lines"] >= expected:
            done = True
            dump()


def dump():
    with open(state_file + ".tmp", "w") as f:
        json.dump(st, f)
    import os

    os.replace(state_file + ".tmp", state_file)


class Conn:
    def __init__(self, s):
        self.s = s
        self.buf = bytearray()

    def fill(self):
        b = self.s.recv(1 << 20)
        if not b:
            raise EOFError
        self.buf += b

    def until(self, sep):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            self.fill()

    def body(self, n):
        """Counts the newlines of the next n bytes without keeping them."""
        lines = 0
        left = n
        while left:
            if not self.buf:
                self.fill()
            take = min(left, len(self.buf))
            lines += self.buf.count(b"\n", 0, take)
            del self.buf[:take]
            left -= take
        return lines


def serve_http(s):
    c = Conn(s)
    try:
        while True:
            head = c.until(b"\r\n\r\n").decode("latin-1").lower()
            length, chunked = 0, False
            for h in head.split("\r\n")[1:]:
                k, _, v = h.partition(":")
                if k == "content-length":
                    length = int(v)
                elif k == "transfer-encoding" and "chunked" in v:
                    chunked = True
                elif k == "expect" and "100-continue" in v:
                    s.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            lines = nbytes = 0
            if chunked:
                while True:
                    n = int(c.until(b"\r\n").split(b";")[0], 16)
                    if n == 0:
                        c.until(b"\r\n")
                        break
                    lines += c.body(n)
                    nbytes += n
                    c.until(b"\r\n")
            else:
                lines, nbytes = c.body(length), length
            add(lines, nbytes, True)
            s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    except (EOFError, ConnectionError, ValueError):
        pass
    finally:
        s.close()


def serve_tcp(s):
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            add(b.count(b"\n"), len(b))
    except ConnectionError:
        pass
    finally:
        s.close()


def listen(port, handler):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)

    def loop():
        while True:
            s, _ = ls.accept()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            threading.Thread(target=handler, args=(s,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


listen(http_port, serve_http)
listen(tcp_port, serve_tcp)
signal.signal(signal.SIGTERM, lambda *_: (dump(), sys.exit(0)))
while True:
    time.sleep(3600)
