"""Build the latent cache: scan inputs, fit each image to its bucket, VAE-encode, write shards.

Phases (each process of a multi-host job does its share, `sources[process_index::process_count]`):
  1. settings: refuse to add to a cache built with other settings unless `rebuild`;
  2. scan: caption + image header of every source (threads) → bucket, fit, or a skip reason;
  3. shards: per bucket, chunks of `data.shard_size` images; a chunk whose summary already
     exists with the same sources is kept (resume), others are decoded (threads, ahead of the
     encoder), encoded in fixed-size batches (one compile per bucket) and written;
  4. finalize (process 0, after a barrier): manifest.json, tags.json, skipped.jsonl.

One build per cache folder: a second `build_cache` on the same folder stops at once naming the
first (`CacheLock`, the workdir lock's flock). A full disk stops the build with one line
"no space left on DIR" and removes the shard it was writing; finished shards stay, so a rerun
after freeing space continues. Mask files added after a build are named with --rebuild (a
resumed build keeps finished shards as they are).

A gs:// `out` (paths) gets the same files: ArrayRecord writes only local files, so each shard is
written to a temporary local file and uploaded whole before its summary; the lock is a heartbeat
object (workdir_lock.ObjectLock).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm.auto import tqdm

from sdxl_jax import paths
from sdxl_jax.data import cache as C
from sdxl_jax.data.buckets import Bucket, Fit, assign_bucket, buckets_from_config, fit_cover, time_ids
from sdxl_jax.data.images import (BadInput, Source, list_folder, list_manifest, load_pixels_and_mask,
                                  mask_file, mask_to_latent, probe_size, read_caption)
from sdxl_jax.data.tags import normalize_tags, tag_counts
from sdxl_jax.workdir_lock import ObjectLock, WorkdirLock

log = logging.getLogger(__name__)

# images (B, H, W, 3) float32 in [-1, 1] → (mean, std), each (B, H/f, W/f, C)
EncodeFn = Callable[[np.ndarray], tuple[Any, Any]]
_SHARD_FILE = re.compile(r"^b\d{5}x\d{5}-p\d{4}of\d{4}-\d{6}\.")


class NoSpaceError(OSError):
    """The disk filled while building a cache (the message names the folder)."""


class CacheLock(WorkdirLock):
    """One `build_cache` per cache folder and process index: `<out>/build_cache.<i>.lock`."""

    def __init__(self, out, process_index: int = 0):
        super().__init__(str(out), process_index)
        self.path = os.path.join(os.path.abspath(out), f"build_cache.{int(process_index)}.lock")

    def busy(self, holder: str) -> str:
        return (f"cache folder {os.path.dirname(self.path)} is being built by another build_cache "
                f"({holder}): wait for it to finish, stop it, or give another --out")


class CacheObjectLock(ObjectLock):
    """CacheLock of a gs:// cache folder: the heartbeat lock object `<out>/build_cache.<i>.lock`."""

    def __init__(self, out: str, process_index: int = 0):
        super().__init__(out, process_index)
        self.path = paths.join(out, f"build_cache.{int(process_index)}.lock")


def cache_lock(out: str, process_index: int = 0):
    return CacheObjectLock(out, process_index) if paths.is_remote(out) else CacheLock(out, process_index)


@dataclass(frozen=True)
class Item:
    """One image that passed the scan: where it goes and how it is cut."""
    src: Source
    caption: str
    tags: list[str]
    size: tuple[int, int]  # displayed (w, h)
    bucket: int
    fit: Fit


def _check_config(d) -> None:
    """Fail before any work on data.* values the build cannot use, naming the key."""
    if d.latents_dtype not in ("float16", "float32"):
        raise ValueError(f"data.latents_dtype={d.latents_dtype!r}: use 'float16' or 'float32'")
    if d.buckets.crop not in ("random", "center"):
        raise ValueError(f"data.buckets.crop={d.buckets.crop!r}: use 'random' or 'center'")
    for key in ("shard_size", "build_batch_size", "max_image_pixels"):
        if int(d[key]) <= 0:
            raise ValueError(f"data.{key}={d[key]!r}: must be positive")


