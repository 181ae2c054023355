#!/usr/bin/env python3
"""Services of the distributed deployment killed at saturation, and how long until
each of their consumers reads again.

Usage: infra/dev/kill_at_saturation.py [--stop] [SERVICE ... | broker]
       (default: all eight services; --stop sends SIGTERM instead of SIGKILL;
       broker stops the broker for 5 s and starts it again, and watches every
       service's consumers)

Starts the distributed deployment (infra/dev/distributed.sh, the release binary,
ports 18600-18608, its own broker on 127.0.0.1:19098, databases orderline_kill_*),
restocks 1,000 SKUs, and then, for each SERVICE in turn, on the state the rounds
before it left: saturates the gateway with orders (infra/dev/door_load.py, 64
connections, 40 s; the door refuses what is past its backlog bound with 503), sends
the service SIGKILL 15 s in, starts it again at once, and from the kill on watches
its consumers' stored Kafka offsets (its database's `kafka_offsets`). A consumer is
reading again when its offsets move past where the fault left them (the time is
counted from the signal, or from the broker's return); one whose offsets
do not move while the service's lag gauges (`/metrics`) are all 0 had nothing new to
read. After the load, every order it accepted must settle (confirmed, or cancelled
for a reason of its own: none for `payment_timeout`) before the next round.

Prints one line per consumer and exits 1 when any consumer is not reading again
within 30 s, or an order does not settle. Needs the release binary
(`cargo build --release`; ORDERLINE_BIN names another: the suite's short profile
runs `broker order` with the test build), PostgreSQL (infra/dev/postgres.sh) and the broker's
build (infra/kafka/broker.sh install). Standard library only. Everything it
started and created is removed at the end."""
import json, os, random, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = 18600
SERVICES = ["order", "inventory", "payment", "shipping", "customer", "catalog", "cart", "notification"]
PORT = {name: BASE + 1 + i for i, name in enumerate(SERVICES)}
RUN = os.path.join(ROOT, "target", "kill-at-saturation")
ENV = dict(
    os.environ,
    ORDERLINE_BIN=os.environ.get("ORDERLINE_BIN", os.path.join(ROOT, "target", "release", "orderline")),
    ORDERLINE_PORT_BASE=str(BASE),
    ORDERLINE_RUN_DIR=RUN,
    ORDERLINE_DATABASE_PREFIX="orderline_kill",
    ORDERLINE_TOPIC_PREFIX="kill%d" % random.randrange(1_000_000),
    ORDERLINE_BROKER="127.0.0.1:19098",
    ORDERLINE_BROKER_DIR=os.path.join(RUN, "broker"),
    ORDERLINE_KAFKA_BROKERS="127.0.0.1:19098",
    ORDERLINE_AUTH="off",
)
LOAD_SECONDS, KILL_AT, WITHIN, WATCH, BROKER_AWAY = 40, 15, 30.0, 90.0, 5
SKUS = 1000


def sh(*args, check=True):
    return subprocess.run(args, cwd=ROOT, env=ENV, check=check, capture_output=True, text=True)


def psql(database, sql):
    out = sh("psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-At", "-c", sql, check=False)
    return out.stdout.strip()


