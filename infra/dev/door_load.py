"""The door under saturation, from outside: 64 keep-alive connections post orders
(one unit of one of 1,000 SKUs each) as fast as they are answered, for SECONDS.
Prints the 202 rate, the 202s' latency percentiles (refusals apart: a 503 is held
by admission control and says nothing of the door's own latency), and the count of
each status. Usage: door_load.py PORT [SECONDS]. Standard library only."""
import asyncio, sys, time, collections

HOST = "127.0.0.1"
PORT = int(sys.argv[1])
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
CONNS = 64

async def client(first, deadline, lat, statuses):
    reader, writer = await asyncio.open_connection(HOST, PORT)
    n = first
    while time.monotonic() < deadline:
        body = ('{"customer_id":"door-cmp","lines":[{"sku":"B-%d","quantity":1,'
                '"unit_price_cents":100}],"payment_token":"tok_ok"}' % ((n * 7919) % 1000)).encode()
        req = (b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
        t = time.monotonic()
        writer.write(req)
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if length:
            await reader.readexactly(length)
        status = int(status_line.split()[1])
        statuses[status] += 1
        if status == 202:
            lat.append(time.monotonic() - t)
        n += CONNS
    writer.close()

async def main():
    lat, statuses = [], collections.Counter()
    start = time.monotonic()
    deadline = start + SECONDS
    await asyncio.gather(*(client(i, deadline, lat, statuses) for i in range(CONNS)))
    took = time.monotonic() - start
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, round((len(lat) - 1) * p))] * 1000 if lat else 0
    print(f"202/s {len(lat)/took:.0f}  202 p50 {q(.5):.1f} ms  p90 {q(.9):.1f} ms  p99 {q(.99):.1f} ms  statuses {dict(statuses)}")

asyncio.run(main())