def cache_settings(config, vae_fingerprint: str, source: str) -> dict[str, Any]:
    """Everything the cached bytes depend on; a resume requires all of it unchanged."""
    d, b = config.data, config.data.buckets
    return {
        "format": C.FORMAT, "version": C.VERSION, "source": source, "vae": vae_fingerprint,
        "buckets": [list(x) for x in buckets_from_config(b)],
        "max_ar_error": float(b.max_ar_error), "crop": b.crop, "crop_seed": int(b.crop_seed),
        "latents_dtype": d.latents_dtype, "store_std": bool(d.store_std),
        "shard_size": int(d.shard_size), "max_image_pixels": int(d.max_image_pixels),
        "min_image_pixels": int(d.min_image_pixels),
    }


def _source_desc(images_dir: str | None, manifest: str | None, tfds=None) -> str:
    if bool(images_dir) + bool(manifest) + (tfds is not None) != 1:
        raise ValueError("give exactly one input: images_dir (folder of images + .txt), "
                         "manifest (JSONL of {\"path\", \"caption\"}) or tfds (a prepared TFDS "
                         "dataset, NAME[:SPLIT])")
    if tfds is not None:
        return tfds.description
    return f"images:{paths.absolute(images_dir)}" if images_dir else f"manifest:{paths.absolute(manifest)}"


# The processes of a build wait for each other's shards: one host may encode for hours longer
_BUILD_WAIT_S = 7 * 24 * 3600.0


def _barrier(name: str, process_count: int) -> None:
    if process_count > 1:
        from sdxl_jax.parallel import host_barrier
        host_barrier(name, _BUILD_WAIT_S)


def _remove_cache_files(out: str) -> None:
    """Delete what a build writes, and nothing else (`out` may be a shared folder)."""
    paths.rmtree(paths.join(out, C.PARTS))
    for name in paths.listdir(out):
        f = paths.join(out, name)
        if (_SHARD_FILE.match(name) or name in C.CACHE_FILES) and paths.isfile(f):
            paths.remove(f)


def _prepare_dir(out: str, settings: dict, rebuild: bool, process_index: int, process_count: int) -> None:
    """Create or check `out`; with `rebuild`, process 0 empties it first."""
    path = paths.join(out, C.SETTINGS)
    if not rebuild and paths.exists(path):
        old = C.read_json(path)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"cache {out} was built with different settings ({', '.join(diff)}); "
                             "refusing to mix them: pass --rebuild (rebuild=True) to start over, "
                             "or choose another --out")
    _barrier("build_cache:checked", process_count)
    if process_index == 0:
        if rebuild and paths.isdir(out):
            _remove_cache_files(out)
        paths.makedirs(paths.join(out, C.PARTS))
        C.write_json(path, settings)
    _barrier("build_cache:prepared", process_count)


def _scan_one(src: Source, config, buckets: Sequence[Bucket]) -> Item | tuple[str, str]:
    """An Item, or (key, reason) when the input cannot be used."""
    d = config.data
    try:
        image, caption = src.read() if src.read else (src.path, None)  # a TFDS record, or a file
        w, h = probe_size(image, d.max_image_pixels)
        if w * h < d.min_image_pixels:
            raise BadInput(f"too small: {w}x{h} = {w * h} < data.min_image_pixels = {d.min_image_pixels}")
        idx, err = assign_bucket(w, h, buckets)
        if err > d.buckets.max_ar_error:
            raise BadInput(f"aspect ratio too extreme: {w}x{h}, |log ar error| {err:.3f} to the nearest "
                           f"bucket {buckets[idx][0]}x{buckets[idx][1]} > data.buckets.max_ar_error "
                           f"= {d.buckets.max_ar_error}")
        caption = read_caption(src) if caption is None else caption
    except BadInput as e:
        return src.key, str(e)
    rng = np.random.default_rng([d.buckets.crop_seed, int(C.key_fraction(src.key) * 2**53)])
    fit = fit_cover(w, h, buckets[idx], d.buckets.crop, rng)
    return Item(src, caption, normalize_tags(caption), (w, h), idx, fit)


def _decode_workers(config) -> int:
    return max(1, int(config.data.decode_workers or os.cpu_count() or 1))


def _scanned(pool: ThreadPoolExecutor, sources: Sequence[Source], config, buckets: Sequence[Bucket]):
    """(source, Item or (key, skip reason)) of each source, headers read in `pool`, in order."""
    return zip(sources, pool.map(lambda s: _scan_one(s, config, buckets), sources))


