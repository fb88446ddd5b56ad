#!/usr/bin/env python3
"""P4 driver: event -> local worker spawned latency, and runner memory with
many workers. Standard library only.

Latency is measured from the `session.created` event's `occurred_at` (the
commit, as the API records it) to the worker's `started_at` in the pidfile
the runner writes right after spawning it. In `redis` mode the driver plays
the relay that main is building: right after the create it reads the event
back and publishes it on the runner's channel; in `feed` mode the runner
only has its `/events` tail.
"""
import argparse, json, os, socket, statistics, sys, time, urllib.request, uuid
from datetime import datetime


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


class Redis:
    """Just enough RESP to PUBLISH."""
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port))
        self.f = self.s.makefile("rb")

    def publish(self, channel, message):
        parts = [b"PUBLISH", channel.encode(), message.encode()]
        cmd = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.s.sendall(cmd)
        return self.f.readline()


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--runner-pid", type=int, required=True)
    ap.add_argument("--mode", choices=["redis", "feed"], required=True)
    ap.add_argument("--channel", default="events:session")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--hold", type=int, default=0, help="then hold this many workers and measure RSS")
    args = ap.parse_args()
    red = Redis("127.0.0.1", 6379) if args.mode == "redis" else None
    rss_idle = rss_kib(args.runner_pid)

    published = {}

    def create():
        s = http("POST", f"{args.api}/sessions/", {
            "agent_id": str(uuid.uuid4()), "session_type": "task",
            "runtime_backend": "local", "worker": {"prompt": "p4 bench"}})
        if red:
            ev = http("GET", f"{args.api}/sessions/{s['id']}/events?limit=1")[0]
            ev.pop("metadata", None)
            published[s["id"]] = time.time()
            red.publish(args.channel, json.dumps(ev))
        return s["id"]

    def wait_spawned(sid, limit=10.0):
        path = os.path.join(args.root, sid, "runner", "worker.json")
        end = time.time() + limit
        while time.time() < end:
            try:
                with open(path) as f:
                    return json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.0005)
        raise SystemExit(f"worker for {sid} not spawned within {limit}s")

    lat, own = [], []
    for _ in range(args.sessions):
        sid = create()
        pf = wait_spawned(sid)
        ev = http("GET", f"{args.api}/sessions/{sid}/events?limit=1")[0]
        lat.append((ts(pf["started_at"]) - ts(ev["occurred_at"])) * 1000)
        if sid in published:
            own.append((ts(pf["started_at"]) - published[sid]) * 1000)
    out = {"mode": args.mode, "sessions": len(lat),
           "p50_ms": round(statistics.median(lat), 2), "p90_ms": round(pct(lat, 90), 2),
           "p99_ms": round(pct(lat, 99), 2), "max_ms": round(max(lat), 2),
           "rss_idle_kib": rss_idle}
    if own:
        # The runner's own share: from the Redis message to the spawn.
        out.update({"from_publish_p50_ms": round(statistics.median(own), 2),
                    "from_publish_p99_ms": round(pct(own, 99), 2)})
    if args.hold:
        # Fire the rest without waiting for each, then wait for them all.
        ids = [create() for _ in range(max(0, args.hold - len(lat)))]
        for sid in ids:
            wait_spawned(sid, 60)
        time.sleep(3)  # let the first resync over all of them pass
        t0, c0 = time.time(), cpu_ticks(args.runner_pid)
        time.sleep(10)
        cpu = (cpu_ticks(args.runner_pid) - c0) / os.sysconf("SC_CLK_TCK") / (time.time() - t0)
        workers = sum(1 for d in os.listdir(args.root)
                      if os.path.exists(os.path.join(args.root, d, "runner", "worker.json")))
        out.update({"workers": workers, "rss_kib": rss_kib(args.runner_pid),
                    "runner_cpu_cores": round(cpu, 3)})
    print(json.dumps(out))
    # For bench/run.sh; the wake-up by Redis is the path P4 is about, the
    # feed long-poll its fallback (no target).
    target = " target<=30" if args.mode == "redis" else ""
    print(f"RESULT P4 spawn_{args.mode} p99_ms={out['p99_ms']}{target} p50_ms={out['p50_ms']}")
    if "rss_kib" in out:
        print(f"RESULT P4 runner_rss mib={out['rss_kib'] / 1024:.1f} target<=100 "
              f"workers={out['workers']}")


if __name__ == "__main__":
    sys.exit(main())
