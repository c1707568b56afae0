#!/usr/bin/env node
// A hub spoke in Node.js, written from proto/hub/v1/*.proto alone.
//
// It registers with the enrollment token and a key of its own making (kept
// before the call, so a retry after a lost reply proposes the same key and is
// answered as the first call), keeps the key the reply carries, holds the
// WatchDirectives stream open, runs the `echo` and `sum` directive types and
// acks each one over one AckStream (unary Ack on a hub without it),
// heartbeats at the interval the hub sets, pushes one metric batch (and
// resends it once, to show the hub stores it once), and reconnects with
// exponential backoff whenever the stream breaks. See README.md beside it.
//
// With --webhook-listen it takes its directives as signed HTTP POSTs instead
// (webhook mode): it registers with a webhook_url, keeps the webhook secret
// the reply carries beside its key, and answers each verified request with
// the outcome; the stream then carries cancel notices and keepalives only.
//
// Nothing is generated: @grpc/proto-loader reads proto/ when the spoke starts
// (from ../../proto, or the directory in $HUB_PROTO_DIR).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { Webhook } = require('standardwebhooks');

const PROTO_DIR = process.env.HUB_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const VERSION = 'node-spoke/0.1.0';

// Webhook mode: the path the handler answers on, and the largest body it reads.
const WEBHOOK_PATH = '/hub/directives';
const MAX_WEBHOOK_BODY = 4 << 20;

// camelCase field names, enums as their names ('ACK_OUTCOME_COMPLETED'), 64-bit
// integers as strings, unset fields as defaults, and `kind`/`message` naming
// the field set in a oneof.
const LOADER_OPTIONS = { enums: String, longs: String, defaults: true, oneofs: true };

// Codes after which retrying cannot help (spoke.proto: "do not retry without a
// new key"); every other code, and a stream that just ends, means reconnect.
const FATAL = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.ALREADY_EXISTS,
  grpc.status.UNIMPLEMENTED,
]);

// HTTP/2 pings find a dead connection in seconds even when no data flows.
const CHANNEL_OPTIONS = { 'grpc.keepalive_time_ms': 20000, 'grpc.keepalive_timeout_ms': 10000 };

// --- the work: one function per directive type ----------------------------------

/** `echo`: the result is the payload. */
function echo(payload) {
  return payload;
}

/** `sum`: {"numbers": [1, 2.5]} -> {"sum": 3.5}. */
function sum(payload) {
  const numbers = payload.numbers;
  if (!Array.isArray(numbers) || !numbers.every((n) => typeof n === 'number')) {
    throw new Error('payload.numbers must be a list of numbers');
  }
  return { sum: numbers.reduce((a, b) => a + b, 0) };
}

const HANDLERS = { echo, sum };

// --- google.protobuf.Struct <-> plain JSON -----------------------------------------

function toValue(v) {
  if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}

function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

function fromValue(v) {
  switch (v.kind) {
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'listValue': return v.listValue.values.map(fromValue);
    case 'structValue': return fromStruct(v.structValue);
    default: return null; // nullValue, or a Value with nothing set
  }
}

function fromStruct(struct) {
  return Object.fromEntries(Object.entries((struct && struct.fields) || {}).map(([k, v]) => [k, fromValue(v)]));
}

function durationMs(d) {
  return Number(d.seconds) * 1000 + d.nanos / 1e6;
}

// --- plumbing ----------------------------------------------------------------------

/** The hub refused us in a way retrying cannot fix. */
class Fatal extends Error {}

/**
 * gRPC's reconnect backoff: base, x1.6 after each failure, +-20 % jitter,
 * 120 s cap; reset after a successful connection.
 */
class Backoff {
  constructor({ baseMs = 1000, factor = 1.6, jitter = 0.2, capMs = 120000 } = {}) {
    if (!(baseMs > 0 && baseMs <= capMs) || factor < 1 || !(jitter >= 0 && jitter < 1)) {
      throw new Error('backoff: need 0 < base <= cap, factor >= 1, 0 <= jitter < 1');
    }
    Object.assign(this, { baseMs, factor, jitter, capMs, currentMs: baseMs });
  }

