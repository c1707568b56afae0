"""An HTTPS webhook receiver for hub/tests/webhooks.rs.

Serves HTTPS on 127.0.0.1 (an OS-chosen port, written to --port-file once
listening) with --cert/--key, and answers every POST as the JSON control
file (--control, re-read on each request, so a test changes it while the
receiver runs) says:

    {
      "secrets": {"label": "whsec_..."},   # each request is verified with each
      "first": [ACTION, ...],              # the i-th request (from 0) gets first[i]
      "then": ACTION                       # every later one
    }

where ACTION is {"status": 200, "body": {...} | null} (the body as JSON, or
an empty body when null) or {"hang": true} (no answer at all: the handler
waits until the client closes the connection or the receiver is stopped).
With no control file, every request gets 200 and an empty body.

Every request is recorded as one JSON line in --record when it arrives:

    {"kind": "request", "n": i, "at": unix seconds, "path": "/...",
     "headers": {lower-case name: value}, "body": "...",
     "verified": {"label": true | false}, "verify_errors": {"label": "..."},
     "in_flight": requests being handled now (this one included),
     "high_water": the most ever handled at once}

and its end as another: {"kind": "end", "n": i, "at": ..., "how": "answered
500" | "client closed" | "stopped"}. The signature is checked with the
reference Standard Webhooks library (PyPI `standardwebhooks`).
"""

import argparse
import json
import os
import select
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

LOCK = threading.Lock()
STATE = {"count": 0, "in_flight": 0, "high_water": 0}
STOPPING = threading.Event()


def load_control(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def record(path, entry):
    line = json.dumps(entry, sort_keys=True) + "\n"
    with LOCK:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def verify(secrets, body, headers):
    verified, errors = {}, {}
    for label, secret in secrets.items():
        try:
            Webhook(secret).verify(body, headers)
            verified[label] = True
        except Exception as e:  # WebhookVerificationError, or a bad header
            verified[label] = False
            errors[label] = f"{type(e).__name__}: {e}"
    return verified, errors


class Handler(BaseHTTPRequestHandler):
    # One request per connection, as the hub makes them.
    protocol_version = "HTTP/1.0"

    def setup(self):
        # The TLS handshake here, in the request's thread, not in the
        # accepting one (a slow client must not hold up the others).
        self.request.do_handshake()
        super().setup()

    def log_message(self, format, *args):
        sys.stderr.write("receiver: " + (format % args) + "\n")

    def do_POST(self):
        args = self.server.args
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        control = load_control(args.control)
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified, errors = verify(control.get("secrets", {}), body, headers)
        with LOCK:
            n = STATE["count"]
            STATE["count"] += 1
            STATE["in_flight"] += 1
            STATE["high_water"] = max(STATE["high_water"], STATE["in_flight"])
            in_flight, high_water = STATE["in_flight"], STATE["high_water"]
        first = control.get("first", [])
        action = first[n] if n < len(first) else control.get("then", {"status": 200})
        record(
            args.record,
            {
                "kind": "request",
                "n": n,
                "at": time.time(),
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
                "verified": verified,
                "verify_errors": errors,
                "in_flight": in_flight,
                "high_water": high_water,
            },
        )
        try:
            how = self.hang() if action.get("hang") else self.answer(action)
        finally:
            with LOCK:
                STATE["in_flight"] -= 1
        record(args.record, {"kind": "end", "n": n, "at": time.time(), "how": how})

    def answer(self, action):
        status = int(action.get("status", 200))
        body = action.get("body")
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as e:
            return f"answering {status} failed: {e}"
        return f"answered {status}"

    def hang(self):
        # The client sends nothing more: the socket turns readable when it
        # closes (EOF, a TLS close_notify or a reset).
        while not STOPPING.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.2)
            if readable:
                return "client closed"
        return "stopped"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--port-file", required=True)
    args = p.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.args = args
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    port = server.server_address[1]
    tmp = args.port_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        STOPPING.set()


if __name__ == "__main__":
    main()
