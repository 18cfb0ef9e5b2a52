"""Run, cache and dataset paths: a local path or a `gs://bucket/key` URL, one set of functions.

Local paths behave exactly as `os`/`open` would (made absolute, `~` expanded). URLs go through
`etils.epath` (gcsfs underneath), the layer Orbax itself uses, so the trainer, the checkpoints and
the readers of a run agree on what exists. Paths stay plain strings: call sites join them with
`join` and hand them to Orbax, TensorStore and JAX, which take `gs://` URLs themselves.

Object storage has no append and no rename: every write here replaces a whole object (`write_text`
/ `write_bytes`; locally through a temporary file and `os.replace`, so a reader never sees half a
file), and a caller that keeps a growing file (a log) keeps it locally and uploads it whole.

A storage service that stops answering surfaces as `StorageError`, one line naming the path.
This module's own writes, and `check_reachable` (which the checkpointer calls before each save,
so that no save starts into an outage), give up after `timeout_s()` seconds of retrying
(SDXL_JAX_STORAGE_TIMEOUT_S, default 120): a blip is ridden out, an outage ends the run with that
line, and the rerun resumes from the last committed checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Iterator

REMOTE_SCHEMES = ("gs://",)
TIMEOUT_S = 120.0


def timeout_s() -> float:
    return float(os.environ.get("SDXL_JAX_STORAGE_TIMEOUT_S") or TIMEOUT_S)


class StorageError(OSError):
    """Remote storage did not answer (or refused) an operation on a path; names the path."""


class _QuietRetries(logging.Filter):
    """gcsfs logs each request it gives up on with a whole traceback; StorageError says it in
    one line naming the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "out of retries" not in str(record.msg)


logging.getLogger("gcsfs").addFilter(_QuietRetries())
logging.getLogger("fsspec.caching").setLevel(logging.WARNING)  # an INFO line per file opened


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def absolute(path) -> str:
    """A local path absolute with `~` expanded; a URL as given without a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base, *parts) -> str:
    """`os.path.join` for both kinds (a URL joins with "/")."""
    return os.path.join(os.fspath(base), *parts)


def _blob(url: str):
    """The google-cloud-storage blob of gs://bucket/key (one client per process)."""
    global _CLIENT
    if _CLIENT is None:
        from google.cloud import storage
        _CLIENT = storage.Client()
    bucket, _, key = url[len("gs://"):].partition("/")
    return _CLIENT.bucket(bucket).blob(key)


_CLIENT = None


def _bounded() -> dict:
    """Retry and per-request timeout of this module's own requests: at most timeout_s()."""
    from google.api_core.retry import Retry
    t = timeout_s()
    return {"retry": Retry(timeout=t, initial=0.5, maximum=min(8.0, t)), "timeout": min(60.0, t)}


def check_reachable(path) -> None:
    """Raise StorageError naming `path` when its bucket does not answer within timeout_s()."""
    path = absolute(path)
    if is_remote(path):
        call_remote("reach", path, lambda: _blob(path).bucket.exists(**_bounded()))


def epath(path):
    """The `etils.epath.Path` of `path` (for the few callers that need its whole API)."""
    from etils import epath as _epath
    return _epath.Path(absolute(path))


def call_remote(op: str, path: str, fn, *args):
    """Run a remote operation; an unreachable service becomes one StorageError naming the path
    (missing objects stay FileNotFoundError, as locally)."""
    try:
        return fn(*args)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 — aiohttp, google-auth and gcsfs raise many kinds
        if not is_unreachable(e):
            raise
        raise StorageError(f"cannot {op} {path}: storage did not answer ({type(e).__name__}: "
                           f"{str(e)[:200]}); check the bucket and the network, then rerun the same "
                           "command") from e


def is_unreachable(exc: BaseException) -> bool:
    """A connection-level failure anywhere in the exception's chain (refused, reset, timed out,
    retries exhausted), as opposed to a missing object or a refused permission."""
    for e in exception_chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _UNREACHABLE:
            return True
        if any(s in str(e) for s in ("Connection refused", "UNAVAILABLE", "Cannot connect to host")):
            return True
    return False


_UNREACHABLE = ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                "ServiceUnavailable", "RetryError", "TransportError")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception in its cause / context chain and exception groups, once each."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def exists(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.exists(path)
    return call_remote("check", path, lambda: epath(path).exists())


