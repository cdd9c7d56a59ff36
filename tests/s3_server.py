"""An S3-compatible server on loopback for the storage tests (moto's server mode, as Ray's and
pyarrow's own tests use), with the environment that points s3fs / boto at it.

The server runs in its own process: moto's server is a Flask app, and importing Flask into the
test process puts werkzeug's context proxies into its modules, which vLLM's CPU start-up
(``register_triton_kernel_overrides`` walks every module's globals) trips over ("Working
outside of application context") when a test builds a ``vllm.LLM`` in-process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the moto S3 server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the moto S3 server did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@contextmanager
def s3_server(bucket: str = "rlhf-test") -> Iterator[dict[str, str]]:
    """Start the server, create ``bucket``, set the environment; yields that environment."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        # throwaway values: the moto server accepts any credentials
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait_for(port, proc)
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
