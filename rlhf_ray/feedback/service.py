"""The feedback service: hands out labeling tasks, takes rankings back, serves the labeling page.

A standard-library ``ThreadingHTTPServer`` over a :class:`~rlhf_ray.feedback.store.LabelStore`,
run inside one Ray actor (:class:`FeedbackService`) on the cluster. Why an actor and not Ray
Serve: Serve starts a controller and an HTTP proxy actor per node (seconds and several hundred
MB on a 2-core machine, before the first request), and its replicas and routing buy nothing
here: SQLite wants exactly one writing process, and the traffic is a few people or labelers.
The actor starts in well under a second and the trainer drives it with ordinary actor calls.

JSON API (documented in the README, section "Human feedback loop"); every ``/api`` request
needs ``Authorization: Bearer <token>`` when the service has a token (always when it binds a
non-loopback address). The page itself (``GET /``) carries no data and needs none.

- ``GET /api/task?labeler=ID`` -> 200 ``{task_id, policy_version, prompt, completions, expires}``, 204 none open
- ``POST /api/rankings`` ``{task_id, policy_version, labeler, ranking[, ties]}`` -> 200 ``{comparison_id}``;
  400 bad ranking or ties, 404 unknown task, 409 wrong policy version / already labeled, 410 expired
- ``GET /api/progress`` -> 200 ``{tasks, labeled, open, comparisons, policy_version}``
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from rlhf_ray.feedback.store import LabelStore, RankingError

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class FeedbackServer:
    """The HTTP server and its store (no Ray: the actor below wraps it; tests use it directly)."""

    def __init__(self, db_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 task_ttl_s: float = 3600.0):
        if not is_loopback(host) and not token:
            raise ValueError(f"feedback.host={host!r} is not loopback: a bearer token is required "
                             "(set the environment variable named by feedback.token_env)")
        self.store = LabelStore(db_path, task_ttl_s=task_ttl_s)
        self.token, self.policy_version = token, 0
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="feedback-http", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.store.close()

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        # constant-time compare: the token is a secret
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.token}".encode())


def page_html() -> str:
    return resources.files("rlhf_ray.feedback").joinpath("page.html").read_text(encoding="utf-8")


def _handler(server: FeedbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server API
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                return self._send(200, page_html().encode(), "text/html; charset=utf-8")
            if not self._auth():
                return None
            if url.path == "/api/task":
                labeler = parse_qs(url.query).get("labeler", [""])[0]
                task = server.store.next_task(labeler)
                return self._json(200, task) if task else self._send(204, b"", "application/json")
            if url.path == "/api/progress":
                return self._json(200, {**server.store.progress(), "policy_version": server.policy_version})
            return self._json(404, {"error": f"no such endpoint: GET {url.path}"})

        def do_POST(self):  # noqa: N802 - http.server API
            url = urlparse(self.path)
            if not self._auth():
                return None
            if url.path != "/api/rankings":
                return self._json(404, {"error": f"no such endpoint: POST {url.path}"})
            body = self._body()
            if body is None:
                return None
            missing = [k for k in ("task_id", "policy_version", "labeler", "ranking") if k not in body]
            if missing:
                return self._json(400, {"error": f"missing field(s): {', '.join(missing)}"})
            try:
                cid = server.store.submit(body["task_id"], body["ranking"], body["policy_version"], body["labeler"],
                                          body.get("ties", []))
            except RankingError as e:
                return self._json(e.status, {"error": str(e)})
            return self._json(200, {"comparison_id": cid})

        def _auth(self) -> bool:
            if server.authorized(self.headers.get("Authorization")):
                return True
            self._json(401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"})
            return False

        def _body(self) -> dict | None:
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY:
                self._json(400, {"error": f"a JSON body of 1..{MAX_BODY} bytes is required"})
                return None
            try:
                body = json.loads(self.rfile.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._json(400, {"error": f"body is not JSON: {e}"})
                return None
            if not isinstance(body, dict):
                self._json(400, {"error": "body must be a JSON object"})
                return None
            return body

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _send(self, code: int, data: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if data:
                self.wfile.write(data)

        def log_message(self, fmt, *args):  # requests at debug level: the token is never in them
            log.debug("%s " + fmt, self.address_string(), *args)

    return Handler


class FeedbackService:
    """The Ray actor hosting the server (``ray.remote`` is applied where it is spawned). The
    trainer adds tasks and reads comparisons through actor calls; people and labelers use HTTP."""

    def __init__(self, db_path: str, *, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 task_ttl_s: float = 3600.0):
        self.server = FeedbackServer(db_path, host=host, port=port, token=token, task_ttl_s=task_ttl_s)
        log.info("feedback service at %s (database %s)", self.server.url, db_path)

    def __repr__(self) -> str:
        return "FeedbackService"

    def url(self) -> str:
        return self.server.url

    def pid(self) -> int:
        return os.getpid()

    def add_tasks(self, prompt_completions: list[tuple[str, list[str]]], policy_version: int) -> list[str]:
        self.server.policy_version = policy_version
        return self.server.store.add_tasks(prompt_completions, policy_version)

    def comparisons(self, after_id: int = 0) -> list:
        return self.server.store.comparisons(after_id)

    def progress(self) -> dict[str, int]:
        return self.server.store.progress()

    def close(self) -> None:
        self.server.close()
