#!/usr/bin/env python3
"""The conformance scenario: one spoke client against the real hub binary.

    python tests/conformance/scenario.py --client NAME [--expect-ack-stream] [--webhook] -- COMMAND [ARG...]

runs the scenario below for the spoke started by COMMAND (run from the
repository root) and checks what an operator observes through AdminService.
Every client gets the same checks; tests/polyglot.sh lists the clients.
With --expect-ack-stream it also checks, on the hub's /metrics, that the
spoke acks over SpokeService.AckStream and never with unary Ack. With
--webhook it also runs the webhook phase: the spoke takes its directives as
signed HTTP POSTs from the hub (webhook mode) and answers with the outcomes.

The client contract. The scenario appends these options to COMMAND:

    --hub 127.0.0.1:PORT           the hub's gRPC address
    --name NAME                    the spoke's name
    --state-dir DIR                where the spoke keeps its key and outcomes
    --enrollment-token-file PATH   the hub's enrollment token
    --events-file PATH             the spoke appends one JSON object per line:
        {"event": "registered", "new": BOOL, ...}       each successful Register
        {"event": "handled", "directive_id": ID, ...}   first time it handles ID
        {"event": "reacked", "directive_id": ID}        a redelivery of ID that
                                                        it answered from its record
        {"event": "metrics", "batch_id": ID, "status": "BATCH_STATUS_...",
         "accepted_points": N}                           each metric push reply
    --backoff-base SECONDS         its first reconnect delay
    --exit-after N                 (some runs) exit 0 after handling N new directives
    --crash-before-ack             (one run) exit 3 right after recording the
                                   first new outcome, before acking it
    --webhook-listen 127.0.0.1:PORT   (--webhook only) webhook mode: serve
                                   POST /hub/directives there and register with
                                   webhook_url http://127.0.0.1:PORT/hub/directives
    --webhook-url URL              (with --webhook-listen) register this URL
                                   instead: a proxy there forwards to the spoke

and expects the spoke to: declare the directive types `echo` (result = the
payload) and `sum` ({"numbers": [...]} -> {"sum": total}; anything else is
FAILED), reject other types, heartbeat with status OK at the hub's interval,
push one metric batch and resend it once, reconnect on its own, keep its
identity in its state dir, exit 0 on SIGTERM and non-zero when the hub refuses
its credentials, treat a stream silent for three keepalive intervals as
dead, and still work through a hub without AckStream (a proxy that answers it
UNIMPLEMENTED, as an older hub does), acking with unary Ack there.

In webhook mode (--webhook) it must also: keep the webhook secret the
Register reply shows, verify each request's Standard Webhooks signature
(answer 401 and run nothing when it does not match), run the same handlers
and answer 200 with {"outcome": "COMPLETED", "result": ...} or
{"outcome": "FAILED" | "REJECTED", "error": ...}, answer a request for a
directive it already finished from its record without running it again,
and keep heartbeating.

Needs the hub.v1 Python stubs (python -m grpc_tools.protoc -Iproto ...) in
target/python-stubs or $HUB_PY_STUBS. Prints one line per check and, last,
"conformance[NAME]: N passed, M failed"; stops at the first failed check.
"""

import argparse
import base64
import collections
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import json_format

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(os.environ.get("HUB_PY_STUBS") or ROOT / "target" / "python-stubs"))
from hub.v1 import admin_pb2, admin_pb2_grpc, types_pb2  # noqa: E402

HEARTBEAT_INTERVAL_S = 1
KEEPALIVE_INTERVAL_S = 1
FINAL = {
    types_pb2.DIRECTIVE_STATE_COMPLETED,
    types_pb2.DIRECTIVE_STATE_FAILED,
    types_pb2.DIRECTIVE_STATE_REJECTED,
    types_pb2.DIRECTIVE_STATE_EXPIRED,
    types_pb2.DIRECTIVE_STATE_CANCELLED,
}


class CheckFailed(Exception):
    pass