def scan_buckets(config, images_dir: str | None = None, manifest: str | None = None) -> dict[str, int]:
    """{key: bucket index} of every input build_cache would cache from this folder or manifest
    (image headers only, no decoding): which buckets a cache not yet built will fill."""
    sources, _ = list_folder(images_dir) if images_dir else list_manifest(manifest)
    buckets = buckets_from_config(config.data.buckets)
    with ThreadPoolExecutor(_decode_workers(config)) as pool:
        return {it.src.key: it.bucket for _, it in _scanned(pool, sources, config, buckets)
                if isinstance(it, Item)}


def _decoded(items: Sequence[Item], pool: ThreadPoolExecutor, config, buckets,
             batch: int) -> Iterator[list[tuple[Item, tuple[np.ndarray, np.ndarray | None] | str]]]:
    """Batches of (item, (pixels, pixel mask or None) or skip reason), decoded by `pool` up to
    three batches ahead. The mask: x.mask.png next to a file x.png / x.jpg, else its alpha."""
    def load(it: Item):
        try:
            image = it.src.read()[0] if it.src.read else it.src.path
            mask = None if it.src.read else mask_file(it.src.path)
            return load_pixels_and_mask(image, config.data.max_image_pixels, it.fit, buckets[it.bucket],
                                        mask if mask and paths.isfile(mask) else None)
        except BadInput as e:
            return str(e)
    pending: deque = deque()
    todo = iter(items)
    for it in todo:
        pending.append((it, pool.submit(load, it)))
        if len(pending) >= 3 * batch:
            break
    while pending:
        out = []
        while pending and len(out) < batch:
            it, fut = pending.popleft()
            out.append((it, fut.result()))
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
        yield out


def _write_shard(out: str, name: str, items: Sequence[Item], encode: EncodeFn, config,
                 buckets, pool, settings_id: str, batch: int, bar) -> dict:
    """Encode and write one chunk; return its summary (also written as <name>.json)."""
    dtype = np.dtype(config.data.latents_dtype)
    bucket = buckets[items[0].bucket]
    stats, records, skipped, shape = C.LatentStats(), [], [], None
    # ArrayRecord writes local files only: a gs:// shard is written to a local temporary file
    # and uploaded whole once complete, its summary after it
    staging = tempfile.mkdtemp(prefix="sdxl_jax_shard_") if paths.is_remote(out) else out
    tmp = os.path.join(staging, name + C.SHARD_EXT + ".tmp")
    final = paths.join(out, name + C.SHARD_EXT)
    try:  # a failed write (a full disk) leaves no half shard: it frees the space it took
        writer = ArrayRecordWriter(tmp, C.WRITER_OPTIONS)
        try:
            for group in _decoded(items, pool, config, buckets, batch):
                good = [(it, px) for it, px in group if not isinstance(px, str)]
                skipped += [{"key": it.src.key, "path": it.src.path, "reason": px}
                            for it, px in group if isinstance(px, str)]
                if good:
                    pixels = np.stack([px for _, (px, _) in good])
                    pad = batch - len(good)  # fixed batch: one compiled encoder per bucket
                    if pad:
                        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
                    mean, std = encode(pixels)
                    with np.errstate(over="ignore"):  # overflow → inf → skipped just below
                        mean = np.asarray(mean)[:len(good)].astype(dtype)
                    std = np.asarray(std)[:len(good)] if config.data.store_std else None
                    finite = np.isfinite(mean).reshape(len(good), -1).all(axis=1)
                    skipped += [{"key": it.src.key, "path": it.src.path,
                                 "reason": f"non-finite latent (VAE output beyond {dtype.name})"}
                                for (it, _), ok in zip(good, finite) if not ok]
                    stats.update(mean[finite])
                    shape = list(mean.shape[1:])
                    for i, (it, (_, mask)) in enumerate(good):
                        if not finite[i]:
                            continue
                        tids = time_ids(*it.size, it.fit, bucket)
                        mask = None if mask is None else mask_to_latent(mask, mean.shape[1:3])
                        writer.write(C.encode_record(mean[i], None if std is None else std[i],
                                                     it.caption, it.tags, tids, it.src.key, mask))
                        entry = {"key": it.src.key, "tags": it.tags}
                        records.append(entry if mask is None else dict(entry, mask=True))
                bar.update(len(group))
        finally:
            writer.close()
        nbytes = os.path.getsize(tmp)  # checked on resume/open
        if staging == out:
            os.replace(tmp, final)
        else:
            paths.upload(tmp, final)
    finally:
        if staging != out:
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    summary = {"name": name, "bucket": list(bucket), "latent_shape": shape, "bytes": nbytes,
               "settings_id": settings_id, "sources": [it.src.key for it in items],
               "records": records, "skipped": skipped, "latent_stats": stats.to_dict()}
    C.write_json(paths.join(out, name + ".json"), summary)
    return summary


