"""The label store: labeling tasks and the comparisons people (or labelers) return, in one
embedded SQLite database (standard library ``sqlite3``).

Durability: the database runs in WAL mode with ``synchronous=FULL``, and every submission is
one transaction committed before the service answers, so an acknowledged label survives a
SIGKILL of the service (tests/feedback/test_service.py kills it and reopens the file).

A task is a prompt and K completions sampled from the policy at ``policy_version``. A
comparison is a task's completions ranked best -> worst by one labeler, optionally with ties
(``ties``: positions p in the ranking whose completion is as good as the one at p + 1; the
pairs inside a tied group say nothing about preference). Each task takes one comparison; a
submission is checked completely (task known, not expired, policy version, ranking a
permutation of ``range(K)``, ties valid positions) before anything is written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,          -- JSON list of K strings, in sampling order
    policy_version INTEGER NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,              -- unix time after which no ranking is accepted
    labeled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE REFERENCES tasks(task_id),
    policy_version INTEGER NOT NULL,
    labeler TEXT NOT NULL,
    ranking TEXT NOT NULL,              -- JSON list: indices into the task's completions, best -> worst
    created REAL NOT NULL,
    ties TEXT NOT NULL DEFAULT '[]'     -- JSON list of ranking positions p tied with p + 1
);
"""


class RankingError(ValueError):
    """A submission the store refuses; ``status`` is the HTTP status the service answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Comparison:
    """One stored ranking, joined with its task."""

    id: int
    task_id: str
    prompt: str
    ranked: list[str]  # completions best -> worst
    policy_version: int
    labeler: str
    created: float
    ties: tuple[int, ...] = ()  # positions p in ``ranked`` as good as p + 1


class LabelStore:
    """Tasks and comparisons in the SQLite file at ``path`` (created if missing). Thread-safe:
    one connection, every statement under a lock (the service's request threads share it)."""

    def __init__(self, path: str | Path, task_ttl_s: float = 3600.0):
        self.path, self.task_ttl_s = Path(path), task_ttl_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync at every commit: acknowledged = on disk
        self._db.executescript(SCHEMA)
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(comparisons)")]
        if "ties" not in columns:  # a database written before ties existed
            self._db.execute("ALTER TABLE comparisons ADD COLUMN ties TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_tasks(self, prompt_completions: list[tuple[str, list[str]]], policy_version: int) -> list[str]:
        """Store one task per (prompt, K completions); returns their ids."""
        now = time.time()
        rows = [(uuid.uuid4().hex, p, json.dumps(list(c)), int(policy_version), now, now + self.task_ttl_s)
                for p, c in prompt_completions]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO tasks (task_id, prompt, completions, policy_version, created, expires)"
                                 " VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        return [r[0] for r in rows]

    def next_task(self, labeler: str = "") -> dict | None:
        """The oldest open task (not labeled, not expired), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT task_id, prompt, completions, policy_version, expires FROM tasks "
                "WHERE labeled = 0 AND expires > ? ORDER BY created, rowid LIMIT 1", (time.time(),)).fetchone()
        if row is None:
            return None
        return {"task_id": row[0], "prompt": row[1], "completions": json.loads(row[2]), "policy_version": row[3],
                "expires": row[4]}

    def submit(self, task_id: str, ranking: list, policy_version: int, labeler: str, ties: list | None = None) -> int:
        """Store a ranking (indices best -> worst; ``ties``: positions p tied with p + 1); returns
        the comparison id. Raises ``RankingError`` (nothing stored) for an unknown, expired or
        already labeled task, a wrong policy version, a ranking that is not a permutation of the
        task's K indices, or ties that are not distinct positions 0..K-2."""
        ties = [] if ties is None else ties
        if not isinstance(labeler, str) or not labeler.strip():
            raise RankingError(400, "labeler: a non-empty string is required")
        with self._lock:
            row = self._db.execute("SELECT completions, policy_version, expires, labeled FROM tasks WHERE task_id = ?",
                                   (str(task_id),)).fetchone()
            if row is None:
                raise RankingError(404, f"task {task_id!r}: unknown task")
            k = len(json.loads(row[0]))
            if row[3]:
                raise RankingError(409, f"task {task_id!r}: already labeled")
            if row[2] <= time.time():
                raise RankingError(410, f"task {task_id!r}: expired")
            if policy_version != row[1]:
                raise RankingError(409, f"task {task_id!r}: policy_version {policy_version!r} does not match the "
                                        f"task's {row[1]}")
            check_ranking(ranking, k)
            check_ties(ties, k)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO comparisons (task_id, policy_version, labeler, ranking, created, ties)"
                    " VALUES (?, ?, ?, ?, ?, ?)", (task_id, row[1], labeler.strip(), json.dumps(ranking), time.time(),
                                                   json.dumps(sorted(ties))))
                self._db.execute("UPDATE tasks SET labeled = 1 WHERE task_id = ?", (task_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def comparisons(self, after_id: int = 0) -> list[Comparison]:
        """Stored comparisons with ``id > after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.task_id, t.prompt, t.completions, c.ranking, c.policy_version, c.labeler, c.created, "
                "c.ties "
                "FROM comparisons c JOIN tasks t ON t.task_id = c.task_id WHERE c.id > ? ORDER BY c.id",
                (after_id,)).fetchall()
        out = []
        for cid, task_id, prompt, completions, ranking, version, labeler, created, ties in rows:
            completions = json.loads(completions)
            out.append(Comparison(cid, task_id, prompt, [completions[i] for i in json.loads(ranking)], version,
                                  labeler, created, tuple(json.loads(ties))))
        return out

    def progress(self) -> dict[str, int]:
        """Counts of tasks (all, labeled, open) and comparisons."""
        with self._lock:
            total, labeled = self._db.execute("SELECT COUNT(*), COALESCE(SUM(labeled), 0) FROM tasks").fetchone()
            open_ = self._db.execute("SELECT COUNT(*) FROM tasks WHERE labeled = 0 AND expires > ?",
                                     (time.time(),)).fetchone()[0]
            comparisons = self._db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
        return {"tasks": total, "labeled": labeled, "open": open_, "comparisons": comparisons}


def check_ranking(ranking, k: int) -> None:
    """A ranking must be a permutation of ``range(k)`` (each completion once, best first)."""
    if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise RankingError(400, f"ranking: a list of {k} completion indices is required")
    if len(ranking) != k:
        raise RankingError(400, f"ranking: {len(ranking)} indices for {k} completions; rank all {k}")
    if len(set(ranking)) != k:
        raise RankingError(400, f"ranking: duplicate indices in {ranking}")
    if not all(0 <= i < k for i in ranking):
        raise RankingError(400, f"ranking: indices must be in 0..{k - 1}, got {ranking}")


def check_ties(ties, k: int) -> None:
    """Ties are distinct ranking positions ``p`` in ``0..k-2`` (the completion at ``p`` is as good
    as the one at ``p + 1``)."""
    if not isinstance(ties, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in ties):
        raise RankingError(400, "ties: a list of ranking positions is required")
    if len(set(ties)) != len(ties) or not all(0 <= p < k - 1 for p in ties):
        raise RankingError(400, f"ties: distinct positions in 0..{k - 2} (p = tied with p + 1), got {ties}")
