#!/usr/bin/env python3
"""P6 driver (see bench/p6.sh): live output and input latency through the
real runner and API, and the API's message ingest rate.

1. A `conversation` session on the local backend whose worker is
   bench/p6_fake_claude.py. An SSE client follows
   /sessions/{id}/messages/stream; each input asks the fake worker to print
   stamped lines, and the client measures line printed -> SSE event received
   (the runner tails the worker's output, posts it, the API streams it).
2. Input -> worker stdin: from the start of POST /sessions/{id}/input to the
   fake worker reading the message (its `bench_input` line, read_ns).
3. Ingest: concurrent clients POST /sessions/{id}/messages in batches of
   500 lines for a few seconds; lines stored per second.
All clocks are this machine's wall clock."""
import argparse
import http.client
import json
import threading
import time
import uuid
from urllib.parse import urlparse


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))] if xs else float("nan")


class Api:
    def __init__(self, base):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)


def follow(base, sid, sink, stop):
    u = urlparse(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("GET", f"/sessions/{sid}/messages/stream", headers={"Accept": "text/event-stream"})
    r = c.getresponse()
    while not stop.is_set():
        line = r.readline()
        if not line:
            return
        if line.startswith(b"data:"):
            now = time.time_ns()
            m = json.loads(line[5:])["message"]
            sink(now, m)


def wait_state(api, sid, state, limit=30):
    t = time.time()
    while time.time() - t < limit:
        _, s = api.call("GET", f"/sessions/{sid}")
        if s["runtime_metadata"].get("worker", {}).get("state") == state:
            return s
        time.sleep(0.05)
    raise SystemExit(f"worker never became {state}")


def live(base, inputs, lines, every_ms):
    api = Api(base)
    st, s = api.call("POST", "/sessions/", {
        "agent_id": str(uuid.uuid4()), "session_type": "task", "runtime_backend": "local",
        "worker": {"prompt": "emit 0 every 0", "mode": "conversation"}})
    assert st == 201, (st, s)
    sid = s["id"]
    wait_state(api, sid, "idle")
    out_lat, read_at, lock = [], {}, threading.Lock()

    def sink(now, m):
        with lock:
            if m.get("type") == "assistant" and "bench_t" in m:
                out_lat.append((now - m["bench_t"]) / 1e6)
            elif m.get("type") == "bench_input":
                read_at[m["uuid"]] = m["read_ns"]

    stop = threading.Event()
    th = threading.Thread(target=follow, args=(base, sid, sink, stop), daemon=True)
    th.start()
    time.sleep(0.3)
    in_lat = []
    for k in range(inputs):
        t0 = time.time_ns()
        st, a = api.call("POST", f"/sessions/{sid}/input", {"text": f"emit {lines} every {every_ms}"})
        assert st == 202, (st, a)
        deadline = time.time() + 30
        while time.time() < deadline:
            with lock:
                got = read_at.get(a["id"])
            if got:
                in_lat.append((got - t0) / 1e6)
                break
            time.sleep(0.001)
        # Let the turn finish before the next input.
        want = (k + 1) * lines
        while time.time() < deadline:
            with lock:
                if len(out_lat) >= want:
                    break
            time.sleep(0.01)
    stop.set()
    return out_lat, in_lat


def ingest(base, clients, seconds, batch):
    line = {"type": "assistant", "message": {"role": "assistant",
            "content": [{"type": "text", "text": "x" * 100}]}}
    body = [line] * batch
    counts = [0] * clients
    sids = []
    api = Api(base)
    for _ in range(clients):
        st, s = api.call("POST", "/sessions/", {"agent_id": str(uuid.uuid4()), "session_type": "bench"})
        assert st == 201, (st, s)
        sids.append(s["id"])
    start = time.time() + 0.2
    end = start + seconds

    def run(i):
        a = Api(base)
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < end:
            st, _ = a.call("POST", f"/sessions/{sids[i]}/messages", body)
            assert st == 200, st
            counts[i] += batch

    ts = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--inputs", type=int, default=20)
    ap.add_argument("--lines", type=int, default=50)
    ap.add_argument("--every-ms", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()
    out_lat, in_lat = live(a.api, a.inputs, a.lines, a.every_ms)
    print(f"stdout line -> SSE client: n={len(out_lat)} p50={pct(out_lat, 50):.1f} ms "
          f"p99={pct(out_lat, 99):.1f} ms max={max(out_lat):.1f} ms (target p99 <= 50 ms)")
    print(f"input -> worker stdin:     n={len(in_lat)} p50={pct(in_lat, 50):.1f} ms "
          f"p99={pct(in_lat, 99):.1f} ms max={max(in_lat):.1f} ms")
    rate = ingest(a.api, a.clients, a.seconds, a.batch)
    print(f"message ingest: {rate:,.0f} lines/s ({a.clients} clients, batches of {a.batch}) "
          f"(target >= 20,000 lines/s)")
    # For bench/run.sh.
    print(f"RESULT P6 line_to_sse p99_ms={pct(out_lat, 99):.1f} target<=50 p50_ms={pct(out_lat, 50):.1f}")
    print(f"RESULT P6 input_to_stdin p99_ms={pct(in_lat, 99):.1f} p50_ms={pct(in_lat, 50):.1f}")
    print(f"RESULT P6 ingest lines_per_s={rate:.0f} target>=20000")


if __name__ == "__main__":
    main()