def _warn_new_masks(out: str, kept: Sequence[tuple[Sequence[Item], dict]]) -> None:
    """Warn when a mask file (x.mask.png) now lies beside an image whose record in a finished
    shard holds no mask: a resumed build keeps finished shards as they are."""
    new = []
    for items, summary in kept:
        masked = {r["key"]: bool(r.get("mask")) for r in summary["records"]}
        new += [mask_file(it.src.path) for it in items
                if not it.src.read and not masked.get(it.src.key, True)
                and paths.isfile(mask_file(it.src.path))]
    if new:
        log.warning("build_cache: mask files added after %s was built are not in it (%d, e.g. "
                    "%s): a resumed build keeps finished shards as they are; rerun with --rebuild "
                    "to cache them", out, len(new), new[0])


def _chunks(items: Sequence[Item], buckets, size: int, process_index: int,
            process_count: int) -> list[tuple[str, list[Item]]]:
    """(shard name, items): per bucket, the items sorted by key, cut every `size`."""
    chunks = []
    for b in sorted({it.bucket for it in items}):
        in_b = sorted((it for it in items if it.bucket == b), key=lambda it: it.src.key)
        for k in range(0, len(in_b), size):
            chunks.append((C.shard_name(buckets[b], k // size, process_index, process_count),
                           in_b[k:k + size]))
    return chunks


def _existing_summary(out: str, name: str, items: Sequence[Item], sid: str,
                      verify: bool = False) -> dict | None:
    """The summary of an already complete, intact shard with exactly these sources, else None.

    Intact: the file has the size and record count the summary recorded (C.shard_problem);
    with `verify` every record is also read back (Riegeli's chunk hashes catch flipped bytes).
    """
    path = paths.join(out, name + ".json")
    if not paths.exists(path):
        return None
    try:
        summary = C.read_json(path)
    except (OSError, ValueError):
        return None
    if summary.get("settings_id") != sid or summary.get("sources") != [it.src.key for it in items]:
        return None
    shard = paths.join(out, name + C.SHARD_EXT)
    problem = C.shard_problem(shard, len(summary["records"]), summary.get("bytes"))
    if problem is None and verify:
        problem = _read_problem(shard, len(summary["records"]))
    if problem:
        log.warning("build_cache: shard %s is damaged (%s); rebuilding it", shard, problem)
        return None
    return summary


def _read_problem(shard: str, count: int) -> str | None:
    """Read back and decode every record of `shard`; the first error, or None."""
    reader = C.RecordSource([shard], [count])
    try:
        for i in range(count):
            C.decode_record(reader[i])
    except Exception as e:  # Riegeli's RuntimeError (wrapped in CacheError), or a bad record
        return str(e.__cause__ or e)
    finally:
        reader.close()
    return None


def _finalize(out: str, settings: dict, process_count: int) -> dict:
    """Merge every process's part into manifest.json, tags.json and skipped.jsonl (the
    manifest last: a cache without one is unfinished)."""
    parts = [C.read_json(paths.join(out, C.PARTS, f"part-{p:04d}of{process_count:04d}.json"))
             for p in range(process_count)]
    shard_names = sorted(n for part in parts for n in part["shards"])
    stats, skipped, counts, shards, tag_lists = C.LatentStats(), [], Counter(), [], []
    num_masked = 0
    for part in parts:
        skipped += part["scan_skipped"]
    for name in shard_names:
        s = C.read_json(paths.join(out, name + ".json"))
        skipped += s["skipped"]
        if not s["records"]:
            continue
        stats.merge(C.LatentStats.from_dict(s["latent_stats"]))
        counts[C.bucket_key(s["bucket"])] += len(s["records"])
        tag_lists += [r["tags"] for r in s["records"]]
        num_masked += sum(bool(r.get("mask")) for r in s["records"])
        shards.append({"name": name, "bucket": s["bucket"], "count": len(s["records"]),
                       "latent_shape": s["latent_shape"]})
    keep = set(shard_names)
    for f in paths.listdir(out):  # shards of an earlier layout (other inputs or process count)
        if _SHARD_FILE.match(f) and f.split(".")[0] not in keep:
            paths.remove(paths.join(out, f))
    tags = tag_counts(tag_lists)
    C.write_json(paths.join(out, C.TAGS), tags)
    skipped.sort(key=lambda s: s["key"])
    paths.write_text(paths.join(out, C.SKIPPED),
                     "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    freqs = sorted(tags.values())
    manifest = {
        "format": C.FORMAT, "version": C.VERSION, "settings": settings,
        "settings_id": C.settings_id(settings), "vae_fingerprint": settings["vae"],
        "buckets": settings["buckets"],
        "bucket_counts": {C.bucket_key(b): counts.get(C.bucket_key(b), 0) for b in settings["buckets"]},
        "num_records": sum(counts.values()), "num_skipped": len(skipped),
        "num_masked": num_masked,  # records with a loss mask (alpha or x.mask.png)
        "skip_report": C.SKIPPED, "shards": shards,
        "latent_stats": {"count": stats.count, "mean": stats.to_dict()["mean"],
                         "std": stats.to_dict()["std"]},
        "tag_stats": {"file": C.TAGS, "num_tags": len(tags),
                      "median_frequency": float(np.median(freqs)) if freqs else 0.0,
                      "top": [[t, c] for t, c in list(tags.items())[:25]]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    C.write_json(paths.join(out, C.MANIFEST), manifest)
    return manifest


def build_cache(config, images_dir: str | None = None, manifest: str | None = None,
                out: str | None = None, rebuild: bool = False, encode_fn: EncodeFn | None = None,
                encoder_fingerprint: str | None = None, vae_params=None,
                process_index: int | None = None, process_count: int | None = None,
                progress: bool = True, tfds=None, verify: bool = False) -> dict:
    """Build (or finish, or check) the latent cache in `out` and return its manifest.

    `encode_fn` maps images (B, H, W, 3) in [−1, 1] to (mean, std) latents and must come with an
    `encoder_fingerprint`; without it the VAE `vae_params` encodes (the run's VAE, as
    `sdxl_jax.run_inputs.resolve_run(config, workdir).weights.load(("vae",))` gives it).
    `tfds` (instead of images_dir/manifest): a prepared TFDS split, "NAME[:SPLIT]" or a
    sdxl_jax.data.tfds_source.TfdsInput (data dir, image and caption feature names).
    On several hosts every process calls this (default: the JAX process index/count) with `out`
    on a filesystem they all share or on gs://; process 0 writes the manifest once all shards exist.
    Resume keeps a finished shard whose file still has its recorded size and record count and
    rebuilds any other; `verify` also reads every kept record back. Resume trusts that input
    files keep their content under the same name; use rebuild after edits.
    A build that ends with 0 records raises CacheError pointing at skipped.jsonl.
    """
    if not (out or config.data.cache_dir):
        raise ValueError("no cache folder: pass out= (--out) or set data.cache_dir")
    out = paths.absolute(out or config.data.cache_dir)
    tfds = tfds or None  # "": an unset data.tfds
    if tfds is not None and not (images_dir or manifest):
        from sdxl_jax.data.tfds_source import open_tfds  # imports tensorflow_datasets: only here
        tfds = open_tfds(tfds)  # fails now, naming the `tfds build` command, if not prepared
    source = _source_desc(images_dir, manifest, tfds)
    _check_config(config.data)
    sources, scan_skipped = (tfds.sources() if tfds is not None else list_folder(images_dir) if images_dir
                             else list_manifest(manifest))
    if not sources and not scan_skipped:
        raise ValueError(f"no input images in {images_dir or manifest} "
                         "(looked for .jpg/.jpeg/.png/.webp files, recursively)")
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if encode_fn is None:
        if vae_params is None:
            raise ValueError("build_cache needs vae_params (the run's VAE: sdxl_jax.run_inputs."
                             "resolve_run(config, workdir).weights.load(('vae',))['vae']) or an "
                             "encode_fn with its encoder_fingerprint")
        from sdxl_jax.data.encode import make_vae_encoder
        encode_fn, encoder_fingerprint = make_vae_encoder(config, vae_params)
    if not encoder_fingerprint:
        raise ValueError("an injected encode_fn needs an encoder_fingerprint (what the latents depend on)")
    settings = cache_settings(config, encoder_fingerprint, source)
    with cache_lock(out, process_index):
        try:
            return _build(out, config, settings, sources, scan_skipped, encode_fn, rebuild,
                          process_index, process_count, progress, verify)
        except Exception as e:
            from sdxl_jax.checkpoint import is_disk_full
            if not is_disk_full(e):
                raise
            raise NoSpaceError(f"no space left on {out}; the shard being written was removed, the "
                               "finished ones are kept: free space and rerun the same command to "
                               "continue") from None


def _build(out: str, config, settings: dict, sources, scan_skipped, encode_fn, rebuild: bool,
           process_index: int, process_count: int, progress: bool, verify: bool) -> dict:
    """build_cache's work in `out`, holding its lock."""
    sid = C.settings_id(settings)
    _prepare_dir(out, settings, rebuild, process_index, process_count)

    buckets = [tuple(b) for b in settings["buckets"]]
    mine = sources[process_index::process_count]
    # listing problems are the same on every process: process 0 reports them
    scan_skipped = [{"key": k, "path": k, "reason": r} for k, r in scan_skipped if process_index == 0]
    chunks = _cache_mine(out, mine, config, buckets, encode_fn, sid, scan_skipped, process_index,
                         process_count, progress, verify)
    C.write_json(paths.join(out, C.PARTS, f"part-{process_index:04d}of{process_count:04d}.json"),
                 {"shards": [n for n, _ in chunks], "scan_skipped": scan_skipped})
    _barrier("build_cache:written", process_count)
    if process_index == 0:
        result = _finalize(out, settings, process_count)
    _barrier("build_cache:finalized", process_count)
    if process_index != 0:
        result = C.load_manifest(str(out))
    _report(out, result, process_index)
    return result


def _cache_mine(out: str, mine: list, config, buckets, encode_fn, sid: str, scan_skipped: list,
                process_index: int, process_count: int, progress: bool, verify: bool) -> list:
    """Scan this process's inputs (the unusable ones appended to `scan_skipped`), plan its shards
    and write those not already complete; returns the shard plan [(name, items)]."""
    batch = int(config.data.build_batch_size)
    with ThreadPoolExecutor(_decode_workers(config)) as pool:
        items: list[Item] = []
        for src, res in _scanned(pool, mine, config, buckets):
            if isinstance(res, Item):
                items.append(res)
            else:
                scan_skipped.append({"key": res[0], "path": src.path, "reason": res[1]})
        chunks = _chunks(items, buckets, int(config.data.shard_size), process_index, process_count)
        kept = {n: _existing_summary(out, n, its, sid, verify) for n, its in chunks}
        todo = [(n, its) for n, its in chunks if kept[n] is None]
        _warn_new_masks(out, [(its, kept[n]) for n, its in chunks if kept[n] is not None])
        done = len(items) - sum(len(its) for _, its in todo)
        if done:
            log.info("build_cache: resuming, %d of %d images already cached", done, len(items))
        with tqdm(total=len(items), initial=done, unit="img", desc=f"caching latents -> {out}",
                  disable=not progress, dynamic_ncols=True) as bar:
            for name, its in todo:
                _write_shard(out, name, its, encode_fn, config, buckets, pool, sid, batch, bar)
    return chunks


def _report(out: str, result: dict, process_index: int) -> None:
    """Log the build's outcome; a cache of 0 records is an error (raised on every process)."""
    log.info("build_cache: %d images in %s", result["num_records"], out)
    if result["num_skipped"] and process_index == 0:
        kinds = Counter(s["reason"].split(":")[0]
                        for s in map(json.loads, paths.read_text(paths.join(out, C.SKIPPED)).splitlines()))
        log.warning("build_cache: %d inputs skipped (%s); every one with its reason in %s",
                    result["num_skipped"], ", ".join(f"{k}: {n}" for k, n in kinds.most_common()),
                    paths.join(out, C.SKIPPED))
    if not result["num_records"]:  # after the barriers: every process raises, none waits
        raise C.CacheError(f"build_cache: 0 images cached in {out}: all {result['num_skipped']} "
                           f"inputs were skipped; the reason for each is in {paths.join(out, C.SKIPPED)}")
