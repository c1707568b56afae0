#!/usr/bin/env python3
"""A hub spoke in Python, written from proto/hub/v1/*.proto alone.

It registers with the enrollment token and a key of its own making (kept
before the call, so a retry after a lost reply proposes the same key and is
answered as the first call), keeps the key the reply carries, holds the
WatchDirectives stream open, runs the `echo` and `sum` directive types and
acks each one over one AckStream (unary Ack on a hub without it),
heartbeats at the interval the hub sets, pushes one metric batch (and
resends it once, to show the hub stores it once), and reconnects with
exponential backoff whenever the stream breaks. See README.md beside it.

With --webhook-listen it takes its directives as signed HTTP POSTs instead
(webhook mode): it registers with a webhook_url, keeps the webhook secret
the reply carries beside its key, and answers each verified request with
the outcome; the stream then carries cancel notices and keepalives only.

The stubs are generated, never committed:

    python -m grpc_tools.protoc -Iproto --python_out=target/python-stubs \
        --grpc_python_out=target/python-stubs proto/hub/v1/*.proto

and found in target/python-stubs (or the directory in $HUB_PY_STUBS).
"""

import argparse
import asyncio
import collections
import http.server
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format
from standardwebhooks import Webhook

STUBS = os.environ.get("HUB_PY_STUBS") or Path(__file__).resolve().parents[2] / "target" / "python-stubs"
sys.path.insert(0, str(STUBS))
try:
    from hub.v1 import spoke_pb2, spoke_pb2_grpc, types_pb2
except ImportError:
    sys.exit(f"spoke.py: no generated stubs in {STUBS}; see examples/python-spoke/README.md")

VERSION = "python-spoke/0.1.0"
log = logging.getLogger("spoke")

# Webhook mode: the path the handler answers on, and the largest body it reads.
WEBHOOK_PATH = "/hub/directives"
MAX_WEBHOOK_BODY = 4 << 20

# Codes after which retrying cannot help (spoke.proto: "do not retry without a
# new key"); every other code, and a stream that just ends, means reconnect.
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNIMPLEMENTED,
}

# HTTP/2 pings find a dead connection in seconds even when no data flows.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


# --- the work: one function per directive type --------------------------------


def echo(payload):
    """`echo`: the result is the payload."""
    return payload


def sum_numbers(payload):
    """`sum`: {"numbers": [1, 2.5]} -> {"sum": 3.5}."""
    numbers = payload.get("numbers")
    if not isinstance(numbers, list) or not all(
        isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers
    ):
        raise ValueError("payload.numbers must be a list of numbers")
    return {"sum": sum(numbers)}


HANDLERS = {"echo": echo, "sum": sum_numbers}


# --- plumbing ----------------------------------------------------------------------


class Fatal(Exception):
    """The hub refused us in a way retrying cannot fix."""


class Done(Exception):
    """--exit-after reached."""


