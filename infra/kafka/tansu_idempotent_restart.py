#!/usr/bin/env python3
"""The minimal reproduction of ADR 22: an idempotent producer through a restart of
the development broker (Tansu 0.6.0, SQLite storage).

Usage: infra/kafka/tansu_idempotent_restart.py idempotent|plain

Starts a broker of its own (infra/kafka/broker.sh, 127.0.0.1:19099, a scratch
directory), creates a topic of 3 partitions, produces to it as fast as librdkafka
takes (`acks=all`, `linger.ms=2`, unlimited retries), stops the broker after 8 s
(SIGTERM), starts it again on its state 5 s later, and counts what is delivered in
the 20 s after. `idempotent`: `enable.idempotence`, five requests in flight (what the
relays used); `plain`: not idempotent, one request in flight (what they use now).

2026-11-28: idempotent, 0 delivered after the restart and one panic in the broker's
log (`tansu-storage-0.6.0/src/lite.rs:503:13: more or less than one row`, in
`idempotent_message_check`), after which the broker answers every request with an
error; plain, 30,094 delivered and no panic.

Needs the broker's build (infra/kafka/broker.sh install) and the Python client that
links librdkafka (`pip install confluent-kafka`)."""
import os, subprocess, sys, tempfile, threading, time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADDRESS = "127.0.0.1:19099"


def main():
    if sys.argv[1:] not in (["idempotent"], ["plain"]):
        sys.exit(__doc__)
    idempotent = sys.argv[1] == "idempotent"
    scratch = tempfile.mkdtemp(prefix="tansu-repro-")
    env = dict(os.environ, ORDERLINE_BROKER=ADDRESS, ORDERLINE_BROKER_DIR=scratch)

    def broker(command):
        subprocess.run([os.path.join(ROOT, "infra", "kafka", "broker.sh"), command],
                       env=env, check=True, capture_output=True)

    broker("ensure")
    try:
        admin = AdminClient({"bootstrap.servers": ADDRESS})
        admin.create_topics([NewTopic("t", 3, 1)])["t"].result()
        producer = Producer({
            "bootstrap.servers": ADDRESS, "enable.idempotence": idempotent, "acks": "all",
            "max.in.flight.requests.per.connection": 5 if idempotent else 1,
            "message.timeout.ms": 0, "linger.ms": 2, "log_level": 0})
        delivered = [0]

        def on_delivery(error, _message):
            if error is None:
                delivered[0] += 1

        until = time.time() + 40

        def produce():
            n = 0
            while time.time() < until:
                try:
                    producer.produce("t", key=str(n % 50), value=b"x" * 200, callback=on_delivery)
                    n += 1
                except BufferError:
                    pass
                producer.poll(0.001)

        threading.Thread(target=produce, daemon=True).start()
        time.sleep(8)
        print("delivered before the restart:", delivered[0])
        broker("stop")
        time.sleep(5)
        broker("ensure")
        back = delivered[0]
        time.sleep(20)
        print("delivered in the 20 s after it:", delivered[0] - back)
        with open(os.path.join(scratch, "tansu.log"), errors="replace") as log:
            panics = [line for line in log if "panicked at" in line]
        print("panics in the broker's log:", len(panics), *panics[:1])
    finally:
        broker("stop")
        subprocess.run(["rm", "-rf", scratch])


if __name__ == "__main__":
    main()
