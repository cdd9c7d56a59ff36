"""Where a run's checkpoints and exports live: a local directory or cluster storage named by a
URI (``s3://bucket/run``, ``gs://...``, any fsspec protocol), so a multi-node run needs no
shared disk.

Writers never write to the store directly: they write into a local directory
(:func:`local_dir`), whose files are uploaded when the block ends without error. Every DeepSpeed
rank does this for its own shard on its own node; the driver writes the checkpoint's
``COMPLETE`` marker last, after every rank's upload has returned, so a checkpoint interrupted
mid-upload (a killed process, a lost node) has no marker and is never resumed from. Readers
fetch a whole directory into a local temporary one (:func:`fetched`). Local paths go through
the same functions and are used in place (no copies).

Credentials and endpoints come from the environment, as the file system's library reads them
(e.g. ``AWS_ACCESS_KEY_ID`` / ``AWS_ENDPOINT_URL`` for s3fs, instance roles on a cluster); they
are never part of the config, the logs or the checkpoints.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rlhf_ray.faults import maybe_fail


def is_uri(path: str | Path) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are local paths)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for paths and URIs alike."""
    return "/".join([str(root).rstrip("/"), *parts])


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def uri_error(uri: str) -> str:
    """Why ``uri`` cannot be used (unknown protocol, library not installed), or ""."""
    if not is_uri(uri):
        return ""
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        return f"cannot open {protocol}:// locations: {e}"
    return ""


def upload(local: str | Path, uri: str) -> list[str]:
    """Copy every file under ``local`` to ``uri/<relative path>`` (sorted by path); returns the
    relative paths. Fault point ``storage@upload:<uri>#n`` fires after the n-th file of an upload
    to ``uri`` (e.g. a checkpoint's ``.../step_00000002/policy``), in whichever process uploads it."""
    fs, root = _fs(uri)
    done = []
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        fs.put_file(str(path), f"{root.rstrip('/')}/{rel}")
        done.append(rel)
        maybe_fail("storage", f"upload:{uri}")
    return done


@contextlib.contextmanager
def local_dir(target: str | Path) -> Iterator[str]:
    """A local directory to write ``target``'s files into: ``target`` itself when it is a local
    path; for a URI a temporary directory uploaded to it when the block ends without error."""
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield str(target)
        return
    tmp = tempfile.mkdtemp(prefix="rlhf_ray-upload-")
    try:
        yield tmp
        upload(tmp, str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def fetched(source: str | Path) -> Iterator[str]:
    """A local directory holding ``source``'s files: ``source`` itself when local, else a
    temporary download of everything under the URI (removed when the block ends)."""
    if not is_uri(source):
        yield str(source)
        return
    fs, root = _fs(str(source))
    fs.invalidate_cache()
    tmp = tempfile.mkdtemp(prefix="rlhf_ray-download-")
    try:
        root = root.rstrip("/")
        for remote in fs.find(root):
            dest = Path(tmp, remote[len(root) + 1 :])
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- small-file operations the driver's checkpoint bookkeeping needs


def exists(path: str | Path) -> bool:
    if not is_uri(path):
        return Path(path).is_file()
    fs, p = _fs(str(path))
    fs.invalidate_cache()  # another process (a rank, an earlier run) may have written it
    return fs.isfile(p)


def read_text(path: str | Path) -> str:
    if not is_uri(path):
        return Path(path).read_text(encoding="utf-8")
    fs, p = _fs(str(path))
    return fs.cat_file(p).decode("utf-8")


def write_text(path: str | Path, text: str) -> None:
    """Write a small file; atomic on both kinds (local: temp file + rename; object stores: a
    single PUT is all-or-nothing)."""
    if not is_uri(path):
        import os

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    fs, p = _fs(str(path))
    fs.pipe_file(p, text.encode("utf-8"))


def subdirs(root: str | Path, prefix: str) -> list[str]:
    """Names of the entries directly under ``root`` that start with ``prefix`` (sorted)."""
    if not is_uri(root):
        r = Path(root)
        return sorted(p.name for p in r.glob(f"{prefix}*") if p.is_dir()) if r.is_dir() else []
    fs, p = _fs(str(root))
    fs.invalidate_cache()
    if not fs.exists(p):
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False, refresh=True)]
    return sorted(n for n in names if n.startswith(prefix))


def remove_tree(path: str | Path) -> None:
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = _fs(str(path))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=True)
