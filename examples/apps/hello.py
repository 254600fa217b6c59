#!/usr/bin/env python3
"""Knarr's example app: a tiny HTTP server, Python 3 standard library only.

Knative gives every container PORT, K_SERVICE, K_CONFIGURATION and K_REVISION; `knarr up` does
the same for the processes it runs. Environment:

  PORT    the port to listen on (default 8080)
  HOST    the address to bind (default 127.0.0.1: the queue-proxy in front is on this machine)
  TARGET  who to greet (default World)

Paths:

  GET /             200 "Hello {TARGET}! (revision {K_REVISION})"
  GET /sleep?ms=N   the same, after N milliseconds (to watch draining and concurrency)
  GET /healthz      200 "ok"

Every answer carries `X-Process-Id` (this process's pid), so you can see which pod served it.

SIGTERM (or Ctrl-C) stops accepting connections and exits once the requests in flight are
answered.
"""

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TARGET = os.environ.get("TARGET", "World")
REVISION = os.environ.get("K_REVISION", "local")


class Hello(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default here): one request per connection, so no idle keep-alive
    # connection holds up the exit on SIGTERM.

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self.answer(200, "ok\n")
        if url.path == "/sleep":
            try:
                ms = int(parse_qs(url.query).get("ms", ["0"])[0])
            except ValueError:
                return self.answer(400, "ms must be a whole number\n")
            time.sleep(max(ms, 0) / 1000)
        elif url.path != "/":
            return self.answer(404, "not found\n")
        self.answer(200, f"Hello {TARGET}! (revision {REVISION})\n")

    def answer(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Process-Id", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        # One line per request on stdout, where `knarr logs` finds it.
        print(f"{self.address_string()} {format % args}", flush=True)


class Server(ThreadingHTTPServer):
    # Request threads are joined on shutdown: in-flight requests finish before the exit.
    daemon_threads = False
    block_on_close = True
    # Bursts open many connections at once; the default backlog of 5 would drop some.
    request_queue_size = 128


def main():
    port = int(os.environ.get("PORT", "8080"))
    host = os.environ.get("HOST", "127.0.0.1")
    server = Server((host, port), Hello)

    def stop(signum, frame):
        name = signal.Signals(signum).name
        print(f"hello: {name}, finishing the requests in flight", flush=True)
        # shutdown() waits for serve_forever() to return, so it must run on another thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"hello: listening on {host}:{port} (revision {REVISION})", flush=True)
    server.serve_forever()
    server.server_close()  # joins the request threads
    print("hello: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
