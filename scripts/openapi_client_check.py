"""Call every operation of the client openapi-python-client generated from
openapi/openapi.json against a running service, and check each answer is
one the document promises: a documented status, its documented media type,
a body the client parses into the documented model, and the values the
request asked for.

    python scripts/openapi_client_check.py BASE_URL DOCUMENT

with the generated package `agent_sessions_client` on PYTHONPATH (see
scripts/openapi-check.sh). Fails unless the set of operations called, the
set the client has and the set the document lists are one and the same.
"""

from __future__ import annotations

import datetime
import json
import pkgutil
import sys
import time
import uuid
from types import ModuleType
from typing import Any

import agent_sessions_client.api as generated_api
from agent_sessions_client import Client
from agent_sessions_client.api.events import list_events, list_session_events, stream_events
from agent_sessions_client.api.live import (
    decide_approval,
    get_approval,
    interrupt_session,
    list_approvals,
    list_inputs,
    request_approval,
    send_input,
)
from agent_sessions_client.api.operations import healthz, metrics, readyz
from agent_sessions_client.api.portable import (
    export_session,
    fork_session,
    get_transcript,
    import_session,
    put_transcript,
)
from agent_sessions_client.api.sessions import (
    append_messages,
    create_session,
    delete_session,
    delete_sessions,
    get_analytics,
    get_session,
    get_session_metrics,
    list_messages,
    list_sessions,
    stream_messages,
    update_session,
)
from agent_sessions_client.models import (
    Analytics,
    BulkDeleteResult,
    GroupBy,
    SessionMetrics,
    AppendMessagesBodyItem,
    Approval,
    ApprovalDecision,
    ApprovalRequest,
    ApprovalRequestInput,
    ApprovalStatus,
    DecisionRequest,
    DecisionRequestUpdatedInputType0,
    Input,
    InputAccepted,
    InputKind,
    InputRequest,
    InterruptSessionBodyType0,
    EventEnvelope,
    EventKind,
    Health,
    Message,
    NewSession,
    NewSessionContextType0,
    Problem,
    RuntimeBackend,
    Session,
    SessionExport,
    TranscriptWritten,
    ForkRequest,
    SessionMergePatch,
    SessionMergePatchContextType0,
    SessionStatus,
    SessionUpdate,
    SessionUpdateContextType0,
    WorkerSpec,
)
from agent_sessions_client.types import Response

BASE, DOCUMENT = sys.argv[1], sys.argv[2]
AGENT = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
DEADLINE_S = 20.0

with open(DOCUMENT, encoding="utf-8") as f:
    spec = json.load(f)

# operationId -> {status: [media types]}, from the document.
documented: dict[str, dict[int, list[str]]] = {}
for path_item in spec["paths"].values():
    for op in path_item.values():
        documented[op["operationId"]] = {
            int(code): sorted(r.get("content", {}))
            for code, r in op["responses"].items()
        }

called: dict[str, set[int]] = {}
failures: list[str] = []
client = Client(base_url=BASE, raise_on_unexpected_status=True, timeout=30.0)


