"""The feedback service's JSON API against a real server on loopback (no Ray): tasks out,
rankings in, every malformed ranking refused with a 4xx and nothing stored, auth enforced."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from rlhf_ray.feedback.service import FeedbackServer
from rlhf_ray.feedback.store import SCHEMA, LabelStore

TOKEN = "s3cret-t0ken"


def call(url: str, path: str, body=None, token: str | None = TOKEN, method: str | None = None):
    """(status, JSON reply or None)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data else "GET"))
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def server(tmp_path):
    s = FeedbackServer(tmp_path / "labels.db", token=TOKEN, task_ttl_s=60)
    yield s
    s.close()


def test_task_ranking_progress_round_trip(server):
    server.store.add_tasks([("rev abc=", ["cba", "abc", "cbb"])], policy_version=3)
    status, task = call(server.url, "/api/task?labeler=ann")
    assert status == 200 and task["prompt"] == "rev abc=" and task["policy_version"] == 3
    assert task["completions"] == ["cba", "abc", "cbb"]
    status, reply = call(server.url, "/api/rankings", {"task_id": task["task_id"], "policy_version": 3,
                                                       "labeler": "ann", "ranking": [0, 2, 1]})
    assert status == 200 and reply["comparison_id"] == 1
    (c,) = server.store.comparisons()
    assert (c.prompt, c.ranked, c.policy_version, c.labeler) == ("rev abc=", ["cba", "cbb", "abc"], 3, "ann")
    assert c.ties == ()  # none given
    assert call(server.url, "/api/task")[0] == 204  # the only task is labeled
    status, p = call(server.url, "/api/progress")
    assert status == 200 and (p["tasks"], p["labeled"], p["open"], p["comparisons"]) == (1, 1, 0, 1)


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"ranking": [0, 1]}, 400, "2 indices for 3"),
    ({"ranking": [0, 1, 1]}, 400, "duplicate"),
    ({"ranking": [0, 1, 5]}, 400, "0..2"),
    ({"ranking": "0,1,2"}, 400, "list of 3"),
    ({"task_id": "nope"}, 404, "unknown task"),
    ({"policy_version": 2}, 409, "policy_version 2"),
    ({"labeler": ""}, 400, "labeler"),
    ({"ties": [2]}, 400, "0..1"),  # position 2 is the last: nothing after it to tie with
    ({"ties": [0, 0]}, 400, "distinct"),
    ({"ties": 0}, 400, "list of ranking positions"),
])
def test_malformed_rankings_are_refused_and_store_nothing(server, change, status, message):
    (task_id,) = server.store.add_tasks([("rev abc=", ["cba", "abc", "cbb"])], policy_version=3)
    body = {"task_id": task_id, "policy_version": 3, "labeler": "ann", "ranking": [0, 1, 2], **change}
    got, reply = call(server.url, "/api/rankings", body)
    assert got == status and message in reply["error"]
    assert server.store.comparisons() == []


def test_missing_fields_bad_json_expired_and_twice(server):
    ids = server.store.add_tasks([("rev ab=", ["ba", "ab"]), ("rev cd=", ["dc", "cd"])], policy_version=0)
    assert call(server.url, "/api/rankings", {"task_id": ids[0]})[0] == 400
    assert call(server.url, "/api/rankings", b"{not json")[0] == 400
    good = {"task_id": ids[0], "policy_version": 0, "labeler": "x", "ranking": [1, 0]}
    assert call(server.url, "/api/rankings", good)[0] == 200
    status, reply = call(server.url, "/api/rankings", good)
    assert status == 409 and "already labeled" in reply["error"]
    server.store._db.execute("UPDATE tasks SET expires = ? WHERE task_id = ?", (time.time() - 1, ids[1]))
    status, reply = call(server.url, "/api/rankings", {**good, "task_id": ids[1]})
    assert status == 410 and "expired" in reply["error"]
    assert len(server.store.comparisons()) == 1


@pytest.mark.parametrize("token", [None, "wrong"])
def test_unauthenticated_requests_are_refused(server, token):
    (task_id,) = server.store.add_tasks([("rev ab=", ["ba", "ab"])], policy_version=0)
    for path, body in (("/api/task", None), ("/api/progress", None),
                       ("/api/rankings", {"task_id": task_id, "policy_version": 0, "labeler": "x", "ranking": [0, 1]})):
        status, reply = call(server.url, path, body, token=token)
        assert status == 401 and "bearer token" in reply["error"]
    assert server.store.comparisons() == []
    # the page itself holds no data and loads without the token (it reads it from the URL fragment)
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        assert r.status == 200 and b"Rank the completions" in r.read()


def test_non_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="token"):
        FeedbackServer(tmp_path / "x.db", host="0.0.0.0")


def test_store_reopens_with_everything(tmp_path):
    store = LabelStore(tmp_path / "l.db")
    (t,) = store.add_tasks([("rev ab=", ["ba", "ab"])], policy_version=1)
    store.submit(t, [0, 1], 1, "bot")
    store.close()
    again = LabelStore(tmp_path / "l.db")
    assert [c.ranked for c in again.comparisons()] == [["ba", "ab"]]
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_ties_are_stored_and_an_old_database_gains_the_column(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "old.db")  # the schema before ties existed, one label in it
    old.executescript(SCHEMA.replace(",\n    ties TEXT NOT NULL DEFAULT '[]'     -- JSON list of ranking positions p tied with "
                                     "p + 1", ""))
    old.execute("INSERT INTO tasks VALUES ('t0', 'rev ab=', '[\"ba\", \"ab\"]', 1, 0, 1e12, 1)")
    old.execute("INSERT INTO comparisons (task_id, policy_version, labeler, ranking, created) "
                "VALUES ('t0', 1, 'ann', '[0, 1]', 0)")
    old.commit()
    old.close()
    store = LabelStore(tmp_path / "old.db")
    (t,) = store.add_tasks([("rev abc=", ["cba", "cbb", "caa"])], policy_version=1)
    store.submit(t, [0, 2, 1], 1, "bot", ties=[1])
    assert [(c.ranked, c.ties) for c in store.comparisons()] == [(["ba", "ab"], ()), (["cba", "caa", "cbb"], (1,))]
    store.close()
