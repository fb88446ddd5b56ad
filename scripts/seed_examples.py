#!/usr/bin/env python3
"""Run every curl example of a seed file verbatim against a running service.

    seed_examples.py SEED_FILE BASE_URL

The seed's examples talk to http://localhost:8011; that origin is replaced by
BASE_URL (the service under test runs on a free port), and the placeholder
session id (660e8400-…-446655440001) by a fresh session's id so each PATCH
and GET acts on a real session. Nothing else in a command changes. Each
command must print a JSON answer that is not a problem document.
"""
import json
import re
import subprocess
import sys

PLACEHOLDER = "660e8400-e29b-41d4-a716-446655440001"
SEED_ORIGIN = "localhost:8011"
BASE = ""


def commands(text):
    """Shell commands of the ```bash blocks: a command ends at a newline that
    is outside single quotes and not escaped by a backslash."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        current = ""
        for line in block.splitlines(keepends=True):
            if not current and line.strip().startswith("#"):
                continue
            current += line
            if current.count("'") % 2 == 0 and not current.rstrip("\n").endswith("\\"):
                cmd = current.strip()
                current = ""
                if cmd.startswith("curl"):
                    yield cmd


def fresh_session():
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{BASE}/sessions/", "-H", "Content-Type: application/json",
         "-d", '{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "task"}'],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)["id"]


def main():
    global BASE
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    seed, BASE = sys.argv[1], sys.argv[2].rstrip("/")
    with open(seed) as f:
        cmds = list(commands(f.read()))
    failures = 0
    for cmd in cmds:
        cmd = cmd.replace(f"http://{SEED_ORIGIN}", BASE).replace(SEED_ORIGIN, BASE)
        if PLACEHOLDER in cmd:
            cmd = cmd.replace(PLACEHOLDER, fresh_session())
        out = subprocess.run(["bash", "-c", cmd + " -s -w '\\n%{http_code}'"], capture_output=True, text=True)
        body, _, status = out.stdout.rpartition("\n")
        ok = out.returncode == 0 and status.startswith("2")
        try:
            parsed = json.loads(body)
            ok = ok and not (isinstance(parsed, dict) and "urn:agent-sessions:problem" in str(parsed.get("type", "")))
        except ValueError:
            ok = False
        print(f"{'ok  ' if ok else 'FAIL'} {status} {' '.join(cmd.split())[:110]}")
        failures += not ok
    print(f"seed examples: {len(cmds) - failures} passed, {failures} failed")
    sys.exit(1 if failures or not cmds else 0)


if __name__ == "__main__":
    main()