def op_id(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[1]


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        print(f"FAIL {what}", file=sys.stderr)


def call(module: ModuleType, expect: int, model: type | None, /, **kwargs: Any) -> Response:
    """One request through the generated client; checks the answer against
    the document and the status and model this request should get."""
    name = op_id(module)
    res = module.sync_detailed(client=client, **kwargs)
    answers = documented[name]
    where = f"{name} -> {res.status_code}"
    check(res.status_code in answers, f"{where}: status not documented")
    check(res.status_code == expect, f"{where}: expected {expect}: {res.content[:300]!r}")
    media = res.headers.get("content-type", "").split(";")[0].strip()
    expected_media = answers.get(res.status_code, [])
    if expected_media:
        check(media in expected_media, f"{where}: content type {media!r} not in {expected_media}")
    elif res.content:
        check(False, f"{where}: a body where the document has none")
    if model is not None:
        parsed = res.parsed
        if model is list:
            check(isinstance(parsed, list), f"{where}: body is not a list")
        else:
            check(isinstance(parsed, model), f"{where}: body is not a {model.__name__}: {parsed!r}")
    called.setdefault(name, set()).add(res.status_code)
    return res


def raw_call(module: ModuleType, expect: int, /, **kwargs: Any):
    """The generated request, sent as is, for an answer the generated parser
    cannot read (it reads only the first media type of a response)."""
    name = op_id(module)
    res = client.get_httpx_client().request(**module._get_kwargs(**kwargs))
    media = res.headers.get("content-type", "").split(";")[0].strip()
    where = f"{name} -> {res.status_code} {media}"
    check(res.status_code == expect, f"{where}: expected {expect}")
    check(media in documented[name].get(res.status_code, []), f"{where}: not documented")
    called.setdefault(name, set()).add(res.status_code)
    return res


def until(what: str, probe):
    """Poll `probe` until it returns something truthy, or fail at the deadline."""
    end = time.monotonic() + DEADLINE_S
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > end:
            check(False, f"{what}: not within {DEADLINE_S} s")
            return got
        time.sleep(0.05)


# Operations: health and metrics.
h = call(healthz, 200, Health).parsed
check(h.status == "ok", f"healthz status {h.status}")
r = call(readyz, 200, Health).parsed
check(r.status == "ok", f"readyz status {r.status}")

# Create, with an idempotent retry and a refused body.
new = NewSession(
    agent_id=AGENT,
    session_type="development",
    context=NewSessionContextType0.from_dict({"a": 1, "b": {"c": 2}}),
    runtime_backend=RuntimeBackend.UNKNOWN,
    worker=WorkerSpec(prompt="say hello", max_turns=1),
)
created = call(create_session, 201, Session, body=new, idempotency_key="check-1")
s = created.parsed
sid = s.id
check(created.headers.get("location") == f"/sessions/{sid}", "Location names the session")
check(created.headers.get("etag") == '"1"', "a new session's ETag is \"1\"")
check(s.status == SessionStatus.ACTIVE and s.version == 1, "a new session is active at version 1")
check(s.worker is not None and s.worker.prompt == "say hello", "the worker spec comes back")
again = call(create_session, 201, Session, body=new, idempotency_key="check-1")
check(again.parsed.id == sid, "the same Idempotency-Key and body return the first session")
check(again.headers.get("idempotent-replayed") == "true", "a replay says so")
bad = call(create_session, 422, Problem, body=NewSession(agent_id=AGENT, session_type=" "))
check(bad.parsed.field == "session_type", f"the 422 names session_type: {bad.parsed}")

# Read, conditionally.
got = call(get_session, 200, Session, id=sid)
check(got.parsed.to_dict() == s.to_dict(), "GET returns what POST returned")
call(get_session, 304, None, id=sid, if_none_match='"1"')
call(get_session, 404, Problem, id=uuid.uuid4())

# Update: replace, merge, a weak If-Match, an illegal transition.
replaced = call(
    update_session,
    200,
    Session,
    id=sid,
    body=SessionUpdate(context=SessionUpdateContextType0.from_dict({"b": {"d": 3}})),
    if_match='"1"',
).parsed
check(replaced.context.to_dict() == {"b": {"d": 3}}, f"application/json replaces: {replaced.context}")
merged = call(
    update_session,
    200,
    Session,
    id=sid,
    body=SessionMergePatch(
        status=SessionStatus.PAUSED,
        context=SessionMergePatchContextType0.from_dict({"b": {"e": 4}}),
    ),
).parsed
check(
    merged.context.to_dict() == {"b": {"d": 3, "e": 4}} and merged.status == SessionStatus.PAUSED,
    f"application/merge-patch+json merges: {merged.context}",
)
check(merged.version == 3, f"two changes, version 3: {merged.version}")
weak = call(
    update_session,
    412,
    Problem,
    id=sid,
    body=SessionUpdate(status=SessionStatus.ACTIVE),
    if_match='W/"3"',
)
check(weak.parsed.field == "If-Match", f"the 412 names If-Match: {weak.parsed}")
call(update_session, 200, Session, id=sid, body=SessionUpdate(status=SessionStatus.COMPLETED))
illegal = call(update_session, 409, Problem, id=sid, body=SessionUpdate(status=SessionStatus.ACTIVE))
check(illegal.parsed.field == "status", f"the 409 names status: {illegal.parsed}")

# List, one page at a time.
other = call(create_session, 201, Session, body=NewSession(agent_id=AGENT, session_type="task")).parsed
page = call(list_sessions, 200, list, agent_id=AGENT, limit=1)
check([x.id for x in page.parsed] == [other.id], "newest first")
check('rel="next"' in page.headers.get("link", ""), "a full page links to the next")
by_status = call(list_sessions, 200, list, status="completed").parsed
check([x.id for x in by_status] == [sid], "filtered by status")
call(list_sessions, 400, Problem, limit=0)

# Messages.
lines = [
    {"type": "system", "subtype": "init", "session_id": "c"},
    {"type": "assistant", "message": {"content": [{"type": "tool_use", "id": "t", "name": "Read", "input": {}}]}},
    {"type": "result", "num_turns": 1, "total_cost_usd": 0.5, "usage": {"input_tokens": 7}},
]
appended = call(
    append_messages,
    200,
    Session,
    id=other.id,
    body=[AppendMessagesBodyItem.from_dict(m) for m in lines],
).parsed
usage = appended.usage
check(
    (usage.message_count, usage.tool_call_count, usage.turns, usage.input_tokens) == (3, 1, 1, 7),
    f"usage totals: {usage}",
)
call(append_messages, 422, Problem, id=other.id, body=[])
messages = call(list_messages, 200, list, id=other.id).parsed
check(
    [m.seq for m in messages] == [1, 2, 3] and all(isinstance(m, Message) for m in messages),
    "messages in order",
)
check(messages[0].message.to_dict() == lines[0], "a message comes back as sent")
jsonl = raw_call(list_messages, 200, id=other.id, format_="jsonl")
check([json.loads(x) for x in jsonl.content.splitlines()] == lines, "jsonl: one message per line")
call(list_messages, 404, Problem, id=uuid.uuid4())

# Events: one session's stream, the feed, the live stream.
events = call(list_session_events, 200, list, id=sid).parsed
check([e.version for e in events] == [1, 2, 3, 4], f"versions 1..4: {[e.version for e in events]}")
check(events[0].event_type == EventKind.SESSION_CREATED, "the stream opens with session.created")
check(all(isinstance(e, EventEnvelope) for e in events), "envelopes")
check(events[1].payload.to_dict()["updates"] == ["context"], "updates names the field changed")
call(list_session_events, 404, Problem, id=uuid.uuid4())


def feed_has_every_event():
    feed = call(list_events, 200, list, session_id=sid, limit=500).parsed
    return feed if len(feed) == 4 else None


feed = until("the feed shows the session's 4 events", feed_has_every_event)
if feed:
    positions = [e.position for e in feed]
    check(positions == sorted(positions), "the feed is in position order")
call(list_events, 400, Problem, event_type="session.exploded")

# The live stream never ends: its answer is checked from its head and first
# event, read through the generated request, then the connection is closed.
call(stream_events, 400, Problem, last_event_id="-1")
kwargs = stream_events._get_kwargs(session_id=sid, after=0)
end = time.monotonic() + DEADLINE_S
with client.get_httpx_client().stream(**kwargs) as live:
    answers = documented["stream_events"]
    media = live.headers.get("content-type", "").split(";")[0]
    check(live.status_code == 200 and media in answers.get(200, []), f"stream: {live.status_code} {media}")
    first = None
    for line in live.iter_lines():
        if line.startswith("data:"):
            first = EventEnvelope.from_dict(json.loads(line[5:]))
            break
        if time.monotonic() > end:
            break
    check(first is not None and first.aggregate_id == sid and first.version == 1, f"stream: first event {first}")
    called.setdefault("stream_events", set()).add(live.status_code)

# Live sessions: inputs, an interrupt, the queue, approvals, the message stream.
first_input = call(send_input, 202, InputAccepted, id=other.id, body=InputRequest(text="hello"), idempotency_key="in-1")
check(first_input.parsed.seq == 1 and first_input.parsed.kind == InputKind.MESSAGE, f"first input: {first_input.parsed}")
again_input = call(send_input, 202, InputAccepted, id=other.id, body=InputRequest(text="hello"), idempotency_key="in-1")
check(again_input.parsed.to_dict() == first_input.parsed.to_dict(), "a retried input answers the first")
call(send_input, 409, Problem, id=sid, body=InputRequest(text="too late"))
call(send_input, 404, Problem, id=uuid.uuid4(), body=InputRequest(text="nobody"))
call(send_input, 422, Problem, id=other.id, body=InputRequest(text=" "))
stopped = call(interrupt_session, 202, InputAccepted, id=other.id, body=InterruptSessionBodyType0())
check(stopped.parsed.seq == 2 and stopped.parsed.kind == InputKind.INTERRUPT, f"interrupt: {stopped.parsed}")
call(interrupt_session, 409, Problem, id=sid, body=InterruptSessionBodyType0())
queued = call(list_inputs, 200, list, id=other.id).parsed
check([i.seq for i in queued] == [1, 2] and all(isinstance(i, Input) for i in queued), f"the queue: {queued}")
call(list_inputs, 404, Problem, id=uuid.uuid4())
asked = ApprovalRequest(
    request_id="req-1", tool_name="Bash", input_=ApprovalRequestInput.from_dict({"command": "ls"}), generation=1
)
pending = call(request_approval, 201, Approval, id=other.id, body=asked).parsed
check(pending.status == ApprovalStatus.PENDING, f"a new approval is pending: {pending}")
call(request_approval, 200, Approval, id=other.id, body=asked)
call(request_approval, 404, Problem, id=uuid.uuid4(), body=asked)
listed = call(list_approvals, 200, list, id=other.id, status="pending").parsed
check([a.request_id for a in listed] == ["req-1"], f"pending approvals: {listed}")
call(list_approvals, 400, Problem, id=other.id, status="maybe")
call(get_approval, 200, Approval, id=other.id, request_id="req-1")
call(get_approval, 404, Problem, id=other.id, request_id="nope")
call(
    decide_approval,
    422,
    Problem,
    id=other.id,
    request_id="req-1",
    body=DecisionRequest(decision=ApprovalDecision.DENY, updated_input=DecisionRequestUpdatedInputType0.from_dict({})),
)
allowed = call(
    decide_approval, 200, Approval, id=other.id, request_id="req-1", body=DecisionRequest(decision=ApprovalDecision.ALLOW)
).parsed
check(allowed.status == ApprovalStatus.ALLOWED and allowed.decided_by == "anonymous", f"decided: {allowed}")
call(decide_approval, 409, Problem, id=other.id, request_id="req-1", body=DecisionRequest(decision=ApprovalDecision.DENY))
call(decide_approval, 404, Problem, id=other.id, request_id="nope", body=DecisionRequest(decision=ApprovalDecision.DENY))
answer = call(list_inputs, 200, list, id=other.id, after=2).parsed
check([i.kind for i in answer] == [InputKind.APPROVAL], f"the decision is queued for the worker: {answer}")
call(stream_messages, 404, Problem, id=uuid.uuid4())
call(stream_messages, 400, Problem, id=other.id, last_event_id="x")
kwargs = stream_messages._get_kwargs(id=other.id, after=2)
end = time.monotonic() + DEADLINE_S
with client.get_httpx_client().stream(**kwargs) as live:
    media = live.headers.get("content-type", "").split(";")[0]
    check(
        live.status_code == 200 and media in documented["stream_messages"].get(200, []),
        f"message stream: {live.status_code} {media}",
    )
    streamed = None
    for line in live.iter_lines():
        if line.startswith("data:"):
            streamed = Message.from_dict(json.loads(line[5:]))
            break
        if time.monotonic() > end:
            break
    check(streamed is not None and streamed.seq == 3, f"message stream: first message {streamed}")
    called.setdefault("stream_messages", set()).add(live.status_code)

# Portable sessions: the transcript, a fork, export and import.
jsonl = json.dumps({"type": "user", "sessionId": str(other.id)}) + "\n"
from agent_sessions_client.types import File  # noqa: E402
import io  # noqa: E402

def upload(offset: int, data: str, expect: int, model: type | None):
    return call(put_transcript, expect, model, id=other.id, offset=offset,
                body=File(payload=io.BytesIO(data.encode()), mime_type="application/octet-stream"))

stored = upload(0, jsonl, 200, TranscriptWritten).parsed
check(stored.length == len(jsonl), f"transcript length: {stored}")
upload(0, jsonl, 200, TranscriptWritten)
upload(len(jsonl) + 5, jsonl, 409, Problem)
upload(len(jsonl), "half", 422, Problem)
call(put_transcript, 404, Problem, id=uuid.uuid4(), offset=0,
     body=File(payload=io.BytesIO(jsonl.encode()), mime_type="application/octet-stream"))
call(put_transcript, 400, Problem, id=other.id, offset=-1,
     body=File(payload=io.BytesIO(jsonl.encode()), mime_type="application/octet-stream"))
got = raw_call(get_transcript, 200, id=other.id)
check(got.text == jsonl, f"transcript read back: {got.text!r}")
call(get_transcript, 404, Problem, id=uuid.uuid4())
call(get_transcript, 400, Problem, id=other.id, at_version=0)
child = call(fork_session, 201, Session, id=other.id, body=ForkRequest(at_version=2)).parsed
check(child.parent_session_id == other.id, f"fork: {child}")
call(fork_session, 422, Problem, id=other.id, body=ForkRequest(at_version=10_000))
call(fork_session, 404, Problem, id=uuid.uuid4(), body=ForkRequest())
doc = call(export_session, 200, SessionExport, id=other.id).parsed
call(export_session, 404, Problem, id=uuid.uuid4())
copy = call(import_session, 201, Session, body=doc, new_id=True).parsed
check(copy.id != other.id and copy.version == doc.session.version, f"import: {copy}")
call(import_session, 409, Problem, body=doc)
doc.format_version = 2
call(import_session, 422, Problem, body=doc)

# Metrics folded from a session's events; analytics from the projection.
m = call(get_session_metrics, 200, SessionMetrics, id=sid).parsed
check(m.duration_seconds >= 0, f"metrics: {m}")
call(get_session_metrics, 404, Problem, id=uuid.uuid4())
for group_by in GroupBy:
    call(get_analytics, 200, Analytics, group_by=group_by)
call(get_analytics, 400, Problem, from_=datetime.date(2020, 1, 1), to=datetime.date(2026, 1, 1))
# Pages of one key: the Link header's cursor continues after the first.
first = call(get_analytics, 200, Analytics, group_by=GroupBy.STATUS, limit=1)
link = first.headers.get("link", "")
check(link.startswith("</analytics?") and 'rel="next"' in link, f"analytics Link: {link!r}")
cursor = link.split("cursor=", 1)[1].split(">", 1)[0].split("&", 1)[0]
rest = call(get_analytics, 200, Analytics, group_by=GroupBy.STATUS, limit=500, cursor=cursor).parsed
check(all(g.key > first.parsed.groups[0].key for g in rest.groups), f"analytics pages: {rest}")
call(get_analytics, 400, Problem, limit=0)
call(get_analytics, 400, Problem, cursor="not-a-cursor")

# Bulk delete by the list's filters: never without one; a dry run counts.
call(delete_sessions, 400, Problem)
call(delete_sessions, 400, Problem, status="bogus")
doomed = call(create_session, 201, Session, body=NewSession(agent_id=AGENT, session_type="bulk-check")).parsed
dry = call(delete_sessions, 200, BulkDeleteResult, session_type="bulk-check", dry_run=True).parsed
check(dry.dry_run and dry.matched == 1 and dry.deleted == 0, f"a dry run only counts: {dry}")
call(get_session, 200, Session, id=doomed.id)
done = call(delete_sessions, 200, BulkDeleteResult, session_type="bulk-check").parsed
check(not done.dry_run and done.deleted == 1, f"the bulk delete deletes: {done}")
call(get_session, 404, Problem, id=doomed.id)

# Delete, guarded by the version.
call(delete_session, 412, Problem, id=sid, if_match='"1"')
call(delete_session, 204, None, id=sid, if_match='"4"')
call(get_session, 404, Problem, id=sid)
call(delete_session, 404, Problem, id=sid)

text = call(metrics, 200, None).content.decode()
check("http_requests_total" in text, "metrics count requests")

# Every operation: the document's, the client's and the ones called agree.
in_client = {
    m.name
    for pkg in pkgutil.iter_modules(generated_api.__path__)
    for m in pkgutil.iter_modules([f"{generated_api.__path__[0]}/{pkg.name}"])
}
check(set(documented) == in_client, f"document vs client: {sorted(set(documented) ^ in_client)}")
check(set(called) == set(documented), f"not called: {sorted(set(documented) - set(called))}")

print(f"{len(called)} operations called, {sum(map(len, called.values()))} distinct answers checked")
if failures:
    print(f"{len(failures)} failure(s)", file=sys.stderr)
    sys.exit(1)
