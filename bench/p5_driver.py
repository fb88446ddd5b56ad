#!/usr/bin/env python3
"""P5 driver (see bench/p5.sh): reads through the HTTP API at 1 M sessions /
10 M events.

1. Every query of bench/p5_queries.txt, REPEAT times each on one keep-alive
   connection: the first page and, when the answer links one, the next page
   (the `Link: rel="next"` cursor followed as given). p50/p99 per query.
2. Feed catch-up: `GET /events?after=…&limit=…` walked from 0 by its `Link`
   until an empty page (or --catchup-events), events per second. The body
   is not decoded: events are counted by their `"event_id":` keys.
3. RSS: a mixed read load at --rate requests/s (a scheduled, open-loop
   driver on several connections) for --rss-seconds while the serve
   process's VmRSS is sampled; the highest sample and VmHWM are printed.
Clocks are this machine's monotonic clock; latency is request start to last
byte read."""
import argparse
import datetime
import gc
import http.client
import random
import re
import subprocess
import threading
import time
from urllib.parse import urlparse

LIST_P99_MS = 5.0
CATCHUP_TARGET = 50_000
RSS_TARGET_MB = 64


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))] if xs else float("nan")


def psql(db, sql):
    out = subprocess.run(["psql", db, "-X", "-qAt", "-c", sql], check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def samples(db):
    """Placeholder -> list of values (drawn at random per request)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def ago(**kw):
        return (now - datetime.timedelta(**kw)).strftime("%Y-%m-%dT%H:%M:%SZ")

    s = {
        # Agents by rank of size: the busiest ten and a spread of the rest.
        "busy_agent": psql(db, "SELECT agent_id FROM sessions GROUP BY 1 ORDER BY count(*) DESC LIMIT 10"),
        "agent": psql(db, "SELECT agent_id FROM (SELECT DISTINCT agent_id FROM sessions) a ORDER BY random() LIMIT 200"),
        "parent": psql(db, "SELECT DISTINCT parent_session_id FROM sessions TABLESAMPLE SYSTEM (5) "
                           "WHERE parent_session_id IS NOT NULL LIMIT 200"),
        "session": psql(db, "SELECT id FROM sessions TABLESAMPLE SYSTEM (1) LIMIT 2000"),
        "long_session": psql(db, "SELECT id FROM sessions TABLESAMPLE SYSTEM (5) WHERE version >= 21 LIMIT 500"),
        "type": psql(db, "SELECT session_type FROM sessions TABLESAMPLE SYSTEM (1) GROUP BY 1"),
        "t_hour": [ago(hours=1)], "t_day": [ago(days=1)], "t_week": [ago(days=7)],
        "t_month": [ago(days=30)], "t_quarter": [ago(days=90)],
    }
    for k, v in s.items():
        if not v:
            raise SystemExit(f"p5: no sample for {{{k}}}: is the database loaded?")
    return s


def load_queries(path):
    qs = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, q = line.split(None, 1)
            qs.append((name, q.strip()))
    return qs


PLACEHOLDER = re.compile(r"\{(\w+)\}")


def expand(q, s, rnd):
    return PLACEHOLDER.sub(lambda m: rnd.choice(s[m.group(1)]), q)


NEXT = re.compile(r"<([^>]*)>;\s*rel=\"next\"")


class Conn:
    def __init__(self, base):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.c = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def get(self, path):
        t0 = time.perf_counter()
        self.c.request("GET", path)
        r = self.c.getresponse()
        body = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise SystemExit(f"p5: GET {path} answered {r.status}: {body[:300]!r}")
        link = r.getheader("Link")
        m = NEXT.search(link) if link else None
        return dt, body, (m.group(1) if m else None)


def run_queries(base, queries, s, repeat, rnd):
    c = Conn(base)
    rows = []
    # One untimed pass first: a fresh `serve` opens its pooled connections
    # and prepares each statement on first use, which put the first query
    # of the list (whichever it was) at p99 6 ms against 1-4 ms for the rest.
    for _, q in queries:
        _, _, link = c.get(expand(q, s, rnd))
        if link:
            c.get(link)
    for name, q in queries:
        first, nxt = [], []
        # The driver's own garbage collection pauses would count as the
        # service's latency: collect between queries, not during one.
        gc.collect()
        gc.disable()
        for _ in range(repeat):
            dt, _, link = c.get(expand(q, s, rnd))
            first.append(dt * 1000)
            if link:
                dt, _, _ = c.get(link)
                nxt.append(dt * 1000)
        gc.enable()
        rows.append((name, first, nxt))
    return rows


def catchup(base, limit, cap):
    c = Conn(base)
    path = f"/events?after=0&limit={limit}"
    n, pages, t0 = 0, 0, time.perf_counter()
    while True:
        _, body, link = c.get(path)
        k = body.count(b'"event_id":')
        if k == 0:
            break
        n += k
        pages += 1
        if cap and n >= cap:
            break
        path = link
    dt = time.perf_counter() - t0
    return n, pages, dt


def rss_of(pid):
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024.0
    return out


def rss_load(base, queries, s, rate, seconds, pid, max_position):
    """Open loop: request i is due at start + i / rate, whatever came before."""
    conns = 16
    lists = [q for n, q in queries if n.startswith("list.")]
    mix = lists * 3 + ["/sessions/{session}"] * len(lists) * 2 + ["/sessions/{session}/events"] * len(lists)
    lat, errors, late = [], [0], [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    total = int(rate * seconds)

    def worker(w):
        rnd = random.Random(w)
        c = Conn(base)
        mine = []
        for i in range(w, total, conns):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.05:
                with lock:
                    late[0] += 1
            if i % 10 == 0:
                path = f"/events?after={rnd.randrange(max_position)}&limit=100"
            else:
                path = expand(rnd.choice(mix), s, rnd)
            try:
                dt, _, _ = c.get(path)
                mine.append((time.perf_counter() - due) * 1000)
            except (SystemExit, OSError):
                with lock:
                    errors[0] += 1
                c = Conn(base)
        with lock:
            lat.extend(mine)

    peak = [0.0]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss_of(pid)["VmRSS"])
            time.sleep(0.1)

    before = rss_of(pid)
    ts = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
    sm = threading.Thread(target=sampler)
    sm.start()
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - t0
    done.set()
    sm.join()
    after = rss_of(pid)
    return {"requests": len(lat), "achieved": len(lat) / took, "p50": pct(lat, 50),
            "p99": pct(lat, 99), "errors": errors[0], "late": late[0],
            "rss_before": before["VmRSS"], "rss_peak": peak[0], "hwm": after["VmHWM"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--only", default="", help="regular expression on query names")
    ap.add_argument("--catchup-limit", type=int, default=500)
    ap.add_argument("--catchup-events", type=int, default=0, help="stop after this many (0: all)")
    ap.add_argument("--pid", type=int, default=0, help="serve's pid, for the RSS part")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--rss-seconds", type=float, default=20)
    ap.add_argument("--skip", default="", help="comma-separated: queries,catchup,rss")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    rnd = random.Random(5)
    s = samples(a.db)
    queries = [(n, q) for n, q in load_queries(a.queries) if re.search(a.only, n)]
    ok = True
    results = []  # `RESULT ...` lines for bench/run.sh, printed last
    if "queries" not in skip:
        worst_list = (0.0, "")
        print(f"{'query':34} {'p50':>7} {'p99':>7} {'next p50':>9} {'next p99':>9}  (ms, {a.repeat} runs)")
        for name, first, nxt in run_queries(a.url, queries, s, a.repeat, rnd):
            worst = max(pct(first, 99), pct(nxt, 99) if nxt else 0)
            verdict = ""
            if name.startswith("list."):
                good = worst <= LIST_P99_MS
                ok &= good
                verdict = "ok" if good else f"MISS (target p99 <= {LIST_P99_MS:g} ms)"
                worst_list = max(worst_list, (worst, name))
            n50 = f"{pct(nxt, 50):9.2f}" if nxt else f"{'-':>9}"
            n99 = f"{pct(nxt, 99):9.2f}" if nxt else f"{'-':>9}"
            print(f"{name:34} {pct(first, 50):7.2f} {pct(first, 99):7.2f} {n50} {n99}  {verdict}")
        if worst_list[1]:
            results.append(f"RESULT P5 list_worst p99_ms={worst_list[0]:.2f} "
                           f"target<={LIST_P99_MS:g} query={worst_list[1]}")
    if "catchup" not in skip:
        n, pages, dt = catchup(a.url, a.catchup_limit, a.catchup_events)
        rate = n / dt if dt else 0
        good = rate >= CATCHUP_TARGET
        ok &= good
        print(f"catch-up: {n} events in {pages} pages of {a.catchup_limit} in {dt:.1f} s: "
              f"{rate:,.0f} events/s (target >= {CATCHUP_TARGET:,}) {'ok' if good else 'MISS'}")
        results.append(f"RESULT P5 catch_up events_per_s={rate:.0f} target>={CATCHUP_TARGET}")
    if "rss" not in skip and a.pid:
        top = int(psql(a.db, "SELECT coalesce(max(position), 1) FROM events")[0])
        r = rss_load(a.url, queries, s, a.rate, a.rss_seconds, a.pid, top)
        good = r["rss_peak"] < RSS_TARGET_MB and r["achieved"] >= 0.95 * a.rate
        ok &= good
        print(f"mixed load: {r['requests']} requests at {r['achieved']:.0f}/s (asked {a.rate:.0f}/s; "
              f"{r['late']} sent > 50 ms late, {r['errors']} errors), latency from schedule "
              f"p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms")
        print(f"serve RSS: {r['rss_before']:.1f} MB before, peak {r['rss_peak']:.1f} MB under load, "
              f"VmHWM {r['hwm']:.1f} MB (target < {RSS_TARGET_MB} MB) {'ok' if good else 'MISS'}")
        results.append(f"RESULT P5 serve_rss peak_mb={r['rss_peak']:.1f} target<{RSS_TARGET_MB} "
                       f"rate={r['achieved']:.0f}/s")
    print("P5:", "all targets met" if ok else "some targets missed")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
