"""Local copies of a gs:// cache's shards, made in the background while training reads on.

Reading a record from gs:// is one range request (ArrayRecord's own GCS reader); for ~100 KB
latents that costs several times the CPU of a local read, and the loader falls far short of the
step. A shard downloaded whole is one request for ~1,000 records. So the loader starts reading
every record from gs:// at once, while one background thread downloads the shards, in the order
of the cache, into a local folder until `data.local_shard_cache_gb` is used; from the moment a
shard's copy is complete its records are read from local disk. Training never waits for a
download, and a cache larger than the budget is read partly locally, partly from gs://.

Copies live under <user cache>/sdxl_jax/shards/gs/<bucket>/<key> (paths.local_mirror_dir;
SDXL_JAX_CACHE_DIR moves it) and are reused by later runs when their size is the object's; a
download is written to a temporary name and renamed once complete, so a killed run leaves no
partial shard in use. Local caches are read in place (no copy).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

from sdxl_jax import paths

log = logging.getLogger(__name__)

# complete copies made by this process, shared by its loaders (train and val read the same
# shards); one download at a time
_READY: dict[str, str] = {}
_LOCK = threading.Lock()


class ShardMirror:
    """Which shard URLs have a complete local copy; `local(url)` is that copy's path or None."""

    def __init__(self, files: Sequence[str], budget_bytes: float):
        self._enabled = budget_bytes > 0
        self._stop = threading.Event()
        remote = [f for f in dict.fromkeys(files) if paths.is_remote(f)]
        self._thread = None
        if remote and budget_bytes > 0:
            self._thread = threading.Thread(target=self._copy_all, args=(remote, budget_bytes),
                                            name="shard-mirror", daemon=True)
            self._thread.start()

    def local(self, url: str) -> str | None:
        return _READY.get(url) if self._enabled else None

    def _copy_all(self, urls: Sequence[str], budget: float) -> None:
        used = 0
        for url in urls:
            if self._stop.is_set():
                return
            try:
                size = paths.size(url)
                if size is None:
                    raise FileNotFoundError(f"{url}: no such object")
                if used + size > budget:
                    log.info("local shard cache full (data.local_shard_cache_gb): the remaining "
                             "shards of %s are read from gs://", os.path.dirname(url))
                    return
                with _LOCK:
                    if url not in _READY:
                        local = paths.local_mirror_dir(url, "shards")
                        if not (os.path.isfile(local) and os.path.getsize(local) == size):
                            paths.download(url, local)
                        _READY[url] = local
                used += size
            except Exception as e:  # noqa: BLE001 — the records are still read from gs://
                log.warning("could not copy the shard %s to local disk (%s: %s); its records are "
                            "read from gs://", url, type(e).__name__, str(e)[:200])

    def close(self) -> None:
        self._stop.set()