def isdir(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.isdir(path)
    return call_remote("check", path, lambda: epath(path).is_dir())


def isfile(path) -> bool:
    path = absolute(path)
    if not is_remote(path):
        return os.path.isfile(path)
    return call_remote("check", path, lambda: epath(path).is_file())


def size(path) -> int | None:
    """Bytes of the file/object at `path`, None when there is none."""
    path = absolute(path)
    if not is_remote(path):
        return os.path.getsize(path) if os.path.isfile(path) else None

    def stat():
        from google.api_core.exceptions import NotFound
        blob = _blob(path)
        try:
            blob.reload(**_bounded())
        except NotFound:
            return None
        return int(blob.size)
    return call_remote("check", path, stat)


def listdir(path) -> list[str]:
    """Names directly under `path` (FileNotFoundError when it does not exist)."""
    path = absolute(path)
    if not is_remote(path):
        return os.listdir(path)

    def names():
        p = epath(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        return [c.name for c in p.iterdir()]
    return call_remote("list", path, names)


def makedirs(path) -> None:
    """Create a directory and its parents (on GCS, where folders are only key prefixes, a
    no-op that still checks the bucket answers)."""
    path = absolute(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    call_remote("create", path, lambda: epath(path).mkdir(parents=True, exist_ok=True))


def rmtree(path) -> None:
    path = absolute(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    p = epath(path)
    call_remote("delete", path, lambda: p.rmtree() if p.exists() else None)


def remove(path) -> None:
    """Delete one file/object; a missing one is fine."""
    path = absolute(path)
    if not is_remote(path):
        if os.path.lexists(path):
            os.unlink(path)
        return
    call_remote("delete", path, lambda: epath(path).unlink(missing_ok=True))


def rename(src, dst) -> None:
    """Move a file or directory (on GCS: copy every object, then delete the source)."""
    src, dst = absolute(src), absolute(dst)
    if not (is_remote(src) or is_remote(dst)):
        os.rename(src, dst)
        return
    call_remote("rename", src, lambda: epath(src).rename(epath(dst)))


def read_bytes(path) -> bytes:
    path = absolute(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    return call_remote("read", path, lambda: epath(path).read_bytes())


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Replace the whole file/object at `path` (parents created); a reader sees the old or the
    new content, never a part."""
    path = absolute(path)
    if is_remote(path):
        call_remote("write", path, lambda: _blob(path).upload_from_string(data, **_bounded()))
        _forget_listings(path)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def upload(local_file: str, path) -> None:
    """Copy a local file to `path` (a URL or a local path), replacing it whole."""
    path = absolute(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(local_file, path)
        return
    call_remote("upload to", path, lambda: _blob(path).upload_from_filename(local_file, **_bounded()))
    _forget_listings(path)


def download(url: str, local_file: str) -> None:
    """Copy the object `url` to `local_file` (checksummed by the storage client; written under a
    temporary name and renamed when complete)."""
    os.makedirs(os.path.dirname(local_file), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local_file), suffix=".tmp")
    os.close(fd)
    try:
        call_remote("download", url, lambda: _blob(url).download_to_filename(tmp, **_bounded()))
        os.replace(tmp, local_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _forget_listings(url: str) -> None:
    """gcsfs caches folder listings, and an object written through the storage client is not in
    them: drop the cached listings of its folders, or epath's exists/isfile would miss it."""
    p = epath(url)
    fs = getattr(p._backend, "fs", None)
    if fs is not None:
        fs(url).invalidate_cache(url)


def upload_tree(local: str, path) -> None:
    """A local file, or every file under a local directory, to the same names under `path`."""
    if os.path.isfile(local):
        upload(local, path)
        return
    for rel in walk_files(local):
        upload(os.path.join(local, rel), join(path, rel))


def walk_files(path) -> Iterator[str]:
    """Every file below a directory, as paths relative to it (sorted; on GCS one paged listing
    of the prefix instead of a request per folder)."""
    path = absolute(path)
    if is_remote(path):
        prefix = _blob(path + "/").name
        names = call_remote("list", path, lambda: sorted(
            b.name[len(prefix):] for b in _CLIENT.list_blobs(_blob(path).bucket, prefix=prefix)))
        yield from (n for n in names if n and not n.endswith("/"))
        return
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            yield os.path.relpath(os.path.join(root, name), path)


def local_mirror_dir(path, kind: str) -> str:
    """A local directory standing in for remote `path` (files kept on this host, e.g. a log
    written a record at a time and uploaded whole): <user cache>/sdxl_jax/<kind>/<bucket>/<key>.
    A local `path` is returned as is."""
    path = absolute(path)
    if not is_remote(path):
        return path
    scheme, rest = path.split("://", 1)
    return os.path.join(user_cache_dir(), kind, scheme, rest)


def user_cache_dir() -> str:
    """This user's sdxl_jax cache on this host: SDXL_JAX_CACHE_DIR, else ~/.cache/sdxl_jax."""
    return os.environ.get("SDXL_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "sdxl_jax")
