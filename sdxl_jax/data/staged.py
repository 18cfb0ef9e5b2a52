"""`build_cache` into a gs:// cache. ArrayRecord writes local files only, so the cache is built in
a local stand-in folder (`paths.local_mirror_dir(out, "caches")`: a rerun on this host resumes
there, keeping its finished shards) and its files are uploaded once the build is complete, the
manifest last: a reader that finds the manifest finds every shard, and an interrupted upload
leaves a cache without one, which readers refuse and the next build completes.

Several hosts building one gs:// cache each build their own parts locally, where process 0 cannot
see the others' shards: build a gs:// cache from one process (or build on a filesystem all hosts
share and upload that folder).
"""
from __future__ import annotations

import os

from sdxl_jax import paths
from sdxl_jax.data import cache as C


def build_cache(config, *args, out: str | None = None, **kwargs) -> dict:
    """sdxl_jax.data.build.build_cache, with a gs:// `out` (or data.cache_dir) built locally and
    uploaded."""
    from sdxl_jax.data.build import build_cache as build
    out = out or config.data.cache_dir or None
    if not (out and paths.is_remote(out)):
        return build(config, *args, out=out, **kwargs)
    count = kwargs.get("process_count")
    if count is None:
        import jax
        count = jax.process_count()
    if count > 1:
        raise ValueError(f"--out {out}: a gs:// cache is built by one process (each host would "
                         "build its parts in its own local folder); run build_cache on one host "
                         "(on a TPU pod slice: worker 0 with TPU_WORKER_HOSTNAMES=localhost), or "
                         "build on a filesystem all hosts share")
    local = paths.local_mirror_dir(out, "caches")
    manifest = build(config, *args, out=local, **kwargs)
    upload_cache(local, out)
    return manifest


def upload_cache(local: str, url: str) -> None:
    """Upload a finished cache folder: every file whose object is missing or of another size,
    then the manifest (always, last)."""
    files = [r for r in paths.walk_files(local)
             if r != C.MANIFEST and not os.path.basename(r).startswith(".")
             and not r.endswith(".tmp")]
    for rel in files:
        src, dst = os.path.join(local, rel), paths.join(url, rel)
        if paths.size(dst) != os.path.getsize(src):
            paths.upload(src, dst)
    paths.upload(os.path.join(local, C.MANIFEST), paths.join(url, C.MANIFEST))