def http(method, port, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        "http://127.0.0.1:%d%s" % (port, path), data=data, method=method,
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def offsets(service):
    rows = psql("orderline_kill_" + service,
                "SELECT consumer, SUM(next_offset) FROM kafka_offsets GROUP BY consumer")
    return {c: int(v) for c, v in (line.split("|") for line in rows.splitlines() if "|" in line)}


def lag_is_zero(service):
    status, text = http("GET", PORT[service], "/metrics")
    if status != 200:
        return False
    gauges = [line for line in text.splitlines()
              if line.startswith("orderline_") and "_lag" in line.split("{")[0].split(" ")[0]]
    # A consumer's gauge is left out when its lag could not be read: not a 0.
    consumers = [g for g in gauges if not g.startswith("orderline_relay_lag")]
    return bool(consumers) and all(float(line.rsplit(" ", 1)[1]) == 0 for line in gauges)


def pid(service):
    with open(os.path.join(RUN, service + ".pid")) as f:
        return int(f.read().strip())


def orders_accepted():
    """The orders of the order service's read model, counted by status."""
    rows = psql("orderline_kill_order", "SELECT status, COUNT(*) FROM orders GROUP BY status")
    return {s: int(n) for s, n in (line.split("|") for line in rows.splitlines() if "|" in line)}


def settle(deadline_s=300):
    """Wait until no order is pending; the counts by status and by cancel reason."""
    start = time.monotonic()
    while True:
        counts = orders_accepted()
        unsettled = sum(n for s, n in counts.items() if s not in ("confirmed", "cancelled", "shipped", "delivered"))
        # Caught up too, so an order placed but not yet projected is not missed.
        if (unsettled == 0 and lag_is_zero("order")) or time.monotonic() - start > deadline_s:
            reasons = psql("orderline_kill_order",
                           "SELECT COALESCE(cancel_reason, '-'), COUNT(*) FROM orders "
                           "WHERE status = 'cancelled' GROUP BY 1")
            return counts, unsettled, reasons.replace("\n", ", ")
        time.sleep(1)


def round_for(target, signal):
    """One round: load, the fault at KILL_AT, and each consumer watched until it reads."""
    load = subprocess.Popen([sys.executable, os.path.join(ROOT, "infra", "dev", "door_load.py"),
                             str(BASE), str(LOAD_SECONDS)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(KILL_AT)
    watched = SERVICES if target == "broker" else [target]
    if target == "broker":
        sh("infra/kafka/broker.sh", "stop")
        fault = time.monotonic()
        before = {(s, c): v for s in watched for c, v in offsets(s).items()}
        time.sleep(BROKER_AWAY)
        sh("infra/kafka/broker.sh", "ensure")
        what = "the broker stopped for %d s at saturation and started again" % BROKER_AWAY
        since = "its return"
    else:
        victim = pid(target)
        os.kill(victim, signal)
        fault = time.monotonic()
        while True:
            try:
                os.kill(victim, 0)
                time.sleep(0.02)
            except ProcessLookupError:
                break
        before = {(target, c): v for c, v in offsets(target).items()}
        sh("infra/dev/distributed.sh", "up")
        what = "%s %s at saturation; healthy again %.1f s after" % (
            target, "killed (SIGKILL)" if signal == 9 else "stopped (SIGTERM)", time.monotonic() - fault)
        since = "the %s" % ("kill" if signal == 9 else "signal")
    back = time.monotonic()
    reading, idle = {}, set()
    while time.monotonic() - back < WATCH and len(reading) + len(idle) < len(before):
        elapsed = time.monotonic() - fault
        for service in watched:
            for consumer, value in offsets(service).items():
                key = (service, consumer)
                if key in before and key not in reading and value > before[key]:
                    reading[key] = elapsed
        if time.monotonic() - back > WITHIN:
            idle = {k for k in before if k not in reading and lag_is_zero(k[0])}
        time.sleep(0.25)
    out, _ = load.communicate()
    failed = False
    print(what)
    if not before:
        print("  no consumer of it has stored an offset yet: nothing was published to its topics")
    for key in sorted(before):
        name = key[1] if target != "broker" else "%s/%s" % key
        if key in reading:
            late = reading[key] - (back - fault if target == "broker" else 0)
            ok = late <= WITHIN
            print("  %-28s reading again %.1f s after %s%s" % (name, late, since, "" if ok else "  (over %d s)" % WITHIN))
        elif key in idle:
            ok = True
            print("  %-28s nothing new to read (the service's lag is 0)" % name)
        else:
            ok = False
            print("  %-28s NOT reading within %d s" % (name, WATCH))
        failed |= not ok
    print("  load: " + " ".join(out.split()))
    counts, unsettled, reasons = settle()
    print("  orders so far: %s; unsettled %d; cancelled by reason: %s" % (counts, unsettled, reasons or "none"))
    failed |= unsettled > 0 or "payment_timeout" in reasons
    return failed


def main():
    args = sys.argv[1:]
    signal = 15 if "--stop" in args else 9
    targets = [a for a in args if a != "--stop"] or SERVICES
    unknown = [t for t in targets if t not in SERVICES + ["broker"]]
    if unknown:
        sys.exit("unknown: %s (a service: %s; or broker)" % (unknown, ", ".join(SERVICES)))
    failed = False
    try:
        sh("infra/dev/distributed.sh", "up")
        for n in range(SKUS):
            status, body = http("POST", BASE, "/v1/inventory/B-%d/restock" % n, {"quantity": 1_000_000})
            if status != 202:
                sys.exit("restock: %d %s" % (status, body))
        for target in targets:
            failed |= round_for(target, signal)
    finally:
        sh("infra/dev/distributed.sh", "down", check=False)
        sh("infra/kafka/broker.sh", "stop", check=False)
        for service in SERVICES:
            psql("postgres", "DROP DATABASE IF EXISTS orderline_kill_%s WITH (FORCE)" % service)
        sh("rm", "-rf", RUN, check=False)
    print("FAILED: see above" if failed else "every consumer read again within %d s of each fault" % WITHIN)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