def eventually(probe, timeout=20.0, interval=0.1):
    """Polls probe() until it returns something truthy or timeout passes;
    returns its last value. gRPC errors (a hub restarting) count as falsy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except grpc.RpcError:
            value = None
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_name(state):
    return types_pb2.DirectiveState.Name(state)


class Hub:
    """The real hub binary on fixed ports (chosen once, so a restart keeps them)."""

    def __init__(self, binary, work):
        self.binary = binary
        self.data_dir = work / "hub-data"
        self.log = work / "hub.log"
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.proc = None

    def start(self):
        args = [
            self.binary, "serve",
            "--listen", self.grpc, "--http-listen", self.http, "--data-dir", str(self.data_dir),
            "--heartbeat-interval", f"{HEARTBEAT_INTERVAL_S}s", "--keepalive-interval", f"{KEEPALIVE_INTERVAL_S}s",
            "--shutdown-grace", "2s", "--log-format", "json",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_") and k != "DATABASE_URL"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def healthy():
            if self.proc.poll() is not None:
                raise CheckFailed(f"the hub exited with {self.proc.returncode} during startup")
            try:
                with urllib.request.urlopen(f"http://{self.http}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        return eventually(healthy, timeout=15)

    def stop(self):
        """SIGTERM; returns the exit status."""
        self.proc.send_signal(signal.SIGCONT)  # in case it is frozen
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def token(self, name):
        return (self.data_dir / f"{name}.token").read_text().strip()

    def metric_total(self, name, **labels):
        """The sum of the samples of `name` on the hub's /metrics (counted
        since it last started) that carry these labels."""
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0
        for sample_labels, value in re.findall(r"^" + re.escape(name) + r"\{([^}]*)\} (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', sample_labels))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total


class Spoke:
    """The client under test, started from its command."""

    def __init__(self, command, hub, work, name):
        self.command, self.hub, self.work, self.name = command, hub, work, name
        self.state_dir = work / "spoke-state"
        self.events = work / "events.jsonl"
        self.log = work / "spoke.log"
        self.proc = None

    def start(self, *extra, state_dir=None, token_file=None, name=None, hub=None):
        args = [
            *self.command,
            "--hub", hub or self.hub.grpc,
            "--name", name or self.name,
            "--state-dir", str(state_dir or self.state_dir),
            "--enrollment-token-file", str(token_file or self.hub.data_dir / "enrollment.token"),
            "--events-file", str(self.events),
            "--backoff-base", "0.2",
            *extra,
        ]
        with open(self.log, "a") as log:
            log.write(f"--- {' '.join(args)}\n")
            log.flush()
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def stop(self):
        """SIGTERM; returns the exit status (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc and self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None

    def read_events(self, kind):
        if not self.events.exists():
            return []
        # Complete lines only: the spoke may be writing the last one.
        lines = self.events.read_text().split("\n")[:-1]
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if e.get("event") == kind]


class HubWithoutAckStream(grpc.GenericRpcHandler):
    """A hub as it was before AckStream: a proxy in front of the real hub
    that forwards every SpokeService call unchanged, except AckStream, which
    it does not know (gRPC answers UNIMPLEMENTED)."""

    # SpokeService's methods without AckStream, by how they stream.
    METHODS = {
        "Register": "unary_unary",
        "Ack": "unary_unary",
        "Heartbeat": "unary_unary",
        "PollDirectives": "unary_unary",
        "WatchDirectives": "unary_stream",
        "PushMetrics": "stream_unary",
    }

    def __init__(self, hub):
        self.upstream = grpc.insecure_channel(hub.grpc)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self):
        self.server.stop(grace=None)
        self.upstream.close()

    def service(self, details):
        prefix = "/hub.v1.SpokeService/"
        kind = details.method.startswith(prefix) and self.METHODS.get(details.method[len(prefix):])
        if not kind:
            return None
        # Messages pass through as bytes (no serializers on either side).
        forward = getattr(self.upstream, kind)(details.method)

        def metadata(context):
            return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]

        def unary(request, context):
            try:
                return forward(request, metadata=metadata(context), timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())

        def stream(request, context):
            call = forward(request, metadata=metadata(context))
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    context.abort(e.code(), e.details())

        if kind == "unary_stream":
            return grpc.unary_stream_rpc_method_handler(stream)
        if kind == "stream_unary":
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)


def post(address, path, body, headers):
    """POSTs body to http://address/path: (status, the answer parsed as JSON, or its text)."""
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
        response = connection.getresponse()
        status, text = response.status, response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class RecordingProxy:
    """The URL the hub posts webhooks to, in front of the spoke's handler:
    forwards each request unchanged and keeps it, with the answer, so the
    scenario can send a signed request again (and forge others)."""

    def __init__(self, spoke_address):
        self.requests = []  # dicts: headers, body, status, answer
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith(("webhook-", "hub-"))}
                try:
                    status, answer = post(spoke_address, self.path, body, headers)
                except OSError as e:  # the spoke is down or died answering
                    status, answer = 502, {"error": f"proxy: {e}"}
                proxy.requests.append({"headers": headers, "body": body, "status": status, "answer": answer})
                data = json.dumps(answer).encode() if not isinstance(answer, str) else answer.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hub/directives"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def request_for(self, directive_id):
        """The first request that carried this directive and was answered 200."""
        return next((r for r in self.requests if r["headers"].get("webhook-id") == directive_id and r["status"] == 200), None)