  next() {
    const delay = this.currentMs * (1 - this.jitter + 2 * this.jitter * Math.random());
    this.currentMs = Math.min(this.currentMs * this.factor, this.capMs);
    return delay;
  }

  reset() {
    this.currentMs = this.baseMs;
  }
}

/**
 * What survives a restart, in the state directory: the spoke key (spoke.key,
 * mode 0600; until the hub confirmed it, the key proposed at enrollment is
 * enrollment.key), in webhook mode the secret webhook requests are signed
 * with (webhook.secret, mode 0600), the outcome of every directive it
 * finished (outcomes.jsonl) and the metric batch not yet sent
 * (metrics-batch.json).
 */
class State {
  constructor(dir) {
    this.dir = dir;
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.outcomes = new Map();
    const file = path.join(dir, 'outcomes.jsonl');
    if (fs.existsSync(file)) {
      for (const line of fs.readFileSync(file, 'utf8').split('\n').filter(Boolean)) {
        const record = JSON.parse(line);
        this.outcomes.set(record.id, record);
      }
    }
  }

  key() {
    const file = path.join(this.dir, 'spoke.key');
    return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').trim() : null;
  }

  saveKey(key) {
    writeDurably(path.join(this.dir, 'spoke.key'), `${key}\n`, 'w', 0o600);
    fs.rmSync(path.join(this.dir, 'enrollment.key'), { force: true });
  }

  webhookSecret() {
    const file = path.join(this.dir, 'webhook.secret');
    return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').trim() : null;
  }

  saveWebhookSecret(secret) {
    writeDurably(path.join(this.dir, 'webhook.secret'), `${secret}\n`, 'w', 0o600);
  }

  forgetWebhookSecret() {
    fs.rmSync(path.join(this.dir, 'webhook.secret'), { force: true });
  }

  /**
   * The key to propose at enrollment: the one kept from an earlier attempt
   * (its reply may have been lost after the hub stored it), else a new one
   * (32 random bytes as hex), kept before it is ever sent.
   */
  proposedKey() {
    const file = path.join(this.dir, 'enrollment.key');
    if (fs.existsSync(file)) return fs.readFileSync(file, 'utf8').trim();
    const key = crypto.randomBytes(32).toString('hex');
    writeDurably(file, `${key}\n`, 'w', 0o600);
    return key;
  }

  /** Remembers an outcome before it is acked, so a redelivery is answered from here and never runs the work twice. */
  record(record) {
    this.outcomes.set(record.id, record);
    writeDurably(path.join(this.dir, 'outcomes.jsonl'), `${JSON.stringify(record)}\n`, 'a', 0o600);
  }

