"""The latent cache on disk: record format, shard summaries, manifest, streaming latent statistics.

Layout of a cache folder:

    settings.json            what the content depends on (VAE fingerprint, buckets, crop, dtype);
                             a build with other settings refuses to add to this folder
    <shard>.array_record     records of one bucket (ArrayRecord, group_size 1 for random access)
    <shard>.json             its summary: per-record key + tags, skipped inputs, latent stats,
                             the shard's size in bytes; written last, so its presence marks the
                             shard complete (resume checks the size and record count again)
    parts/part-PofN.json     which shards process P of N wrote (multi-host builds)
    manifest.json            bucket table and counts, shard list, statistics; the cache is
                             usable once this exists
    skipped.jsonl            every input that was not cached, with the reason
    tags.json                tag → number of images (document frequency)
    latent_stats.json        per-channel mean/std recomputed by data_tools.latent_stats

A record (no pickle) is b"SXL1", a uint32 (little-endian) header length, the msgpack header
{"shape": [h, w, c], "dtype": str, "std": bool, "caption": str, "tags": [str],
"time_ids": [6 floats], "key": str} (plus "mask": true on records with a loss mask), zero
padding to a 16-byte boundary, then the latent bytes (C order, storage dtype), when "std" is true
the std bytes, and when "mask" is true the loss mask: float16 (h, w), the mean of the pixel mask
over each latent cell (METHODS §15). A record without a mask is byte for byte what it was before
masks existed: caches built earlier keep their settings and stay valid (they hold no masks).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import msgpack
import numpy as np

from sdxl_jax import paths

FORMAT = "sdxl_jax.latent_cache"
VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SKIPPED = "skipped.jsonl"
TAGS = "tags.json"
PARTS = "parts"
STATS = "latent_stats.json"  # written by data_tools.latent_stats
CACHE_FILES = (MANIFEST, SETTINGS, SKIPPED, TAGS, STATS)
SHARD_EXT = ".array_record"
WRITER_OPTIONS = "group_size:1,uncompressed"  # latents barely compress; reads stay memcpy-fast


# ---- records ----------------------------------------------------------------------------------

_MAGIC = b"SXL1"
_ALIGN = 16  # the latent bytes start on a 16-byte boundary: zero-copy, aligned numpy views


MASK_DTYPE = np.float16  # 2⁻¹¹ resolution for a weight in [0, 1]; a quarter of a float16 latent


def encode_record(latent: np.ndarray, std: np.ndarray | None, caption: str, tags: list[str],
                  time_ids: np.ndarray, key: str, mask: np.ndarray | None = None) -> bytes:
    """One cached image as bytes; `latent` is already in the storage dtype, `mask` (h, w[, 1])
    in [0, 1] at the latent's resolution, or None."""
    latent = np.ascontiguousarray(latent)
    header = {
        "shape": list(latent.shape), "dtype": latent.dtype.name, "std": std is not None,
        "caption": caption, "tags": list(tags),
        "time_ids": [float(v) for v in np.asarray(time_ids).reshape(-1)], "key": key,
    }
    if mask is not None:
        mask = np.asarray(mask).reshape(latent.shape[:2])  # a wrong size fails here
        header["mask"] = True
    header = msgpack.packb(header, use_bin_type=True)
    start = -(-(len(_MAGIC) + 4 + len(header)) // _ALIGN) * _ALIGN
    pad = start - (len(_MAGIC) + 4 + len(header))
    parts = [_MAGIC, struct.pack("<I", len(header)), header, b"\0" * pad, latent.tobytes()]
    if std is not None:
        parts.append(np.ascontiguousarray(std, latent.dtype).tobytes())
    if mask is not None:
        parts.append(np.ascontiguousarray(mask, MASK_DTYPE).tobytes())
    return b"".join(parts)


def decode_record(raw: bytes) -> dict[str, Any]:
    """Inverse of encode_record; latent/std/mask are read-only views into `raw` (no copy).
    rec["mask"] is (h, w, 1) float16, or None (records without one, and those of older caches)."""
    if raw[:4] != _MAGIC:
        raise ValueError(f"not a {FORMAT} record (bad magic {bytes(raw[:4])!r})")
    (size,) = struct.unpack_from("<I", raw, 4)
    rec = msgpack.unpackb(raw[8:8 + size], raw=False)
    start = -(-(8 + size) // _ALIGN) * _ALIGN
    shape, dtype = tuple(rec["shape"]), np.dtype(rec["dtype"])
    count = int(np.prod(shape))
    rec["latent"] = np.frombuffer(raw, dtype, count, start).reshape(shape)
    rec["std"] = (np.frombuffer(raw, dtype, count, start + count * dtype.itemsize).reshape(shape)
                  if rec["std"] else None)
    mask_at = start + count * dtype.itemsize * (1 if rec["std"] is None else 2)
    rec["mask"] = (np.frombuffer(raw, MASK_DTYPE, shape[0] * shape[1], mask_at).reshape(shape[:2] + (1,))
                   if rec.get("mask") else None)
    rec["time_ids"] = np.asarray(rec["time_ids"], np.float32)
    return rec


# ---- streaming per-channel statistics --------------------------------------------------------

@dataclass
class LatentStats:
    """Per-channel count/mean/M2 in float64, merged with Chan et al.'s parallel update.

    Exact up to float64 rounding regardless of how the data is split into batches or hosts.
    """
    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, latents: np.ndarray) -> None:
        """Add latents (..., C); every leading position counts as one sample per channel."""
        x = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
        if len(x):
            mean = x.mean(axis=0)
            self.merge(LatentStats(len(x), mean, ((x - mean) ** 2).sum(axis=0)))

    def merge(self, other: "LatentStats") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel."""
        return np.sqrt(self.m2 / self.count)

    def to_dict(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0, "mean": [], "m2": [], "std": []}
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentStats":
        if not d.get("count"):
            return cls()
        return cls(int(d["count"]), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64))


# ---- names, settings and JSON files ----------------------------------------------------------

def bucket_key(bucket) -> str:
    """"WxH", the bucket's name in manifests."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def shard_name(bucket, chunk: int, process_index: int = 0, process_count: int = 1) -> str:
    """Stem of one shard: bucket, writing process (of how many), chunk number within the bucket."""
    return f"b{bucket[0]:05d}x{bucket[1]:05d}-p{process_index:04d}of{process_count:04d}-{chunk:06d}"


def settings_id(settings: dict[str, Any]) -> str:
    """Stable hash of the settings a cache's content depends on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON as a whole file or object (paths.write_text): readers never see half of it."""
    paths.write_text(os.fspath(path), json.dumps(obj, indent=1, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(paths.read_text(os.fspath(path)))


class CacheError(ValueError):
    """A cache that cannot be read as it is; the message names the file and the fix.

    `problem` is the message without the repair advice, `cache_dir` the cache's folder and
    `verify` whether only reading the records back finds the damage: a trainer, which knows
    its config, replaces the advice with its exact build_cache command (run_inputs.repaired)."""

    def __init__(self, message: str, cache_dir: str | None = None, verify: bool = False,
                 problem: str | None = None):
        from sdxl_jax import paths  # a gs:// cache keeps its URL (run_inputs.repaired matches it)
        super().__init__(message)
        self.cache_dir = None if cache_dir is None else paths.absolute(str(cache_dir))
        self.verify, self.problem = verify, problem or message


def rebuild_hint(cache_dir: str, source: str | None = None, verify: bool = False) -> str:
    """How to repair `cache_dir`: build_cache on the same inputs and config rebuilds bad shards."""
    kind, _, path = (source or "").partition(":")
    inputs = f"--images {path} " if kind == "images" else f"--manifest {path} " if kind == "manifest" else ""
    return (f"rerun build_cache on its inputs ({inputs}--out {cache_dir}{' --verify' if verify else ''}) "
            "with the config it was built with, which rebuilds damaged shards")


def _damaged(problem: str, cache_dir, source: str | None, verify: bool = False) -> CacheError:
    return CacheError(f"{problem}; {rebuild_hint(str(cache_dir), source, verify)}", cache_dir,
                      verify, problem)


def shard_problem(path: str | Path, count: int, nbytes: int | None = None) -> str | None:
    """Why the shard file at `path` is not the one its summary describes, or None.

    Checks presence, size (when the summary recorded it) and the record count in the file's
    own index, all without reading records: a truncated file fails the size check, and
    ArrayRecord reports 0 records for a file whose footer is gone. A gs:// shard is read by
    ArrayRecord's own GCS reader (index only).
    """
    path = os.fspath(path)
    size = paths.size(path)  # a gs:// shard: one metadata request, before any reader opens it
    if size is None:
        return "file missing"
    if nbytes is not None and size != nbytes:
        return f"{size} bytes, {nbytes} when written (truncated or overwritten)"
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        reader = ArrayRecordReader(str(path), options=RecordSource._OPTIONS)
        try:
            found = reader.num_records()
        finally:
            reader.close()
    except (RuntimeError, OSError, ValueError) as e:
        return f"unreadable ({e})"
    if found != count:
        return f"{found} records in the file, {count} expected"
    return None


def load_manifest(cache_dir: str) -> dict[str, Any]:
    """The manifest of a finished cache, or a clear error saying how to build one."""
    path = paths.join(cache_dir, MANIFEST)
    if not paths.isfile(path):
        raise FileNotFoundError(
            f"no latent cache at {cache_dir!r} ({MANIFEST} missing; an interrupted build leaves "
            f"none): build it with python -m data_tools.build_cache, giving your images (--images "
            f"or --manifest), --out {cache_dir} and the run's --config")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable cache manifest {path}: {e}; rebuild with --rebuild") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


@dataclass
class CacheIndex:
    """What the loader needs about every record without reading latents.

    Record ids are positions in the concatenation of `files` (manifest order).
    """
    files: list[str]
    counts: list[int]  # records per file
    bucket_ids: np.ndarray  # (N,) int32 index into buckets
    buckets: list[tuple[int, int]]  # (w, h) pixels
    latent_shapes: list[tuple[int, int, int]]  # per bucket, (h, w, c) of the latents
    keys: list[str]
    tags: list[list[str]]


def read_index(cache_dir: str, manifest: dict[str, Any] | None = None) -> CacheIndex:
    """Build the record index from the manifest and the shard summaries.

    Every shard is checked against them first (presence, size, record count: `shard_problem`),
    so a damaged cache fails here, naming the shard, rather than deep inside a training step.
    """
    manifest = manifest or load_manifest(cache_dir)
    source = manifest.get("settings", {}).get("source")
    if not manifest.get("num_records"):
        raise CacheError(f"the cache {cache_dir} holds 0 records: every input was skipped; the "
                         f"reason for each is in {paths.join(cache_dir, SKIPPED)}")
    buckets = [tuple(b) for b in manifest["buckets"]]
    shapes: dict[tuple[int, int], tuple[int, int, int]] = {}
    files, counts, bucket_ids, keys, tags = [], [], [], [], []
    for shard in manifest["shards"]:
        try:
            summary = read_json(paths.join(cache_dir, shard["name"] + ".json"))
        except (OSError, ValueError) as e:
            raise _damaged(f"cache shard summary {shard['name']}.json of {cache_dir} is "
                           f"unreadable ({e})", cache_dir, source) from None
        if len(summary["records"]) != shard["count"]:
            raise _damaged(f"shard {shard['name']} of {cache_dir} holds {len(summary['records'])} "
                           f"records, manifest says {shard['count']}", cache_dir, source)
        path = paths.join(cache_dir, shard["name"] + SHARD_EXT)
        problem = shard_problem(path, shard["count"], summary.get("bytes"))
        if problem:
            raise _damaged(f"cache shard {path}: {problem}", cache_dir, source)
        bucket = tuple(shard["bucket"])
        shapes[bucket] = tuple(shard["latent_shape"])
        files.append(str(path))
        counts.append(shard["count"])
        bucket_ids += [buckets.index(bucket)] * shard["count"]
        keys += [r["key"] for r in summary["records"]]
        tags += [r["tags"] for r in summary["records"]]
    latent_shapes = [shapes.get(b, (0, 0, 0)) for b in buckets]
    return CacheIndex(files, counts, np.asarray(bucket_ids, np.int32), buckets, latent_shapes, keys, tags)


def _source_of(cache_dir: str) -> str | None:
    """The inputs a cache was built from, as its manifest says them."""
    try:
        return read_json(paths.join(cache_dir, MANIFEST))["settings"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RecordSource:
    """Random access to records by id over a list of shards (Grain's RandomAccessDataSource
    protocol: len and getitem). Readers open lazily; use from one thread at a time.

    Records are read one by one: for ~100 KB records a batched `read([...])` of ArrayRecord
    (and Grain's ArrayRecordDataSource, which uses it from a per-call thread pool) was several
    times slower here than single reads.
    """
    _OPTIONS = "readahead_buffer_size:0"  # random access: no read-ahead

    def __init__(self, files: Sequence[str], counts: Sequence[int], mirror=None):
        self._files = list(files)
        self._ends = np.cumsum(counts)
        self._readers: list[Any] = [None] * len(self._files)
        self._mirror = mirror  # shard_mirror.ShardMirror: local copies of gs:// shards
        self._remote = [paths.is_remote(f) for f in self._files]  # readers not yet on a copy

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, record_id: int) -> bytes:
        shard = int(np.searchsorted(self._ends, record_id, side="right"))
        if not 0 <= record_id < len(self):
            raise IndexError(f"record {record_id} out of range [0, {len(self)})")
        start = int(self._ends[shard - 1]) if shard else 0
        try:
            if self._remote[shard] and self._mirror is not None and self._mirror.local(self._files[shard]):
                if self._readers[shard] is not None:
                    self._readers[shard].close()
                self._readers[shard], self._remote[shard] = None, False
            if self._readers[shard] is None:
                from array_record.python.array_record_module import ArrayRecordReader
                path = self._files[shard]
                path = (self._mirror.local(path) if self._mirror is not None else None) or path
                self._readers[shard] = ArrayRecordReader(path, options=self._OPTIONS)
            return self._readers[shard].read([record_id - start])[0]
        except (RuntimeError, OSError) as e:  # Riegeli: "chunk hash mismatch", "open() failed"
            path = self._files[shard]
            # --verify: the shard has its recorded size and count, so only reading it back
            # finds the damage
            folder = os.path.dirname(path)  # a URL's folder too
            raise _damaged(f"cache shard {path}: record {record_id - start} is unreadable ({e})",
                           folder, _source_of(folder), verify=True) from e

    def close(self) -> None:
        for r in self._readers:
            if r is not None:
                r.close()
        self._readers = [None] * len(self._files)


def key_fraction(key: str) -> float:
    """A uniform number in [0, 1) from a record's key, for the held-out split."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
