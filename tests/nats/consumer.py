"""A consumer of the hub's events that uses only NATS tooling: the official
Python client (nats-py) as a JetStream pull consumer on `hub.events.>`.

Prints one line per message, in stream order:

    <event sequence> <subject> <CloudEvents type>

e.g. `1 hub.events.spoke.registered hub.v1.spoke.registered`. The event
sequence is the message's `Nats-Msg-Id` header; a message whose envelope
`id` disagrees with it is an error. The hub's `hub/tests/nats.rs` runs it
and compares its lines with what its own consumer saw.

    python consumer.py --server nats://127.0.0.1:4222 --count 40
"""

import argparse
import asyncio
import json
import sys

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


async def consume(server, stream, subjects, count, timeout):
    nc = await nats.connect(server, connect_timeout=5)
    try:
        js = nc.jetstream()
        # An ephemeral consumer that starts at the stream's first message.
        sub = await js.pull_subscribe(
            subjects,
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT
            ),
        )
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while count is None or seen < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise SystemExit(f"consumer: {seen} messages within {timeout} s, wanted {count}")
            batch = 64 if count is None else min(64, count - seen)
            try:
                msgs = await sub.fetch(batch, timeout=min(left, 2))
            except nats.errors.TimeoutError:
                if count is None:
                    return
                continue
            for msg in msgs:
                envelope = json.loads(msg.data)
                msg_id = (msg.headers or {}).get("Nats-Msg-Id")
                if msg_id != envelope["id"]:
                    raise SystemExit(
                        f"consumer: Nats-Msg-Id {msg_id!r} but envelope id {envelope['id']!r}"
                    )
                print(f"{envelope['id']} {msg.subject} {envelope['type']}", flush=True)
                await msg.ack()
                seen += 1
    finally:
        await nc.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="HUB_EVENTS")
    parser.add_argument("--subjects", default="hub.events.>")
    parser.add_argument(
        "--count", type=int, help="stop after this many messages [default: when none comes for 2 s]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for --count")
    args = parser.parse_args()
    asyncio.run(consume(args.server, args.stream, args.subjects, args.count, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
