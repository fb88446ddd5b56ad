#!/usr/bin/env python3
"""Stands in for `claude` in the P6 bench: speaks enough of the stream-json
protocol for the runner's driver (takes each user message by its uuid, a
turn's init and result lines) and, for a message `emit N every MS`, prints N
assistant lines MS milliseconds apart, each stamped with the wall clock
(`bench_t`, ns). Each message it reads is answered at once by a
`bench_input` line carrying the uuid and when it was read (`read_ns`)."""
import json
import sys
import time


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for raw in sys.stdin:
    read_ns = time.time_ns()
    try:
        msg = json.loads(raw)
    except ValueError:
        continue
    if msg.get("type") != "user":
        continue
    uid = msg.get("uuid")
    text = "".join(b.get("text", "") for b in msg["message"]["content"])
    out({"type": "bench_input", "uuid": uid, "read_ns": read_ns})
    out({"type": "command_lifecycle", "command_uuid": uid, "state": "started"})
    out({"type": "system", "subtype": "init", "model": "bench"})
    words = text.split()
    if len(words) >= 4 and words[0] == "emit":
        n, every = int(words[1]), float(words[3]) / 1000.0
        for i in range(n):
            out({"type": "assistant", "bench_t": time.time_ns(), "i": i,
                 "message": {"role": "assistant", "content": [{"type": "text", "text": "x" * 64}]}})
            time.sleep(every)
    out({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
         "usage": {"input_tokens": 1, "output_tokens": 1}, "model_usage_since_last_result": {}})
