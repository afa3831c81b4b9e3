#!/usr/bin/env python3
"""Does the broker give a SIGKILLed consumer's partitions to the rest of its group?

A minimal reproduction, without siteflow: three librdkafka consumers (confluent-kafka) in one
group over a topic of three partitions; once each owns one partition, one is killed with
SIGKILL (no LeaveGroup). A Kafka broker expires the dead member after `session.timeout.ms` and
rebalances, so the two survivors own all three partitions a few seconds later. The script says
what happened and exits 0 if they do, 1 if not (docs/scale-out.md, "Known limits", has what
Tansu 0.6.0 did).

Usage:
  python3 scripts/repro-killed-member.py [--brokers HOST:PORT] [--static] [--assignor NAME]
Without --brokers it starts `tansu broker` (memory storage) on a free port and creates the
topic with the `tansu` CLI. Needs `pip install confluent-kafka`.
  --static           members use static membership (group.instance.id)
  --assignor NAME    partition.assignment.strategy (default: range,roundrobin)
  --wait SECONDS     how long to wait for the survivors after the kill (default 60)
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

SESSION_TIMEOUT_MS = 6000
TOPIC = "repro-killed-member"
PARTITIONS = 3


def member(brokers, group, n, static, assignor):
    """One consumer: prints each assignment change as a JSON line, polls until killed."""
    from confluent_kafka import Consumer

    conf = {
        "bootstrap.servers": brokers,
        "group.id": group,
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": assignor,
        "enable.auto.commit": False,
    }
    if static:
        conf["group.instance.id"] = f"member-{n}"
    owned = set()

    def say():
        print(json.dumps({"member": n, "t": round(time.time(), 3), "owns": sorted(owned)}), flush=True)

    def on_assign(consumer, partitions):
        if assignor == "cooperative-sticky":
            owned.update(p.partition for p in partitions)
        else:
            owned.clear()
            owned.update(p.partition for p in partitions)
        say()

    def on_revoke(consumer, partitions):
        owned.difference_update(p.partition for p in partitions)
        say()

    c = Consumer(conf)
    c.subscribe([TOPIC], on_assign=on_assign, on_revoke=on_revoke)
    while True:
        c.poll(0.2)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--brokers")
    ap.add_argument("--static", action="store_true")
    ap.add_argument("--assignor", default="range,roundrobin")
    ap.add_argument("--wait", type=float, default=60)
    ap.add_argument("--member", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.member is not None:
        return member(args.brokers, args.group, args.member, args.static, args.assignor)

    work = tempfile.mkdtemp(prefix="repro-killed-member.")
    broker = None
    brokers = args.brokers
    if not brokers:
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        broker = subprocess.Popen(
            ["tansu", "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=open(os.path.join(work, "tansu.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        brokers = f"127.0.0.1:{port}"
        subprocess.run(["tansu", "topic", "create", TOPIC, "--broker", url, "--partitions", str(PARTITIONS)], check=True,
                       stdout=subprocess.DEVNULL)
    group = f"repro-{int(time.time())}"
    extra = (["--static"] if args.static else []) + ["--assignor", args.assignor]
    members = []
    for n in range(3):
        out = open(os.path.join(work, f"member-{n}.jsonl"), "w")
        members.append(subprocess.Popen([sys.executable, __file__, "--brokers", brokers, "--group", group, "--member", str(n)] + extra,
                                        stdout=out, stderr=subprocess.STDOUT))

    def owns():
        """Each member's latest assignment."""
        latest = {}
        for n in range(3):
            for line in open(os.path.join(work, f"member-{n}.jsonl")):
                if line.startswith("{"):
                    latest[n] = json.loads(line)["owns"]
        return latest

    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            o = owns()
            if len(o) == 3 and all(len(p) == 1 for p in o.values()):
                break
            time.sleep(0.5)
        else:
            print(f"the three members never settled one partition each: {owns()} (logs in {work})")
            return 2
        print(f"settled: {owns()}")
        os.kill(members[0].pid, signal.SIGKILL)
        killed = time.time()
        print(f"member 0 killed with SIGKILL; session.timeout.ms={SESSION_TIMEOUT_MS}, waiting up to {args.wait:.0f} s")
        while time.time() < killed + args.wait:
            o = owns()
            survivors = sorted(p for n in (1, 2) for p in o.get(n, []))
            if survivors == list(range(PARTITIONS)):
                print(f"after {time.time() - killed:.1f} s the survivors own every partition: {o[1]} and {o[2]}")
                return 0
            time.sleep(0.5)
        o = owns()
        print(f"after {args.wait:.0f} s the survivors own {o.get(1)} and {o.get(2)}: partition(s) "
              f"{sorted(set(range(PARTITIONS)) - set(o.get(1, []) + o.get(2, [])))} unassigned (logs in {work})")
        return 1
    finally:
        for m in members:
            m.kill()
        if broker:
            broker.kill()


if __name__ == "__main__":
    sys.exit(main())