class AckError(Exception):
    """An ack refused on AckStream (the error unary Ack would have raised),
    or an AckStream that went wrong. It has the code() and details() of a
    grpc.aio.AioRpcError, so both are handled alike."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


# gRPC code numbers (ItemError.code) to grpc.StatusCode.
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def ack_refused(directive_id, code, details):
    """What the hub's refusal of an ack means, from Ack or from AckStream.
    Cancelled or expired meanwhile (FAILED_PRECONDITION), or not ours
    (NOT_FOUND): nothing more to do. Anything else (e.g. UNAVAILABLE) is
    raised: reconnect, and the hub delivers the directive again."""
    if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
        raise AckError(code, details)
    log.warning("ack of %s refused: %s", directive_id, details)


class Backoff:
    """gRPC's reconnect backoff: base, x1.6 after each failure, +-20 % jitter,
    120 s cap; reset after a successful connection."""

    def __init__(self, base=1.0, factor=1.6, jitter=0.2, cap=120.0):
        if not 0 < base <= cap or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff: need 0 < base <= cap, factor >= 1, 0 <= jitter < 1")
        self.base, self.factor, self.jitter, self.cap = base, factor, jitter, cap
        self.current = base

    def next(self):
        delay = self.current * random.uniform(1 - self.jitter, 1 + self.jitter)
        self.current = min(self.current * self.factor, self.cap)
        return delay

    def reset(self):
        self.current = self.base


class State:
    """What survives a restart, in the state directory: the spoke key
    (spoke.key, mode 0600; until the hub confirmed it, the key proposed at
    enrollment is enrollment.key), in webhook mode the secret webhook
    requests are signed with (webhook.secret, mode 0600), the outcome of
    every directive it finished (outcomes.jsonl) and the metric batch not
    yet sent (metrics-batch.json)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.outcomes = {}
        outcomes = self.dir / "outcomes.jsonl"
        if outcomes.exists():
            for line in outcomes.read_text().splitlines():
                record = json.loads(line)
                self.outcomes[record["id"]] = record

    def key(self):
        path = self.dir / "spoke.key"
        return path.read_text().strip() if path.exists() else None

    def save_key(self, key):
        self._write_secret("spoke.key", key)
        (self.dir / "enrollment.key").unlink(missing_ok=True)

    def proposed_key(self):
        """The key to propose at enrollment: the one kept from an earlier
        attempt (its reply may have been lost after the hub stored it), else
        a new one (32 random bytes as hex), kept before it is ever sent."""
        path = self.dir / "enrollment.key"
        if path.exists():
            return path.read_text().strip()
        key = secrets.token_hex(32)
        self._write_secret("enrollment.key", key)
        return key

    def webhook_secret(self):
        path = self.dir / "webhook.secret"
        return path.read_text().strip() if path.exists() else None

    def save_webhook_secret(self, secret):
        self._write_secret("webhook.secret", secret)

    def forget_webhook_secret(self):
        (self.dir / "webhook.secret").unlink(missing_ok=True)

    def _write_secret(self, name, value):
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, record):
        """Remembers an outcome before it is acked, so a redelivery is
        answered from here and never runs the work twice."""
        self.outcomes[record["id"]] = record
        with open(self.dir / "outcomes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending_batch(self):
        """The demo metric batch, created once and kept (same id) until sent."""
        path = self.dir / "metrics-batch.json"
        if path.exists():
            return json.loads(path.read_text())
        if (self.dir / "metrics-batch.sent").exists():
            return None
        batch = {"batch_id": str(uuid.uuid4()), "time_ns": time.time_ns()}
        path.write_text(json.dumps(batch))
        return batch

    def buffered_points(self):
        return len(DEMO_POINTS) if (self.dir / "metrics-batch.json").exists() else 0

    def batch_sent(self):
        (self.dir / "metrics-batch.sent").touch()
        (self.dir / "metrics-batch.json").unlink()


DEMO_POINTS = [
    ("statistics", "orders_processed", 42.0, "1"),
    ("statistics", "queue_depth", 7.0, "1"),
    ("compensation", "payout_total", 1234.5, "EUR"),
]


def demo_points(batch):
    """The demo batch's points, all measured when the batch was made."""
    result = []
    for domain, name, value, unit in DEMO_POINTS:
        point = types_pb2.MetricPoint(domain=domain, name=name, value=value, unit=unit, labels={"lang": "python"})
        point.time.FromNanoseconds(batch["time_ns"])
        result.append(point)
    return result


def seconds(duration):
    return duration.ToTimedelta().total_seconds()


class Acks:
    """Acks over one AckStream per connection: each ack is a message on the
    stream, and the hub answers every message in the order sent, so each
    answer belongs to the oldest ack not answered yet. An answer with a
    result means the ack is committed. The acks still unanswered when the
    stream breaks are kept and sent again first on the next connection's
    stream (a repeated final ack is answered OK, duplicate). A hub without
    AckStream answers UNIMPLEMENTED: then this connection acks with unary
    Ack, the unanswered ones first."""

    def __init__(self):
        self.unanswered = collections.deque()  # AckRequests sent, oldest first
        self.all_answered = asyncio.Event()
        self.all_answered.set()
        self.stub = self.metadata = self.call = None
        self.unary = False

    async def open(self, stub, metadata):
        """Opens this connection's stream and sends the unanswered acks again."""
        self.stub, self.metadata, self.unary = stub, metadata, False
        self.call = stub.AckStream(metadata=metadata)
        for request in list(self.unanswered):
            await self.write(request)

    def close(self):
        if self.call is not None:
            self.call.cancel()
            self.call = None

    async def send(self, request):
        if self.unary:
            await self.unary_ack(request)
            return
        self.unanswered.append(request)
        self.all_answered.clear()
        await self.write(request)

    async def write(self, request):
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the stream broke: answers() says why, and the ack stays unanswered

    async def answers(self):
        """Reads the answers until the stream breaks (raised), or until the
        hub turns out not to have AckStream (returns, acks go unary)."""
        try:
            while True:
                answer = await self.call.read()
                if answer is grpc.aio.EOF:
                    # Only a broken hub ends it: we never stop writing.
                    raise AckError(grpc.StatusCode.UNAVAILABLE, "the hub ended the ack stream")
                if not self.unanswered or answer.directive_id != self.unanswered[0].directive_id:
                    raise AckError(grpc.StatusCode.INTERNAL, f"AckStream answered an ack of {answer.directive_id!r} out of order")
                request = self.unanswered.popleft()
                if not self.unanswered:
                    self.all_answered.set()
                if answer.WhichOneof("outcome") == "error":
                    code = STATUS_CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                    ack_refused(request.directive_id, code, answer.error.message)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        log.info("the hub has no AckStream: acking with unary Ack")
        self.unary = True
        while self.unanswered:
            await self.unary_ack(self.unanswered[0])
            self.unanswered.popleft()
        self.all_answered.set()

    async def unary_ack(self, request):
        try:
            await self.stub.Ack(request, metadata=self.metadata, timeout=10)
        except grpc.aio.AioRpcError as e:
            ack_refused(request.directive_id, e.code(), e.details())

    async def drain(self):
        """Waits until every ack sent has its answer."""
        await self.all_answered.wait()


# --- the spoke ------------------------------------------------------------------------


class Spoke:
    def __init__(self, args):
        self.args = args
        self.state = State(args.state_dir)
        self.backoff = Backoff(base=args.backoff_base)
        self.heartbeat_interval = 10.0  # until the hub says otherwise
        self.keepalive_interval = 15.0
        self.retry_after = 0.0
        self.handled = 0
        self.failed_pushes = 0
        self.acks = Acks()  # unanswered acks outlive a connection
        # Webhook mode: the URL the hub posts to, and set once --exit-after is reached.
        self.webhook_url = args.webhook_url or (f"http://{args.webhook_listen}{WEBHOOK_PATH}" if args.webhook_listen else "")
        self.finished = asyncio.Event()

    def auth(self):
        return [("authorization", f"Bearer {self.state.key()}")]

    def report(self, event, **fields):
        """One JSON line per thing done, for tests (--events-file)."""
        if self.args.events_file:
            with open(self.args.events_file, "a") as f:
                f.write(json.dumps({"event": event, **fields}) + "\n")

    async def run(self):
        """Connect, serve until the stream breaks, back off, repeat."""
        while True:
            try:
                async with grpc.aio.insecure_channel(self.args.hub, options=CHANNEL_OPTIONS) as channel:
                    await self.serve(spoke_pb2_grpc.SpokeServiceStub(channel))
                log.warning("the hub ended the stream")
            except (grpc.aio.AioRpcError, AckError) as e:
                if e.code() in FATAL:
                    raise Fatal(f"{e.code().name}: {e.details()}") from e
                log.warning("hub unreachable or stream broken: %s: %s", e.code().name, e.details())
            delay = max(self.backoff.next(), self.retry_after)
            self.retry_after = 0.0
            log.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def serve(self, stub):
        await self.register(stub)
        self.backoff.reset()
        heartbeats = asyncio.create_task(self.heartbeats(stub))
        try:
            await self.push_demo_batch(stub)
            if self.webhook_url:
                # The webhook answers carry the outcomes: nothing to ack here.
                # The stream brings cancel notices and keepalives only.
                watch = asyncio.create_task(self.watch(stub))
                tasks = {watch, asyncio.create_task(self.until_finished())}
            else:
                await self.acks.open(stub, self.auth())
                # Until the directive stream ends; a broken ack stream ends it too.
                watch = asyncio.create_task(self.watch(stub))
                tasks = {watch, asyncio.create_task(self.acks.answers())}
            try:
                while watch in tasks:
                    done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # raises what ended it
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            heartbeats.cancel()
            self.acks.close()

    async def register(self, stub):
        """With the stored key if there is one (updates our registration),
        else with the enrollment token and the key we propose (creates the
        spoke; a retry with the same key after a lost reply is answered as
        the first call was). In webhook mode with the webhook URL: the hub
        shows the secret it signs with once, when it gives the spoke a
        webhook (and again to a retried enrollment)."""
        reply = await self.register_once(stub, self.webhook_url)
        if not self.webhook_url:
            self.state.forget_webhook_secret()  # registering without a webhook URL drops it
        elif reply.spoke.delivery_mode != types_pb2.DELIVERY_MODE_WEBHOOK:
            raise Fatal("the hub ignored webhook_url: it has no webhook delivery (an older hub?)")
        elif not self.state.webhook_secret():
            # The reply that showed it was lost. Registering without the
            # webhook drops it; registering with it again makes a new secret.
            log.warning("no webhook secret kept for this registration: asking the hub for a new one")
            await self.register_once(stub, "")
            reply = await self.register_once(stub, self.webhook_url)
            if not self.state.webhook_secret():
                raise Fatal("the hub gave the webhook no secret")
        log.info("registered as %s (id %s)%s", reply.spoke.name, reply.spoke.id, f", webhook {self.webhook_url}" if self.webhook_url else "")
        self.report("registered", spoke_id=reply.spoke.id, new=bool(reply.spoke_key))
        self.apply_hints(reply.hints)

    async def register_once(self, stub, webhook_url):
        key = self.state.key()
        try:
            token = key or Path(self.args.enrollment_token_file).read_text().strip()
        except OSError as e:
            raise Fatal(f"no key in {self.state.dir} and no enrollment token: {e}") from e
        request = spoke_pb2.RegisterRequest(
            name=self.args.name,
            labels={"lang": "python"},
            capabilities=[types_pb2.Capability(directive_type=t, version="1") for t in HANDLERS],
            version=VERSION,
            proposed_key="" if key else self.state.proposed_key(),
            webhook_url=webhook_url,
        )
        reply = await stub.Register(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
        if reply.webhook_secret:
            # Kept before the key: a spoke with a key never lost its secret
            # to a crash in between.
            self.state.save_webhook_secret(reply.webhook_secret)
        if reply.spoke_key:
            # The reply's key, whatever we proposed: an older hub ignores the
            # proposal and makes its own.
            self.state.save_key(reply.spoke_key)
        return reply

    def apply_hints(self, hints):
        if hints.HasField("heartbeat_interval"):
            self.heartbeat_interval = seconds(hints.heartbeat_interval)
        if hints.HasField("keepalive_interval"):
            self.keepalive_interval = seconds(hints.keepalive_interval)
        if hints.HasField("retry_after"):
            self.retry_after = seconds(hints.retry_after)

    async def heartbeats(self, stub):
        """One right after connecting, then every interval the hub returns."""
        while True:
            request = spoke_pb2.HeartbeatRequest(
                status=types_pb2.SPOKE_STATUS_OK,
                status_message="ready",
                buffered_metric_points=self.state.buffered_points(),
                failed_metric_pushes=self.failed_pushes,
                version=VERSION,
            )
            try:
                reply = await stub.Heartbeat(request, metadata=self.auth(), timeout=10)
                if reply.HasField("next_interval"):
                    self.heartbeat_interval = seconds(reply.next_interval)
            except grpc.aio.AioRpcError as e:
                # The stream notices a broken hub too and reconnects us.
                log.warning("heartbeat failed: %s", e.code().name)
            await asyncio.sleep(self.heartbeat_interval)

    async def push_demo_batch(self, stub):
        """Pushes one batch, then resends it once: the hub answers DUPLICATE
        and stores it once, so resending after any failure is always safe."""
        batch = self.state.pending_batch()
        if batch is None:
            return
        request = spoke_pb2.PushMetricsRequest(batch_id=batch["batch_id"], points=demo_points(batch))
        for attempt in ("sent", "resent"):
            try:
                reply = await stub.PushMetrics(iter([request]), metadata=self.auth(), timeout=10)
            except grpc.aio.AioRpcError:
                self.failed_pushes += 1
                raise  # the batch stays in the state dir and goes out again, same id
            result = reply.batches[0]
            status = spoke_pb2.BatchStatus.Name(result.status)
            log.info("metric batch %s %s: %s, %d points stored", result.batch_id, attempt, status, result.accepted_points)
            self.report("metrics", batch_id=result.batch_id, status=status, accepted_points=result.accepted_points)
        self.state.batch_sent()

    async def watch(self, stub):
        """Reads the stream until it ends. Silence for three keepalive
        intervals means a dead stream: cancel it and reconnect."""
        await self.exit_if_done()  # acks resent after a reconnect may complete --exit-after
        call = stub.WatchDirectives(spoke_pb2.WatchDirectivesRequest(), metadata=self.auth())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(call.read(), timeout=3 * self.keepalive_interval)
                except asyncio.TimeoutError:
                    log.warning("no keepalive for %.0f s; the stream is dead", 3 * self.keepalive_interval)
                    return
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("message")
                if kind == "directive" and self.webhook_url:
                    # The hub never does this; the webhook brings it again.
                    log.warning("directive %s came on the stream in webhook mode: ignored", message.directive.id)
                elif kind == "directive":
                    await self.handle(message.directive)
                    await self.exit_if_done()
                elif kind == "cancelled":
                    # Handlers here finish at once; a long one would stop now.
                    log.info("directive %s cancelled: %s", message.cancelled.directive_id, message.cancelled.reason)
                elif kind == "hints":
                    self.apply_hints(message.hints)
        finally:
            call.cancel()

    async def exit_if_done(self):
        """--exit-after: once N new directives are handled and their acks
        answered, stop."""
        if self.args.exit_after and self.handled >= self.args.exit_after:
            await self.acks.drain()
            raise Done()

    async def until_finished(self):
        """Webhook mode's --exit-after: raises Done once the answer that
        completed the count is sent."""
        await self.finished.wait()
        raise Done()

    async def handle(self, directive):
        """Runs a directive from the stream once and acks the outcome."""
        payload = json_format.MessageToDict(directive.payload)
        outcome, first_time = self.run_once(directive.id, directive.type, payload, directive.attempt)
        await self.ack(outcome)
        if first_time:
            self.handled += 1

    def run_once(self, directive_id, type_, payload, attempt):
        """The outcome of a directive, and whether it ran now: it runs once
        and its outcome is recorded; a redelivery gets the recorded outcome
        again."""
        outcome = self.state.outcomes.get(directive_id)
        if outcome is not None:
            log.info("directive %s delivered again (attempt %s): answering with its recorded outcome", directive_id, attempt)
            self.report("reacked", directive_id=directive_id)
            return outcome, False
        outcome = {"id": directive_id, **run_handler(type_, payload)}
        self.state.record(outcome)
        log.info("directive %s (%s): %s", directive_id, type_, outcome["outcome"])
        self.report("handled", directive_id=directive_id, type=type_, outcome=outcome["outcome"])
        if self.args.crash_before_ack:
            log.warning("--crash-before-ack: dying before acking %s", directive_id)
            os._exit(3)
        return outcome, True

    async def webhook_request(self, body, headers):
        """One webhook request: (HTTP status, JSON answer). Only a request
        signed with our secret (within 5 minutes of its timestamp) runs
        anything; the answer carries the outcome, which the hub applies as
        an ack."""
        secret = self.state.webhook_secret()
        if not secret:
            return 503, {"error": "no webhook secret yet"}
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
        except Exception as e:  # WebhookVerificationError, or headers that do not parse
            log.warning("webhook request refused: %s", e)
            return 401, {"error": "invalid signature"}
        try:
            directive = json.loads(body)
            directive_id, type_ = directive["id"], directive["type"]
        except (ValueError, KeyError, TypeError) as e:
            return 400, {"error": f"not a directive: {e}"}
        outcome, first_time = self.run_once(directive_id, type_, directive.get("payload") or {}, directive.get("attempt"))
        if first_time:
            self.handled += 1
        return 200, webhook_answer(outcome)

    def answered(self):
        """A webhook answer was sent: --exit-after may be reached."""
        if self.args.exit_after and self.handled >= self.args.exit_after:
            self.finished.set()

    async def ack(self, outcome):
        """Sends the ack without waiting for its answer: Acks matches the
        answers as they come, while the next directive runs."""
        request = spoke_pb2.AckRequest(directive_id=outcome["id"], outcome=spoke_pb2.AckOutcome.Value(outcome["outcome"]))
        if "result" in outcome:
            request.result.update(outcome["result"])
        if "error" in outcome:
            request.error = outcome["error"][:4096]
        await self.acks.send(request)


def run_handler(type_, payload):
    """The outcome of one directive, as recorded and acked."""
    handler = HANDLERS.get(type_)
    if handler is None:
        # The operator forced a type we never declared: refuse it, per contract.
        return {"outcome": "ACK_OUTCOME_REJECTED", "error": f"no handler for directive type {type_!r}"}
    try:
        return {"outcome": "ACK_OUTCOME_COMPLETED", "result": handler(payload)}
    except Exception as e:  # a handler's error is the directive's failure
        return {"outcome": "ACK_OUTCOME_FAILED", "error": f"{type_}: {e}"}


def webhook_answer(outcome):
    """A recorded outcome as a webhook answer: {"outcome": "COMPLETED",
    "result": {...}}, or FAILED/REJECTED with "error"."""
    answer = {"outcome": outcome["outcome"].removeprefix("ACK_OUTCOME_")}
    if "result" in outcome:
        answer["result"] = outcome["result"]
    if "error" in outcome:
        answer["error"] = outcome["error"][:4096]
    return answer


# --- webhook mode: the HTTP handler -------------------------------------------------


class WebhookServer(http.server.ThreadingHTTPServer):
    """Serves POST /hub/directives, a thread per request; each request is
    then handled on the spoke's event loop, like a directive from the
    stream."""

    daemon_threads = True

    def __init__(self, address, spoke, loop):
        self.spoke, self.loop = spoke, loop
        super().__init__(address, WebhookHandler)


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    server_version = VERSION

    def do_POST(self):
        if urlsplit(self.path).path != WEBHOOK_PATH:
            return self.answer(404, {"error": f"directives are posted to {WEBHOOK_PATH}"})
        try:
            length = int(self.headers.get("content-length", ""))
        except ValueError:
            return self.answer(411, {"error": "content-length required"})
        if not 0 <= length <= MAX_WEBHOOK_BODY:
            return self.answer(413, {"error": f"at most {MAX_WEBHOOK_BODY} bytes"})
        body = self.rfile.read(length)
        request = self.server.spoke.webhook_request(body, dict(self.headers.items()))
        status, answer = asyncio.run_coroutine_threadsafe(request, self.server.loop).result()
        self.answer(status, answer)
        if status == 200:
            self.server.loop.call_soon_threadsafe(self.server.spoke.answered)

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        log.debug("webhook: %s %s", self.address_string(), format % args)


def host_port(text):
    """"127.0.0.1:8080" or "[::1]:8080" as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


# --- command line ------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A hub spoke in Python: handles `echo` and `sum` directives.")
    p.add_argument("--hub", default="127.0.0.1:50051", help="the hub's gRPC address (default: %(default)s)")
    p.add_argument("--name", default="python-spoke", help="the spoke's unique name (default: %(default)s)")
    p.add_argument("--state-dir", help="where the key and outcomes are kept (default: target/spoke-state/NAME)")
    p.add_argument(
        "--enrollment-token-file",
        default="hub-data/enrollment.token",
        help="the hub's enrollment token, needed only until the spoke has a key (default: %(default)s)",
    )
    p.add_argument("--exit-after", type=int, default=0, metavar="N", help="exit 0 after handling N new directives")
    p.add_argument("--backoff-base", type=float, default=1.0, metavar="SECONDS", help="first reconnect delay (default: 1)")
    p.add_argument("--events-file", help="append one JSON line per directive handled and metric batch pushed")
    p.add_argument(
        "--webhook-listen",
        metavar="HOST:PORT",
        help=f"webhook mode: serve the webhook handler here and register with webhook_url http://HOST:PORT{WEBHOOK_PATH}",
    )
    p.add_argument(
        "--webhook-url",
        metavar="URL",
        help=f"with --webhook-listen: register this URL instead (a proxy in front that forwards to {WEBHOOK_PATH})",
    )
    p.add_argument(
        "--crash-before-ack",
        action="store_true",
        help="for tests: exit 3 right after recording the first new outcome, before acking it, as a crash would",
    )
    args = p.parse_args(argv)
    if args.webhook_url and not args.webhook_listen:
        p.error("--webhook-url needs --webhook-listen")
    if args.webhook_listen:
        try:
            args.webhook_address = host_port(args.webhook_listen)
        except argparse.ArgumentTypeError as e:
            p.error(f"--webhook-listen: {e}")
    args.state_dir = args.state_dir or f"target/spoke-state/{args.name}"
    return args


async def main(args):
    spoke = Spoke(args)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    server = None
    if args.webhook_listen:
        # Listening before the hub learns the URL.
        try:
            server = WebhookServer(args.webhook_address, spoke, loop)
        except OSError as e:
            log.error("cannot listen on %s: %s", args.webhook_listen, e)
            return 2
        threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
        log.info("webhook handler on http://%s%s; the hub posts to %s", args.webhook_listen, WEBHOOK_PATH, spoke.webhook_url)
    try:
        await spoke.run()
    except asyncio.CancelledError:
        log.info("stopped by signal")
    except Done:
        log.info("handled %d directives; exiting", spoke.handled)
    except Fatal as e:
        log.error("the hub refused this spoke: %s", e)
        return 2
    finally:
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