  /** The demo metric batch, created once and kept (same id) until sent. */
  pendingBatch() {
    const file = path.join(this.dir, 'metrics-batch.json');
    if (fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8'));
    if (fs.existsSync(path.join(this.dir, 'metrics-batch.sent'))) return null;
    const batch = { batchId: crypto.randomUUID(), timeMs: Date.now() };
    fs.writeFileSync(file, JSON.stringify(batch));
    return batch;
  }

  bufferedPoints() {
    return fs.existsSync(path.join(this.dir, 'metrics-batch.json')) ? DEMO_POINTS.length : 0;
  }

  batchSent() {
    fs.writeFileSync(path.join(this.dir, 'metrics-batch.sent'), '');
    fs.unlinkSync(path.join(this.dir, 'metrics-batch.json'));
  }
}

function writeDurably(file, text, flags, mode) {
  const fd = fs.openSync(file, flags, mode);
  try {
    fs.writeSync(fd, text);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

const DEMO_POINTS = [
  ['statistics', 'orders_processed', 42, '1'],
  ['statistics', 'queue_depth', 7, '1'],
  ['compensation', 'payout_total', 1234.5, 'EUR'],
];

/** The demo batch's points, all measured when the batch was made. */
function demoPoints(batch) {
  const time = { seconds: String(Math.floor(batch.timeMs / 1000)), nanos: (batch.timeMs % 1000) * 1e6 };
  return DEMO_POINTS.map(([domain, name, value, unit]) => ({ domain, name, value, unit, labels: { lang: 'node' }, time }));
}

/** An error like the ones grpc-js raises: a status code and its details. */
function grpcError(code, details) {
  return Object.assign(new Error(`${grpc.status[code] ?? code}: ${details}`), { code, details });
}

/**
 * What the hub's refusal of an ack means, from Ack or from AckStream.
 * Cancelled or expired meanwhile (FAILED_PRECONDITION), or not ours
 * (NOT_FOUND): nothing more to do. Anything else (e.g. UNAVAILABLE) is
 * thrown: reconnect, and the hub delivers the directive again.
 */
function ackRefused(directiveId, code, details) {
  if (code !== grpc.status.FAILED_PRECONDITION && code !== grpc.status.NOT_FOUND) throw grpcError(code, details);
  log('WARN', `ack of ${directiveId} refused: ${details}`);
}

/** A unary call as a promise. */
function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function log(level, message) {
  process.stderr.write(`${new Date().toISOString()} ${level} ${message}\n`);
}

/**
 * Acks over one AckStream per connection: each ack is a message on the
 * stream, and the hub answers every message in the order sent, so each answer
 * belongs to the oldest ack not answered yet. An answer with a result means
 * the ack is committed. The acks still unanswered when the stream breaks are
 * kept and sent again first on the next connection's stream (a repeated
 * final ack is answered OK, duplicate). A hub without AckStream answers
 * UNIMPLEMENTED: then this connection acks with unary Ack, the unanswered
 * ones first.
 */
class Acks {
  constructor() {
    this.unanswered = []; // AckRequests sent, oldest first
    this.call = null;
    this.failure = null; // why acking broke on this connection, if it did
    this.drained = []; // resolvers of drain()
  }

  /**
   * Opens this connection's stream and sends the unanswered acks again.
   * onBroken() is called once if the stream breaks or an ack error means
   * reconnecting; `failure` then says why.
   */
  open(client, metadata, onBroken) {
    Object.assign(this, { client, metadata, onBroken, unary: false, failure: null });
    const call = client.ackStream(metadata);
    this.call = call;
    // Once closed, a call is ignored: its unanswered acks go again on the next.
    call.on('data', (answer) => this.call === call && this.answered(answer));
    call.on('error', () => {}); // reported by 'status'
    call.on('status', ({ code, details }) => {
      if (this.call !== call) return;
      if (code === grpc.status.UNIMPLEMENTED) {
        this.fallBackToUnary();
      } else {
        // Only a broken hub ends it, even with OK: we never stop writing.
        this.fail(grpcError(code === grpc.status.OK ? grpc.status.UNAVAILABLE : code, details || 'the hub ended the ack stream'));
      }
    });
    for (const request of this.unanswered) call.write(request);
  }

  close() {
    const call = this.call;
    this.call = null;
    if (call) call.cancel();
    this.settle();
  }

  /** Sends an ack; its answer is matched when it comes. */
  async send(request) {
    if (this.unary) {
      await this.unaryAck(request);
      return;
    }
    this.unanswered.push(request);
    if (!this.failure) this.call.write(request);
  }

  answered(answer) {
    if (this.failure) return;
    const request = this.unanswered[0];
    if (!request || answer.directiveId !== request.directiveId) {
      this.fail(grpcError(grpc.status.INTERNAL, `AckStream answered an ack of '${answer.directiveId}' out of order`));
      return;
    }
    this.unanswered.shift();
    try {
      if (answer.outcome === 'error') ackRefused(request.directiveId, answer.error.code, answer.error.message);
      this.settle();
    } catch (err) {
      this.fail(err);
    }
  }

  async fallBackToUnary() {
    log('INFO', 'the hub has no AckStream: acking with unary Ack');
    this.unary = true;
    try {
      while (this.unanswered.length > 0) {
        await this.unaryAck(this.unanswered[0]);
        this.unanswered.shift();
      }
      this.settle();
    } catch (err) {
      this.fail(err);
    }
  }

  async unaryAck(request) {
    try {
      await unary(this.client, 'ack', request, this.metadata);
    } catch (err) {
      if (typeof err.code !== 'number') throw err;
      ackRefused(request.directiveId, err.code, err.details);
    }
  }

  fail(err) {
    if (this.failure) return;
    this.failure = err;
    this.settle();
    this.onBroken();
  }

  /** Resolves once every ack sent has its answer, or acking broke. */
  drain() {
    return new Promise((resolve) => {
      this.drained.push(resolve);
      this.settle();
    });
  }

  settle() {
    if (this.unanswered.length === 0 || this.failure || !this.call) {
      for (const resolve of this.drained.splice(0)) resolve();
    }
  }
}

// --- the spoke ------------------------------------------------------------------------

class Spoke {
  constructor(options) {
    this.options = options;
    this.state = new State(options.stateDir);
    this.backoff = new Backoff({ baseMs: options.backoffBase * 1000 });
    this.heartbeatMs = 10000; // until the hub says otherwise
    this.keepaliveMs = 15000;
    this.retryAfterMs = 0;
    this.handled = 0;
    this.failedPushes = 0;
    this.stop = new AbortController(); // aborted by SIGTERM or --exit-after
    this.stream = null;
    this.acks = new Acks(); // unanswered acks outlive a connection
    // Webhook mode: the URL the hub posts to, and the handler's server.
    this.webhookUrl = options.webhookUrl || (options.webhookListen ? `http://${options.webhookListen}${WEBHOOK_PATH}` : '');
    this.server = null;
  }

  auth() {
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${this.state.key()}`);
    return metadata;
  }

  /** One JSON line per thing done, for tests (--events-file). */
  report(event, fields) {
    if (this.options.eventsFile) fs.appendFileSync(this.options.eventsFile, `${JSON.stringify({ event, ...fields })}\n`);
  }

  shutdown() {
    this.stop.abort();
    if (this.stream) this.stream.cancel();
    if (this.server) {
      this.server.close();
      this.server.closeAllConnections();
    }
  }

  /** Connect, serve until the stream breaks, back off, repeat. */
  async run(SpokeService) {
    while (!this.stop.signal.aborted) {
      const client = new SpokeService(this.options.hub, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
      try {
        await this.serve(client);
        if (!this.stop.signal.aborted) log('WARN', 'the hub ended the stream');
      } catch (err) {
        if (this.stop.signal.aborted) break;
        if (err instanceof Fatal || typeof err.code !== 'number') throw err; // not a gRPC status: a bug
        if (FATAL.has(err.code)) throw new Fatal(`${grpc.status[err.code]}: ${err.details}`);
        log('WARN', `hub unreachable or stream broken: ${grpc.status[err.code]}: ${err.details}`);
      } finally {
        client.close();
      }
      if (this.stop.signal.aborted) break;
      const delay = Math.max(this.backoff.next(), this.retryAfterMs);
      this.retryAfterMs = 0;
      log('INFO', `reconnecting in ${(delay / 1000).toFixed(2)} s`);
      await sleep(delay, undefined, { signal: this.stop.signal }).catch(() => {});
    }
  }

  async serve(client) {
    await this.register(client);
    this.backoff.reset();
    const heartbeats = this.heartbeats(client);
    try {
      await this.pushDemoBatch(client);
      // In webhook mode the answers carry the outcomes: nothing to ack here,
      // and the stream brings cancel notices and keepalives only.
      if (!this.webhookUrl) {
        // A broken ack stream ends the directive stream too: reconnect.
        this.acks.open(client, this.auth(), () => this.stream && this.stream.cancel());
      }
      await this.watch(client);
    } finally {
      heartbeats.stop();
      this.acks.close();
    }
  }

  /**
   * With the stored key if there is one (updates our registration), else with
   * the enrollment token and the key we propose (creates the spoke; a retry
   * with the same key after a lost reply is answered as the first call was).
   * In webhook mode with the webhook URL: the hub shows the secret it signs
   * with once, when it gives the spoke a webhook (and again to a retried
   * enrollment).
   */
  async register(client) {
    let reply = await this.registerOnce(client, this.webhookUrl);
    if (!this.webhookUrl) {
      this.state.forgetWebhookSecret(); // registering without a webhook URL drops it
    } else if (reply.spoke.deliveryMode !== 'DELIVERY_MODE_WEBHOOK') {
      throw new Fatal('the hub ignored webhook_url: it has no webhook delivery (an older hub?)');
    } else if (!this.state.webhookSecret()) {
      // The reply that showed it was lost. Registering without the webhook
      // drops it; registering with it again makes a new secret.
      log('WARN', 'no webhook secret kept for this registration: asking the hub for a new one');
      await this.registerOnce(client, '');
      reply = await this.registerOnce(client, this.webhookUrl);
      if (!this.state.webhookSecret()) throw new Fatal('the hub gave the webhook no secret');
    }
    log('INFO', `registered as ${reply.spoke.name} (id ${reply.spoke.id})${this.webhookUrl ? `, webhook ${this.webhookUrl}` : ''}`);
    this.report('registered', { spoke_id: reply.spoke.id, new: Boolean(reply.spokeKey) });
    this.applyHints(reply.hints);
  }

  async registerOnce(client, webhookUrl) {
    let token = this.state.key();
    const proposedKey = token ? '' : this.state.proposedKey();
    if (!token) {
      try {
        token = fs.readFileSync(this.options.enrollmentTokenFile, 'utf8').trim();
      } catch (err) {
        throw new Fatal(`no key in ${this.state.dir} and no enrollment token: ${err.message}`);
      }
    }
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${token}`);
    const reply = await unary(client, 'register', {
      name: this.options.name,
      labels: { lang: 'node' },
      capabilities: Object.keys(HANDLERS).map((type) => ({ directiveType: type, version: '1' })),
      version: VERSION,
      proposedKey,
      webhookUrl,
    }, metadata);
    // Kept before the key: a spoke with a key never lost its secret to a
    // crash in between.
    if (reply.webhookSecret) this.state.saveWebhookSecret(reply.webhookSecret);
    // The reply's key, whatever we proposed: an older hub ignores the
    // proposal and makes its own.
    if (reply.spokeKey) this.state.saveKey(reply.spokeKey);
    return reply;
  }

  applyHints(hints) {
    if (!hints) return;
    if (hints.heartbeatInterval) this.heartbeatMs = durationMs(hints.heartbeatInterval);
    if (hints.keepaliveInterval) this.keepaliveMs = durationMs(hints.keepaliveInterval);
    if (hints.retryAfter) this.retryAfterMs = durationMs(hints.retryAfter);
  }

  /** One heartbeat right after connecting, then every interval the hub returns. Returns a handle to stop them. */
  heartbeats(client) {
    let timer = null;
    let stopped = false;
    const beat = async () => {
      try {
        const reply = await unary(client, 'heartbeat', {
          status: 'SPOKE_STATUS_OK',
          statusMessage: 'ready',
          bufferedMetricPoints: String(this.state.bufferedPoints()),
          failedMetricPushes: String(this.failedPushes),
          version: VERSION,
        }, this.auth());
        if (reply.nextInterval) this.heartbeatMs = durationMs(reply.nextInterval);
      } catch (err) {
        // The stream notices a broken hub too and reconnects us.
        log('WARN', `heartbeat failed: ${grpc.status[err.code] ?? err.message}`);
      }
      if (!stopped) timer = setTimeout(beat, this.heartbeatMs);
    };
    beat();
    return { stop: () => { stopped = true; clearTimeout(timer); } };
  }

  /**
   * Pushes one batch, then resends it once: the hub answers DUPLICATE and
   * stores it once, so resending after any failure is always safe.
   */
  async pushDemoBatch(client) {
    const batch = this.state.pendingBatch();
    if (!batch) return;
    const request = { batchId: batch.batchId, points: demoPoints(batch) };
    for (const attempt of ['sent', 'resent']) {
      let reply;
      try {
        reply = await new Promise((resolve, reject) => {
          const call = client.pushMetrics(this.auth(), { deadline: Date.now() + 10000 }, (err, r) => (err ? reject(err) : resolve(r)));
          call.write(request);
          call.end();
        });
      } catch (err) {
        this.failedPushes += 1;
        throw err; // the batch stays in the state dir and goes out again, same id
      }
      const result = reply.batches[0];
      log('INFO', `metric batch ${result.batchId} ${attempt}: ${result.status}, ${result.acceptedPoints} points stored`);
      this.report('metrics', { batch_id: result.batchId, status: result.status, accepted_points: result.acceptedPoints });
    }
    this.state.batchSent();
  }

  /**
   * Reads the stream until it ends. Silence for three keepalive intervals
   * means a dead stream: cancel it and reconnect.
   */
  async watch(client) {
    // Acks resent after a reconnect may complete --exit-after.
    if (await this.exitIfDone()) return;
    if (this.stop.signal.aborted) return;
    if (this.acks.failure) throw this.acks.failure;
    const stream = client.watchDirectives({}, this.auth());
    this.stream = stream;
    let silent = null;
    const arm = () => {
      clearTimeout(silent);
      silent = setTimeout(() => {
        log('WARN', `no keepalive for ${(3 * this.keepaliveMs) / 1000} s; the stream is dead`);
        stream.cancel();
      }, 3 * this.keepaliveMs);
    };
    arm();
    try {
      for await (const message of stream) {
        arm();
        if (message.message === 'directive' && this.webhookUrl) {
          // The hub never does this; the webhook brings it again.
          log('WARN', `directive ${message.directive.id} came on the stream in webhook mode: ignored`);
        } else if (message.message === 'directive') {
          await this.handle(message.directive);
          if (await this.exitIfDone()) break;
        } else if (message.message === 'cancelled') {
          // Handlers here finish at once; a long one would stop now.
          log('INFO', `directive ${message.cancelled.directiveId} cancelled: ${message.cancelled.reason}`);
        } else if (message.message === 'hints') {
          this.applyHints(message.hints);
        }
      }
    } catch (err) {
      if (err.code !== grpc.status.CANCELLED) throw err;
    } finally {
      clearTimeout(silent);
      stream.cancel();
      this.stream = null;
    }
    if (this.acks.failure) throw this.acks.failure;
  }

  /** --exit-after: once N new directives are handled and their acks answered, stop. */
  async exitIfDone() {
    if (!this.options.exitAfter || this.handled < this.options.exitAfter || this.stop.signal.aborted) return false;
    await this.acks.drain();
    if (this.acks.unanswered.length > 0) return false; // acking broke: they go again after reconnecting
    log('INFO', `handled ${this.handled} directives; exiting`);
    this.shutdown();
    return true;
  }

  /** Runs a directive from the stream once and acks the outcome. */
  async handle(directive) {
    const { outcome, firstTime } = this.runOnce(directive.id, directive.type, fromStruct(directive.payload), directive.attempt);
    await this.ack(outcome);
    if (firstTime) this.handled += 1;
  }

  /**
   * The outcome of a directive, and whether it ran now: it runs once and its
   * outcome is recorded; a redelivery gets the recorded outcome again.
   */
  runOnce(id, type, payload, attempt) {
    let outcome = this.state.outcomes.get(id);
    if (outcome) {
      log('INFO', `directive ${id} delivered again (attempt ${attempt}): answering with its recorded outcome`);
      this.report('reacked', { directive_id: id });
      return { outcome, firstTime: false };
    }
    outcome = { id, ...runHandler(type, payload) };
    this.state.record(outcome);
    log('INFO', `directive ${id} (${type}): ${outcome.outcome}`);
    this.report('handled', { directive_id: id, type, outcome: outcome.outcome });
    if (this.options.crashBeforeAck) {
      log('WARN', `--crash-before-ack: dying before acking ${id}`);
      process.exit(3);
    }
    return { outcome, firstTime: true };
  }

  /**
   * One webhook request: its HTTP status and JSON answer. Only a request
   * signed with our secret (within 5 minutes of its timestamp) runs
   * anything; the answer carries the outcome, which the hub applies as an
   * ack.
   */
  webhookRequest(body, headers) {
    const secret = this.state.webhookSecret();
    if (!secret) return { status: 503, answer: { error: 'no webhook secret yet' } };
    try {
      new Webhook(secret).verify(body, headers, { jsonParse: false });
    } catch (err) {
      // WebhookVerificationError, or headers that do not parse
      log('WARN', `webhook request refused: ${err.message}`);
      return { status: 401, answer: { error: 'invalid signature' } };
    }
    let directive;
    try {
      directive = JSON.parse(body.toString('utf8'));
      if (typeof directive.id !== 'string' || typeof directive.type !== 'string') throw new Error('no id or type');
    } catch (err) {
      return { status: 400, answer: { error: `not a directive: ${err.message}` } };
    }
    const { outcome, firstTime } = this.runOnce(directive.id, directive.type, directive.payload || {}, directive.attempt);
    if (firstTime) this.handled += 1;
    return { status: 200, answer: webhookAnswer(outcome) };
  }

  /** A webhook answer was sent: --exit-after may be reached. */
  answered() {
    if (this.options.exitAfter && this.handled >= this.options.exitAfter && !this.stop.signal.aborted) {
      log('INFO', `handled ${this.handled} directives; exiting`);
      this.shutdown();
    }
  }

  /** Sends the ack without waiting for its answer: Acks matches the answers as they come, while the next directive runs. */
  async ack(outcome) {
    const request = { directiveId: outcome.id, outcome: outcome.outcome };
    if ('result' in outcome) request.result = toStruct(outcome.result);
    if ('error' in outcome) request.error = outcome.error.slice(0, 4096);
    await this.acks.send(request);
  }
}

/** The outcome of one directive, as recorded and acked. */
function runHandler(type, payload) {
  const handler = HANDLERS[type];
  if (!handler) {
    // The operator forced a type we never declared: refuse it, per contract.
    return { outcome: 'ACK_OUTCOME_REJECTED', error: `no handler for directive type '${type}'` };
  }
  try {
    return { outcome: 'ACK_OUTCOME_COMPLETED', result: handler(payload) };
  } catch (err) {
    return { outcome: 'ACK_OUTCOME_FAILED', error: `${type}: ${err.message}` };
  }
}

/** A recorded outcome as a webhook answer: {"outcome": "COMPLETED", "result": {...}}, or FAILED/REJECTED with "error". */
function webhookAnswer(outcome) {
  const answer = { outcome: outcome.outcome.replace(/^ACK_OUTCOME_/, '') };
  if ('result' in outcome) answer.result = outcome.result;
  if ('error' in outcome) answer.error = outcome.error.slice(0, 4096);
  return answer;
}

// --- webhook mode: the HTTP handler -------------------------------------------------

/** Serves POST /hub/directives: each request is handled like a directive from the stream. */
function webhookServer(spoke) {
  return http.createServer((req, res) => {
    const reply = (status, answer) => {
      const data = JSON.stringify(answer);
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
      res.end(data);
    };
    if (new URL(req.url, 'http://spoke').pathname !== WEBHOOK_PATH) {
      reply(404, { error: `directives are posted to ${WEBHOOK_PATH}` });
      return;
    }
    if (req.method !== 'POST') {
      reply(405, { error: 'POST only' });
      return;
    }
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_WEBHOOK_BODY) chunks.push(chunk);
    });
    req.on('end', () => {
      if (size > MAX_WEBHOOK_BODY) {
        reply(413, { error: `at most ${MAX_WEBHOOK_BODY} bytes` });
        return;
      }
      const { status, answer } = spoke.webhookRequest(Buffer.concat(chunks), req.headers);
      if (status === 200) res.on('finish', () => spoke.answered());
      reply(status, answer);
    });
  });
}