def sign(key, msg_id, timestamp, body):
    """A Standard Webhooks signature with the raw key bytes."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Operator:
    """AdminService, as an operator calls it with the admin token."""

    def __init__(self, hub):
        # Reconnect quickly after the hub restarts.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        self.channel = grpc.insecure_channel(hub.grpc, options=options)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {hub.token('admin')}")]

    def call(self, method, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=5, wait_for_ready=True)

    def spoke(self, name):
        return self.call("GetSpoke", admin_pb2.GetSpokeRequest(spoke_name=name)).spoke

    def create(self, spoke, type_, payload=None, force=False, max_attempts=0):
        request = admin_pb2.CreateDirectiveRequest(
            target=admin_pb2.DirectiveTarget(spoke_name=spoke), type=type_, force=force, max_attempts=max_attempts
        )
        if payload is not None:
            request.payload.update(payload)
        return self.call("CreateDirective", request).directives[0].id

    def directive(self, directive_id):
        return self.call("GetDirective", admin_pb2.GetDirectiveRequest(directive_id=directive_id)).directive

    def wait_final(self, ids, timeout=30):
        """Every directive in ids, once all are final (or as they are at the timeout)."""
        found = {}

        def all_final():
            for i in ids:
                if i not in found or found[i].state not in FINAL:
                    found[i] = self.directive(i)
            return all(d.state in FINAL for d in found.values())

        eventually(all_final, timeout=timeout)
        return found

    def points(self, spoke):
        return list(self.call("QueryMetrics", admin_pb2.QueryMetricsRequest(spoke_name=spoke, page_size=1000)).points)

    def events(self, spoke_id, *types):
        """The stored events about this spoke, of these types."""
        request = admin_pb2.WatchEventsRequest(types=types, spoke_id=spoke_id, stop_after_replay=True)
        return [r.event for r in self.stub.WatchEvents(request, metadata=self.metadata, timeout=10)]


class Scenario:
    def __init__(self, client, command, hub_bin, work, expect_ack_stream=False, webhook=False):
        self.client = client
        self.expect_ack_stream = expect_ack_stream
        self.webhook = webhook
        self.passed = 0
        self.hub = Hub(hub_bin, work)
        self.name = f"conformance-{client}"
        self.spoke = Spoke(command, self.hub, work, self.name)
        self.expected = {}  # directive id -> (state, result) the operator should see

    def check(self, what, ok, detail=""):
        if not ok:
            raise CheckFailed(f"{what}\n{detail}".rstrip())
        self.passed += 1
        print(f"ok {self.passed} - [{self.client}] {what}", flush=True)

    def create(self, type_, payload, expect_result, force=False, max_attempts=0):
        directive_id = self.op.create(self.name, type_, payload, force=force, max_attempts=max_attempts)
        self.expected[directive_id] = (types_pb2.DIRECTIVE_STATE_COMPLETED, expect_result)
        return directive_id

    def check_completed(self, what, ids):
        final = self.op.wait_final(ids)
        wrong = []
        for i in ids:
            d = final[i]
            state, result = self.expected[i]
            got = json_format.MessageToDict(d.result)
            if d.state != state or got != result:
                wrong.append(f"{i} ({d.type}): {state_name(d.state)} {got} {d.error}; expected {state_name(state)} {result}")
        self.check(what, not wrong, "\n".join(wrong))

    def run(self):
        self.check(f"the hub is ready on {self.hub.grpc}", self.hub.start())
        self.op = Operator(self.hub)
        self.registration()
        self.heartbeats()
        self.metrics()
        self.directives()
        self.acks_streamed("handling directives")
        self.hub_restart()
        self.acks_streamed("after the hub restarted")
        self.frozen_hub()
        self.spoke_restart()
        self.hub_without_ack_stream()
        self.webhook_delivery()
        self.exactly_once()
        self.refused_credentials()
        status = self.hub.stop()
        self.check("the hub stops on SIGTERM with exit status 0", status == 0, f"exit status {status}")

    def registration(self):
        proc = self.spoke.start()

        def connected():
            if proc.poll() is not None:
                raise CheckFailed(f"the spoke exited with status {proc.returncode} before connecting")
            return (s := self.op.spoke(self.name)).connected and s

        spoke = eventually(connected)
        self.check("the spoke registers with the enrollment token and holds its directive stream open", spoke)
        types = sorted(c.directive_type for c in spoke.capabilities)
        self.check("it declares the directive types echo and sum", types == ["echo", "sum"], f"declared {types}")
        self.spoke_id = spoke.id

    def heartbeats(self):
        first = eventually(lambda: (s := self.op.spoke(self.name)).HasField("last_heartbeat_at") and s)
        self.check(
            "it heartbeats with status OK and is ONLINE",
            first and first.status == types_pb2.SPOKE_STATUS_OK and first.health == types_pb2.SPOKE_HEALTH_ONLINE,
            str(first),
        )
        self.check_heartbeat_interval(first)

    def check_heartbeat_interval(self, first, phase=""):
        # Only a spoke that follows the hub's 1 s interval (rather than a
        # default of its own, such as 10 s) heartbeats twice more within 7 s.
        seen = {first.last_heartbeat_at.ToNanoseconds()}

        def beats():
            seen.add(self.op.spoke(self.name).last_heartbeat_at.ToNanoseconds())
            return len(seen) >= 3

        self.check(
            f"it heartbeats at the hub's interval ({HEARTBEAT_INTERVAL_S} s){phase}",
            eventually(beats, timeout=7 * HEARTBEAT_INTERVAL_S),
            f"{len(seen)} distinct heartbeats seen",
        )

    def metrics(self):
        pushes = eventually(lambda: len(e := self.spoke.read_events("metrics")) >= 2 and e, timeout=10)
        self.check("it pushes a metric batch and resends it", pushes, str(self.spoke.read_events("metrics")))
        first, again = pushes[0], pushes[1]
        self.batch_id, self.batch_points = first["batch_id"], first["accepted_points"]
        self.check(
            "the hub accepts the batch, then reports the resend BATCH_STATUS_DUPLICATE",
            first["status"] == "BATCH_STATUS_ACCEPTED"
            and again["status"] == "BATCH_STATUS_DUPLICATE"
            and again["batch_id"] == self.batch_id
            and self.batch_points > 0,
            str(pushes),
        )
        self.check_points_once()

    def check_points_once(self):
        points = self.op.points(self.name)
        from_batch = [p for p in points if p.batch_id == self.batch_id]
        keys = {(p.point.domain, p.point.name, tuple(sorted(p.point.labels.items())), p.point.time.ToNanoseconds()) for p in from_batch}
        self.check(
            f"QueryMetrics shows the batch's {self.batch_points} points once",
            len(from_batch) == self.batch_points == len(keys) and len(points) == len(from_batch),
            f"{len(points)} points stored, {len(from_batch)} from batch {self.batch_id}, {len(keys)} distinct",
        )

    def directives(self):
        ids = [
            self.create("echo", {"message": "hello", "n": 1}, {"message": "hello", "n": 1}),
            self.create("echo", {"nested": {"list": [1, "two", True]}, "empty": {}}, {"nested": {"list": [1, "two", True]}, "empty": {}}),
            self.create("echo", {}, {}),
            self.create("sum", {"numbers": [1, 2, 3]}, {"sum": 6}),
            self.create("sum", {"numbers": [0.5, -2, 10]}, {"sum": 8.5}),
            self.create("sum", {"numbers": []}, {"sum": 0}),
        ]
        self.check_completed("echo and sum directives end COMPLETED with the expected results", ids)

        bad = self.op.create(self.name, "sum", {"numbers": "seven"})
        self.expected[bad] = None
        d = self.op.wait_final([bad])[bad]
        self.check("a sum with a bad payload ends FAILED with the handler's error", d.state == types_pb2.DIRECTIVE_STATE_FAILED and d.error, str(d))

        try:
            self.op.create(self.name, "reboot")
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        self.check("a directive of an undeclared type is refused FAILED_PRECONDITION unless forced", code == grpc.StatusCode.FAILED_PRECONDITION, str(code))

        forced = self.op.create(self.name, "reboot", {"now": True}, force=True)
        self.expected[forced] = None
        d = self.op.wait_final([forced])[forced]
        self.check("a forced directive of an undeclared type ends REJECTED with an error", d.state == types_pb2.DIRECTIVE_STATE_REJECTED and d.error, str(d))

    def acks_streamed(self, phase):
        """With --expect-ack-stream: the acks the hub counted since it
        started came over AckStream, none through unary Ack."""
        if not self.expect_ack_stream:
            print(f"# [{self.client}] AckStream check ({phase}) not enabled for this client", flush=True)
            return
        calls = "hub_rpc_duration_seconds_count"  # a stream counts when it opens
        streams = self.hub.metric_total(calls, method="hub.v1.SpokeService/AckStream")
        unary = self.hub.metric_total(calls, method="hub.v1.SpokeService/Ack")
        acks = self.hub.metric_total("hub_acks_total")
        self.check(
            f"it acks over AckStream, never with unary Ack ({phase})",
            streams >= 1 and unary == 0 and acks > 0,
            f"since the hub started: {streams:g} AckStream call(s), {unary:g} Ack call(s), {acks:g} ack(s) applied",
        )

    def hub_restart(self):
        before = [self.create("echo", {"phase": "before-restart", "i": i}, {"phase": "before-restart", "i": i}) for i in range(4)]
        status = self.hub.stop()  # at once: some of these may be in flight
        self.check("the hub stops on SIGTERM with exit status 0, breaking the stream", status == 0, f"exit status {status}")
        self.check("the hub starts again on the same data dir and port", self.hub.start())
        # The spoke is still backing off: these wait for it, PENDING.
        during = [self.create("sum", {"numbers": [i, 100]}, {"sum": i + 100}) for i in range(4)]
        reconnected = eventually(lambda: self.op.spoke(self.name).connected, timeout=15)
        self.check("the spoke reconnects by itself", reconnected)
        after = [self.create("echo", {"phase": "after-reconnect", "i": i}, {"phase": "after-reconnect", "i": i}) for i in range(4)]
        self.check_completed(
            "directives created before the restart, while the spoke reconnects and after it are all COMPLETED",
            before + during + after,
        )

    def frozen_hub(self):
        """A hub that stops answering without closing anything (SIGSTOP):
        only the keepalive rule can tell the spoke its stream is dead."""
        registrations = len(self.spoke.read_events("registered"))
        self.hub.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3 * KEEPALIVE_INTERVAL_S + 1.5)  # the silence itself, not a wait for something
        finally:
            self.hub.proc.send_signal(signal.SIGCONT)
        reopened = eventually(lambda: len(self.spoke.read_events("registered")) > registrations, timeout=15)
        self.check(
            f"a stream silent for over three keepalive intervals ({KEEPALIVE_INTERVAL_S} s) is given up and reopened",
            reopened,
        )
        ids = [self.create("echo", {"phase": "after-freeze"}, {"phase": "after-freeze"})]
        self.check_completed("directives flow again after the freeze", ids)

    def spoke_restart(self):
        status = self.spoke.stop()
        self.check("the spoke stops on SIGTERM with exit status 0", status == 0, f"exit status {status}")
        gone = eventually(lambda: not self.op.spoke(self.name).connected, timeout=10)
        self.check("the operator sees its stream closed", gone)
        ids = [self.create("sum", {"numbers": [i, i]}, {"sum": 2 * i}) for i in range(3)]
        proc = self.spoke.start("--exit-after", "3")
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = "still running after 30 s"
        self.check("restarted on its state dir with --exit-after 3, it handles what was created meanwhile and exits 0", status == 0, f"exit status {status}")
        self.check_completed("the directives created while the spoke was down are COMPLETED", ids)
        spoke = self.op.spoke(self.name)
        registrations = self.spoke.read_events("registered")
        self.check(
            "it kept its identity: same spoke id, re-registered with its stored key",
            spoke.id == self.spoke_id and registrations and not registrations[-1]["new"],
            f"id {spoke.id} (was {self.spoke_id}); registrations {registrations}",
        )
        self.lost_ack()

    def lost_ack(self):
        """The spoke dies after doing the work but before its ack lands: the
        hub delivers the directive again, and the spoke must answer from its
        record instead of doing the work twice."""
        directive_id = self.create("sum", {"numbers": [40, 2]}, {"sum": 42})
        proc = self.spoke.start("--crash-before-ack")
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = "still running after 30 s"
        d = self.op.directive(directive_id)
        self.check(
            "a spoke that dies before acking leaves the directive outstanding",
            status == 3 and d.state not in FINAL and d.attempt >= 1,
            f"exit status {status}; {state_name(d.state)}",
        )
        self.spoke.start()
        self.check_completed("restarted, it gets the directive again and acks it COMPLETED", [directive_id])
        reacked = [e for e in self.spoke.read_events("reacked") if e["directive_id"] == directive_id]
        attempt = self.op.directive(directive_id).attempt
        self.check(
            "it answered the redelivery from its record instead of running the work again",
            reacked and attempt >= 2,
            f"reacked events {reacked}; attempt {attempt}",
        )
        status = self.spoke.stop()
        self.check("the spoke stops on SIGTERM with exit status 0", status == 0, f"exit status {status}")

    def hub_without_ack_stream(self):
        """A hub without AckStream answers it UNIMPLEMENTED: a spoke that
        acks over the stream falls back to unary Ack, and nothing is lost."""
        calls = "hub_rpc_duration_seconds_count"
        unary_before = self.hub.metric_total(calls, method="hub.v1.SpokeService/Ack")
        older = HubWithoutAckStream(self.hub)
        try:
            proc = self.spoke.start(hub=older.address)
            ids = [self.create("sum", {"numbers": [i, 1000]}, {"sum": i + 1000}) for i in range(3)]
            if proc.poll() is not None:
                raise CheckFailed(f"the spoke exited with status {proc.returncode} against a hub without AckStream")
            self.check_completed("through a hub without AckStream (UNIMPLEMENTED), its directives are COMPLETED", ids)
            unary = self.hub.metric_total(calls, method="hub.v1.SpokeService/Ack") - unary_before
            self.check(
                "it acked them with unary Ack instead",
                unary >= len(ids),
                f"{unary:g} unary Ack call(s) for {len(ids)} directives",
            )
            status = self.spoke.stop()
            self.check("the spoke stops on SIGTERM with exit status 0", status == 0, f"exit status {status}")
        finally:
            self.spoke.stop()
            older.stop()

    def webhook_delivery(self):
        """With --webhook: the spoke restarts in webhook mode and the hub
        POSTs its directives, signed, to its handler (through a proxy of the
        scenario's that keeps each request and answer), instead of sending
        them on the stream. The answers carry the outcomes."""
        if not self.webhook:
            print(f"# [{self.client}] webhook phase not enabled for this client", flush=True)
            return
        listen = f"127.0.0.1:{free_port()}"
        proxy = RecordingProxy(listen)
        try:
            echo_id = self.webhook_directives(listen, proxy)
            self.webhook_forged_and_replayed(listen, proxy, echo_id)
            self.webhook_lost_answer(listen)
        finally:
            self.spoke.stop()
            proxy.stop()

    def webhook_directives(self, listen, proxy):
        delivered_before = self.hub.metric_total("hub_webhook_attempts_total", result="delivered")
        registrations = len(self.spoke.read_events("registered"))
        proc = self.spoke.start("--webhook-listen", listen, "--webhook-url", proxy.url)

        def switched():
            if proc.poll() is not None:
                raise CheckFailed(f"the spoke exited with status {proc.returncode} in webhook mode")
            s = self.op.spoke(self.name)
            return len(self.spoke.read_events("registered")) > registrations and s.delivery_mode == types_pb2.DELIVERY_MODE_WEBHOOK and s

        spoke = eventually(switched)
        self.check(
            "restarted with --webhook-listen and --webhook-url, it re-registers for webhook delivery (GetSpoke: DELIVERY_MODE_WEBHOOK, its URL)",
            spoke and spoke.webhook_url == proxy.url and spoke.id == self.spoke_id,
            str(spoke or self.op.spoke(self.name)),
        )
        self.check_heartbeat_interval(spoke, " in webhook mode")

        ids = [
            self.create("echo", {"via": "webhook", "n": 1}, {"via": "webhook", "n": 1}),
            self.create("echo", {"nested": {"list": [1, "two", True]}, "empty": {}}, {"nested": {"list": [1, "two", True]}, "empty": {}}),
            self.create("echo", {}, {}),
            self.create("sum", {"numbers": [1, 2, 3.5]}, {"sum": 6.5}),
            self.create("sum", {"numbers": []}, {"sum": 0}),
        ]
        self.check_completed("via webhook, echo and sum directives end COMPLETED with the expected results", ids)
        bad = self.op.create(self.name, "sum", {"numbers": "seven"})
        forced = self.op.create(self.name, "reboot", {"now": True}, force=True)
        self.expected[bad] = self.expected[forced] = None
        final = self.op.wait_final([bad, forced])
        self.check(
            "via webhook, a sum with a bad payload ends FAILED and a forced undeclared type REJECTED, each with an error",
            final[bad].state == types_pb2.DIRECTIVE_STATE_FAILED
            and final[bad].error
            and final[forced].state == types_pb2.DIRECTIVE_STATE_REJECTED
            and final[forced].error,
            f"{final[bad]}\n{final[forced]}",
        )

        # What the spoke answered, as the proxy saw it.
        every = ids + [bad, forced]
        wrong = []
        for i in every:
            request = proxy.request_for(i)
            answer = request and request["answer"]
            if i in ids:
                ok = answer == {"outcome": "COMPLETED", "result": self.expected[i][1]}
            else:
                want = "FAILED" if i == bad else "REJECTED"
                ok = isinstance(answer, dict) and answer.get("outcome") == want and isinstance(answer.get("error"), str) and answer["error"]
            if not ok:
                wrong.append(f"{i}: {request and request['status']} {answer}")
        self.check(
            'it answered each request 200 with {"outcome": "COMPLETED", "result": ...}, or FAILED/REJECTED and an "error"',
            not wrong,
            "\n".join(wrong) + f"\nall requests: {proxy.requests}",
        )
        delivered = self.hub.metric_total("hub_webhook_attempts_total", result="delivered") - delivered_before
        self.check(
            'the hub\'s /metrics counts them in hub_webhook_attempts_total{result="delivered"}',
            delivered >= len(every),
            f"{delivered:g} delivered for {len(every)} directives",
        )

        def via():
            found = collections.defaultdict(list)
            for event in self.op.events(self.spoke_id, types_pb2.EVENT_TYPE_DIRECTIVE_DELIVERED):
                if event.directive_id in every:
                    found[event.directive_id].append(json_format.MessageToDict(event.details).get("via"))
            return found if set(found) == set(every) else None

        found = eventually(via, timeout=10)
        self.check(
            'their directive.delivered events say "via": "webhook"',
            found and all(v == ["webhook"] for v in found.values()),
            str(found and dict(found)),
        )
        last = self.op.spoke(self.name).last_webhook
        self.check(
            "GetSpoke shows the last webhook request, delivered",
            last.result == "delivered" and last.directive_id in every and last.http_status == 200,
            str(last),
        )
        return ids[0]

    def webhook_forged_and_replayed(self, listen, proxy, echo_id):
        """Requests sent by the scenario straight to the spoke's handler:
        forged ones, and a copy of the hub's signed request for echo_id."""
        handled_before = self.spoke.read_events("handled")
        original = proxy.request_for(echo_id)
        forged_id = str(uuid.uuid4())
        body = original["body"].replace(echo_id.encode(), forged_id.encode())
        now = str(int(time.time()))
        forged = {
            "another secret's signature": {
                "webhook-id": forged_id,
                "webhook-timestamp": now,
                "webhook-signature": sign(os.urandom(32), forged_id, now, body),
            },
            "another request's signature": {**original["headers"], "webhook-id": forged_id},
            "no signature": {"webhook-id": forged_id, "webhook-timestamp": now},
            "a malformed signature": {"webhook-id": forged_id, "webhook-timestamp": now, "webhook-signature": "v1"},
            "the signed request's headers over another body": original["headers"],
        }
        answers = {what: post(listen, "/hub/directives", body, headers)[0] for what, headers in forged.items()}
        self.check(
            "a request it cannot verify is answered 401: " + ", ".join(forged),
            all(status == 401 for status in answers.values()),
            str(answers),
        )
        handled = self.spoke.read_events("handled")
        self.check(
            "and runs nothing",
            handled == handled_before and self.spoke.proc.poll() is None,
            f"handled events {len(handled_before)} -> {len(handled)}: {handled[len(handled_before):]}",
        )

        status, answer = post(listen, "/hub/directives", original["body"], original["headers"])
        reacked = [e for e in self.spoke.read_events("reacked") if e["directive_id"] == echo_id]
        runs = [e for e in self.spoke.read_events("handled") if e["directive_id"] == echo_id]
        self.check(
            "the signed request of a directive it finished, sent again, is answered from its record: same outcome, not run again",
            status == 200 and answer == original["answer"] and reacked and len(runs) == 1,
            f"HTTP {status} {answer} (first: {original['answer']}); reacked {reacked}; handled {runs}",
        )

    def webhook_lost_answer(self, listen):
        """The spoke dies after the work, before answering the hub's
        request: the hub posts it again, and the spoke answers from its
        record."""
        status = self.spoke.stop()
        self.check("the spoke stops on SIGTERM with exit status 0 in webhook mode", status == 0, f"exit status {status}")
        registrations = len(self.spoke.read_events("registered"))
        proc = self.spoke.start("--webhook-listen", listen, "--crash-before-ack")
        direct = f"http://{listen}/hub/directives"

        def registered():
            if proc.poll() is not None:
                raise CheckFailed(f"the spoke exited with status {proc.returncode} before registering")
            return len(self.spoke.read_events("registered")) > registrations and self.op.spoke(self.name).webhook_url == direct

        self.check(f"with --webhook-listen alone, it registers webhook_url {direct}", eventually(registered), str(self.op.spoke(self.name)))
        # Attempts to spare: the hub retries while the spoke restarts.
        directive_id = self.create("sum", {"numbers": [40, 2]}, {"sum": 42}, max_attempts=10)
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = "still running after 30 s"
        d = self.op.directive(directive_id)
        self.check(
            "a spoke that dies before answering a webhook request leaves the directive outstanding",
            status == 3 and d.state not in FINAL and d.attempt >= 1,
            f"exit status {status}; {state_name(d.state)}",
        )
        self.spoke.start("--webhook-listen", listen)
        self.check_completed("restarted, it gets the request again and answers it COMPLETED", [directive_id])
        reacked = [e for e in self.spoke.read_events("reacked") if e["directive_id"] == directive_id]
        attempt = self.op.directive(directive_id).attempt
        self.check(
            "it answered the redelivery from its record instead of running the work again",
            reacked and attempt >= 2,
            f"reacked events {reacked}; attempt {attempt}",
        )
        status = self.spoke.stop()
        self.check("the spoke stops on SIGTERM with exit status 0", status == 0, f"exit status {status}")

    def exactly_once(self):
        handled = collections.Counter(e["directive_id"] for e in self.spoke.read_events("handled"))
        twice = {i: n for i, n in handled.items() if n > 1}
        self.check("no directive was handled twice", not twice, f"handled more than once: {twice}")
        missing = set(self.expected) - set(handled)
        unexpected = set(handled) - set(self.expected)
        self.check(
            f"every one of the {len(self.expected)} directives was handled, and nothing else",
            not missing and not unexpected,
            f"never handled: {sorted(missing)}; not created here: {sorted(unexpected)}",
        )
        self.check_points_once()

    def refused_credentials(self):
        bogus = self.spoke.work / "bogus.token"
        bogus.write_text("not-the-enrollment-token\n")
        name = f"{self.name}-intruder"
        proc = self.spoke.start(state_dir=self.spoke.work / "intruder-state", token_file=bogus, name=name)
        try:
            status = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.spoke.stop()
            status = None
        self.check("a spoke refused UNAUTHENTICATED gives up and exits non-zero", status not in (0, None), f"exit status {status}")
        try:
            self.op.spoke(name)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        self.check("and was not registered", code == grpc.StatusCode.NOT_FOUND, str(code))


def tail(path, lines=40):
    if not path.exists():
        return f"(no {path.name})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", required=True, help="a short name for the client, e.g. python")
    parser.add_argument("--hub-bin", default=os.environ.get("HUB_BIN", "target/debug/hub"))
    parser.add_argument(
        "--expect-ack-stream",
        action="store_true",
        help="also check (on the hub's /metrics) that the spoke acks over AckStream, never with unary Ack",
    )
    parser.add_argument(
        "--webhook",
        action="store_true",
        help="also run the webhook phase (the client's --webhook-listen and --webhook-url)",
    )
    parser.add_argument("command", nargs="+", help="the client's command (after --)")
    args = parser.parse_args()
    hub_bin = Path(args.hub_bin)
    if not hub_bin.is_absolute():
        hub_bin = ROOT / hub_bin
    if not os.access(hub_bin, os.X_OK):
        sys.exit(f"scenario.py: no hub binary at {hub_bin} (cargo build -p hub, or set HUB_BIN)")

    # Stopped from outside: unwind, so the finally below stops hub and spoke.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix=f"hub-conformance-{args.client}."))
    scenario = Scenario(args.client, args.command, str(hub_bin), work, args.expect_ack_stream, args.webhook)
    failed = 0
    try:
        scenario.run()
    except Exception as e:  # noqa: BLE001 - any error fails the scenario, with the logs
        failed = 1
        detail = str(e) if isinstance(e, (CheckFailed, grpc.RpcError)) else traceback.format_exc()
        print(f"not ok {scenario.passed + 1} - [{args.client}] {detail}", flush=True)
        print(f"----- spoke log -----\n{tail(scenario.spoke.log)}\n----- hub log -----\n{tail(scenario.hub.log)}")
        print(f"----- work dir kept: {work} -----")
    finally:
        scenario.spoke.stop()
        if scenario.hub.proc and scenario.hub.proc.poll() is None:
            scenario.hub.stop()
        if not failed:  # passed, or interrupted
            shutil.rmtree(work, ignore_errors=True)
    print(f"conformance[{args.client}]: {scenario.passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
