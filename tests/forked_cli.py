"""Run several ``python -m MODULE ARGS...`` command lines at once as real processes, forked from
one interpreter that imported their heavy dependencies (torch, transformers, datasets, Ray,
Hydra) once. Each child gets the argv, ``sys.path[0]``, ``__main__`` and exit status
``python -m`` would give it (``runpy.run_module(..., alter_sys=True)``, the code path of ``-m``),
its own stdout/stderr files and a fresh run of the entry module itself; only the interpreter's
start-up and the shared imports are paid once (each costs ~5 s of CPU: nine of them at once took
~26 s on 2 cores).

Run as a script (a fresh interpreter, never forked from pytest, which may hold a Ray
connection and threads): ``python tests/forked_cli.py SPEC.json OUT_DIR``. SPEC maps a name to
``[module, arg, ...]``; each child writes ``OUT_DIR/<name>.stdout``/``.stderr``; the script
prints ``{name: returncode}`` as JSON."""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

# What the entry points import at module level (each stays importable on its own).
PRELOAD = ["torch", "transformers", "datasets", "ray", "hydra", "omegaconf", "rlhf_ray.config",
           "rlhf_ray.stage_config", "rlhf_ray.runtime", "rlhf_ray.models", "rlhf_ray.data"]


def exit_status(e: SystemExit) -> int:
    """The process exit status Python gives ``raise SystemExit(e.code)`` at top level."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def child(module: str, args: list[str], out: Path) -> None:
    """In the forked child: stdout/stderr to files, then the module as ``python -m`` runs it."""
    for fd, suffix in ((1, "stdout"), (2, "stderr")):
        f = os.open(out.with_suffix(f".{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [module, *args]  # run_module(alter_sys=True) sets argv[0] to the module's file, as -m does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = exit_status(e)
    except BaseException:  # noqa: BLE001 -- an uncaught error: traceback on stderr, status 1
        traceback.print_exc()
        status = 1
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(spec_file: str, out_dir: str) -> None:
    spec: dict[str, list[str]] = json.loads(Path(spec_file).read_text())
    sys.path[0] = os.getcwd()  # as under -m (not this script's directory)
    for name in PRELOAD:
        __import__(name)
    pids = {}
    for name, (module, *args) in spec.items():
        pid = os.fork()
        if pid == 0:
            child(module, args, Path(out_dir) / name)
        pids[pid] = name
    codes = {}
    while pids:
        pid, status = os.wait()
        codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))


if __name__ == "__main__":
    main(*sys.argv[1:])
