"""Loopback helpers of the e2e tests that start Ray nodes of their own."""

from __future__ import annotations

import socket
import urllib.request


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a Ray node's command-line port options (Ray binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    """The Prometheus text of ``http://127.0.0.1:<port>/metrics``, or "" while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            return r.read().decode()
    except OSError:
        return ""