/** "127.0.0.1:8080" or "[::1]:8080" as { host, port }. */
function hostPort(text) {
  const match = /^(.*):(\d+)$/.exec(text);
  if (!match) throw new Error(`--webhook-listen: '${text}': expected HOST:PORT`);
  return { host: match[1].replace(/^\[(.*)\]$/, '$1'), port: Number(match[2]) };
}

// --- command line ------------------------------------------------------------------

const USAGE = `usage: node spoke.js [--hub ADDR] [--name NAME] [--state-dir DIR]
                     [--enrollment-token-file PATH] [--exit-after N]
                     [--backoff-base SECONDS] [--events-file PATH]
                     [--webhook-listen HOST:PORT [--webhook-url URL]]

A hub spoke in Node.js: handles \`echo\` and \`sum\` directives.

  --hub ADDR                    the hub's gRPC address (default: 127.0.0.1:50051)
  --name NAME                   the spoke's unique name (default: node-spoke)
  --state-dir DIR               where the key and outcomes are kept (default: target/spoke-state/NAME)
  --enrollment-token-file PATH  the hub's enrollment token, needed only until the spoke has a key
                                (default: hub-data/enrollment.token)
  --exit-after N                exit 0 after handling N new directives
  --backoff-base SECONDS        first reconnect delay (default: 1)
  --events-file PATH            append one JSON line per directive handled and metric batch pushed
  --webhook-listen HOST:PORT    webhook mode: serve the webhook handler here and register with
                                webhook_url http://HOST:PORT/hub/directives
  --webhook-url URL             with --webhook-listen: register this URL instead (a proxy in front
                                that forwards to /hub/directives)
  --crash-before-ack            for tests: exit 3 right after recording the first new outcome,
                                before acking it, as a crash would`;

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      hub: { type: 'string', default: '127.0.0.1:50051' },
      name: { type: 'string', default: 'node-spoke' },
      'state-dir': { type: 'string' },
      'enrollment-token-file': { type: 'string', default: 'hub-data/enrollment.token' },
      'exit-after': { type: 'string', default: '0' },
      'backoff-base': { type: 'string', default: '1' },
      'events-file': { type: 'string' },
      'crash-before-ack': { type: 'boolean', default: false },
      'webhook-listen': { type: 'string' },
      'webhook-url': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const exitAfter = Number(values['exit-after']);
  const backoffBase = Number(values['backoff-base']);
  if (!Number.isInteger(exitAfter) || exitAfter < 0) throw new Error('--exit-after: must be a whole number');
  if (!(backoffBase > 0)) throw new Error('--backoff-base: must be a positive number of seconds');
  if (values['webhook-url'] && !values['webhook-listen']) throw new Error('--webhook-url needs --webhook-listen');
  const webhookAddress = values['webhook-listen'] ? hostPort(values['webhook-listen']) : null;
  return {
    hub: values.hub,
    name: values.name,
    stateDir: values['state-dir'] || path.join('target', 'spoke-state', values.name),
    enrollmentTokenFile: values['enrollment-token-file'],
    exitAfter,
    backoffBase,
    eventsFile: values['events-file'],
    crashBeforeAck: values['crash-before-ack'],
    webhookListen: values['webhook-listen'],
    webhookAddress,
    webhookUrl: values['webhook-url'],
  };
}

async function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    console.error(`spoke.js: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  const definition = protoLoader.loadSync('hub/v1/spoke.proto', { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
  const { SpokeService } = grpc.loadPackageDefinition(definition).hub.v1;
  const spoke = new Spoke(options);
  if (options.webhookAddress) {
    // Listening before the hub learns the URL.
    const server = webhookServer(spoke);
    try {
      await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(options.webhookAddress.port, options.webhookAddress.host, resolve);
      });
    } catch (err) {
      log('ERROR', `cannot listen on ${options.webhookListen}: ${err.message}`);
      return 2;
    }
    spoke.server = server;
    log('INFO', `webhook handler on http://${options.webhookListen}${WEBHOOK_PATH}; the hub posts to ${spoke.webhookUrl}`);
  }
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      log('INFO', 'stopped by signal');
      spoke.shutdown();
    });
  }
  try {
    await spoke.run(SpokeService);
  } catch (err) {
    if (!(err instanceof Fatal)) throw err;
    log('ERROR', `the hub refused this spoke: ${err.message}`);
    return 2;
  } finally {
    spoke.shutdown();
  }
  return 0;
}

main().then((code) => { process.exitCode = code; });
