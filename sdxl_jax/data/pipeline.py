"""Grain pipeline over the latent cache: global batches of one bucket, each process its slice.

    plan (global batch ids, identical on all hosts) ─map─▶ read + caption + tokenize this
    process's rows ─▶ background thread prefetch (grain ThreadPrefetchIterDataset)

The iterator state is the plan position {epoch, batch, carry}; Grain's thread prefetch keeps,
with every prefetched batch, the state right after it, so get_state() matches exactly the
batches handed out and a restored iterator continues with the very next global batch. Random
caption choices are keyed by (seed, epoch, batch, global slot), so they survive a restore and
do not depend on the number of processes.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from sdxl_jax.data import cache as C
from sdxl_jax.data.buckets import batch_sizes as bucket_batch_sizes
from sdxl_jax.data.plan import EpochPlan, plan_epoch
from sdxl_jax.data.tags import augment_caption, tag_weights

log = logging.getLogger(__name__)

TokenizeFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
TOKENS_PER_CHUNK = 77
_CAPTION_STREAM = 0x7A65  # separates caption randomness from the plan's stream


# ---- what the loader knows about the cache ---------------------------------------------------

def split_records(index: C.CacheIndex, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids): the round(val_fraction·N) records (at least one when the fraction is
    positive) whose key hashes are smallest are held out.

    Ranking by hash instead of thresholding it gives the exact share even on small datasets,
    and a record's membership depends only on its key and the others' keys, not on the order.
    """
    n = len(index.keys)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    order = np.argsort([C.key_fraction(k) for k in index.keys], kind="stable")
    held = np.zeros(n, bool)
    held[order[:n_val]] = True
    ids = np.arange(n, dtype=np.int64)
    return ids[~held], ids[held]


def record_weights(config, cache_dir: str, index: C.CacheIndex) -> np.ndarray:
    """Per-record loss weights (METHODS §9) from the cache's tag frequencies; ones if disabled."""
    if not config.loss.tag_weighting:
        return np.ones(len(index.keys), np.float32)
    g = config.data.tags
    counts = C.read_json(f"{cache_dir}/{C.TAGS}")
    return tag_weights(index.tags, counts, g.alpha, g.w_min, g.w_max, tuple(g.meta_patterns))


class _Reader:
    """Global batch spec → this process's numpy batch (the trainer's batch contract).

    Records are read, decoded and cast to float32 by `data.read_threads` threads (each with its
    own ArrayRecord readers; the float16 → float32 cast dominates and releases the GIL);
    captions and tokenisation run in the calling (prefetch) thread.
    """

    def __init__(self, config, index: C.CacheIndex, weights: np.ndarray, tokenize_fn: TokenizeFn,
                 process_index: int, process_count: int, augment: bool, debug: bool):
        self._index, self._weights, self._tokenize = index, weights, tokenize_fn
        self._p, self._n = process_index, process_count
        self._augment, self._debug = augment, debug
        d = config.data
        self._seed, self._dropout = int(d.seed), float(d.caption_dropout)
        self._shuffle, self._keep = bool(d.tag_shuffle), int(d.keep_first_n)
        self._tokens = int(config.text.max_chunks) * TOKENS_PER_CHUNK
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max(1, int(d.read_threads)), thread_name_prefix="cache-read")

    def _load(self, out: np.ndarray, row: int, record_id: int) -> dict[str, Any]:
        source = getattr(self._local, "source", None)
        if source is None:
            source = self._local.source = C.RecordSource(self._index.files, self._index.counts)
        rec = C.decode_record(source[record_id])
        out[row] = rec.pop("latent")
        return rec

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        ids = spec["ids"]
        local = len(ids) // self._n
        slots = np.arange(self._p * local, (self._p + 1) * local)
        mine = ids[slots]
        latents = np.empty((local,) + tuple(self._index.latent_shapes[spec["bucket"]]), np.float32)
        records = list(self._pool.map(self._load, [latents] * local, range(local), mine.tolist()))
        captions = []
        for slot, rec in zip(slots, records):
            if self._augment:
                rng = np.random.default_rng([self._seed, _CAPTION_STREAM, spec["epoch"],
                                             spec["batch"], int(slot)])
                captions.append(augment_caption(rec["tags"], rng, self._dropout, self._shuffle,
                                                self._keep))
            else:
                captions.append(", ".join(rec["tags"]))
        ids_l, ids_g = self._tokenize(captions)
        batch = {
            "latents": latents,
            "time_ids": np.stack([rec["time_ids"] for rec in records]).astype(np.float32),
            "loss_weight": self._weights[mine].astype(np.float32),
            "input_ids_l": self._check_tokens(ids_l, local, "ids_l"),
            "input_ids_g": self._check_tokens(ids_g, local, "ids_g"),
        }
        if self._debug:
            batch["debug"] = {"record_ids": mine, "captions": captions, "epoch": spec["epoch"],
                              "batch": spec["batch"], "keys": [rec["key"] for rec in records]}
        return batch

    def _check_tokens(self, ids, local: int, name: str) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        if ids.shape != (local, self._tokens):
            raise ValueError(f"tokenize_fn returned {name} of shape {ids.shape}; expected "
                             f"({local}, text.max_chunks*77 = {self._tokens})")
        return ids


# ---- the training plan as a checkpointable Grain iterator ------------------------------------

class _PlanIterator(grain.DatasetIterator):
    """Infinite sequence of global batch specs; state = (epoch, batch in epoch, carry-in)."""

    def __init__(self, record_buckets: np.ndarray, train_ids: np.ndarray, sizes: Sequence[int],
                 seed: int, plan_id: str):
        super().__init__()
        self._buckets, self._ids, self._sizes = record_buckets, train_ids, list(sizes)
        self._seed, self._plan_id = seed, plan_id
        self._epoch, self._batch = 0, 0
        self._carry = np.zeros((0,), np.int64)
        self._plan: EpochPlan | None = None

    def _current_plan(self) -> EpochPlan:
        if self._plan is None:
            self._plan = plan_epoch(self._buckets, self._ids, self._sizes, self._seed,
                                    self._epoch, self._carry)
        return self._plan

    def __next__(self) -> dict[str, Any]:
        plan = self._current_plan()
        if self._batch == len(plan.batches):
            self._epoch, self._batch, self._carry = self._epoch + 1, 0, plan.carry_out
            self._plan = None
            plan = self._current_plan()
        spec = {"bucket": int(plan.bucket_ids[self._batch]), "ids": plan.batches[self._batch],
                "epoch": self._epoch, "batch": self._batch}
        self._batch += 1
        return spec

    def get_state(self) -> dict[str, Any]:
        return {"plan_id": self._plan_id, "epoch": self._epoch, "batch": self._batch,
                "carry": [int(i) for i in self._carry]}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("plan_id") != self._plan_id:
            raise ValueError(
                f"data iterator state is for plan {state.get('plan_id')!r}, this iterator is "
                f"{self._plan_id!r}: the cache, val_fraction, seed or batch sizes changed since "
                "the checkpoint; restore with the same data settings or start the data anew")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._carry = np.asarray(state["carry"], np.int64)
        self._plan = None


class _PlanDataset(grain.IterDataset):
    def __init__(self, *args):
        super().__init__()
        self._args = args

    def __iter__(self) -> _PlanIterator:
        return _PlanIterator(*self._args)


class ReaderIterator(grain.DatasetIterator):
    """A prefetching Grain iterator and the reader thread pool behind it, as one closable
    iterator with JSON-able get_state()/set_state(). Live ones are closed at interpreter exit."""

    def __init__(self, inner: grain.DatasetIterator, reader):
        super().__init__(inner)
        self._inner, self._reader = inner, reader
        _LIVE.add(self)

    def __next__(self) -> dict[str, Any]:
        if self._inner is None:
            raise ValueError(f"this {type(self).__name__} is closed")
        return next(self._inner)

    def get_state(self) -> dict[str, Any]:
        return self._inner.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._inner.set_state(state)

    def close(self) -> None:
        """Stop the prefetch thread and drop the pipeline (idempotent)."""
        if self._inner is not None:
            self._inner.close()
            self._reader.close()
            self._inner, self._reader, self._parents = None, None, ()


# Grain's prefetch iterator cannot close itself once the interpreter has started tearing down
# modules (its __del__ then fails noisily), so live iterators are closed and released at exit.
_LIVE: "weakref.WeakSet[ReaderIterator]" = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_LIVE)])


class DataIterator(ReaderIterator):
    """The loader handed to the trainer: numpy batch dicts, get_state()/set_state() as JSON dicts.

    For the buckets that batches can come from, `batch_sizes` maps bucket (w, h) → global batch
    size and `latent_shapes` bucket → latent (h, w, c): the shapes to compile the step for.
    `steps_per_epoch` counts global batches per epoch (the val iterator: batches in total).
    """

    def __init__(self, inner: grain.DatasetIterator, reader: _Reader, index: C.CacheIndex,
                 sizes: Sequence[int], used: Sequence[int], steps: int):
        super().__init__(inner, reader)
        self.batch_sizes = {index.buckets[b]: sizes[b] for b in used}
        self.latent_shapes = {index.buckets[b]: tuple(index.latent_shapes[b]) for b in used}
        self.steps_per_epoch = steps


def _open(config, cache_dir, process_index, process_count, global_batch_size, batch_multiple):
    """(manifest, index, global batch size per bucket, train ids, val ids) of a cache."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    d = config.data
    for key, ok in (("val_fraction", 0 <= d.val_fraction < 1),
                    ("caption_dropout", 0 <= d.caption_dropout <= 1),
                    ("keep_first_n", d.keep_first_n >= 0), ("read_threads", d.read_threads >= 1),
                    ("prefetch", d.prefetch >= 0)):
        if not ok:
            raise ValueError(f"data.{key}={d[key]!r} is out of range")
    manifest = C.load_manifest(cache_dir)
    index = C.read_index(cache_dir, manifest)
    multiple = batch_multiple or process_count
    if multiple % process_count:
        raise ValueError(f"batch_multiple {multiple} must be a multiple of process_count {process_count}")
    b = config.data.buckets
    sizes = bucket_batch_sizes(index.buckets, global_batch_size or config.train.global_batch_size,
                               multiple, b.scale_batch_by_area, b.max_area)
    return (manifest, index, sizes) + split_records(index, config.data.val_fraction)


def make_train_iterator(config, cache_dir: str, tokenize_fn: TokenizeFn, process_index: int = 0,
                        process_count: int = 1, global_batch_size: int | None = None,
                        batch_multiple: int | None = None, debug: bool = False) -> DataIterator:
    """Infinite training batches for this process (see the module doc and the batch contract).

    Every process must call this with the same config and cache. `batch_multiple` is the
    data-parallel size the (per-bucket) global batch must divide by (default process_count);
    `debug=True` adds batch["debug"] (record ids, captions, keys) for inspection.
    """
    manifest, index, sizes, train_ids, _ = _open(config, cache_dir, process_index, process_count,
                                                 global_batch_size, batch_multiple)
    counts = np.bincount(index.bucket_ids[train_ids], minlength=len(index.buckets))
    small = [f"{C.bucket_key(b)} ({n} < {s})" for b, n, s in zip(index.buckets, counts, sizes) if 0 < n < s]
    if small:
        log.warning("buckets with fewer training images than one global batch are never used: %s",
                    ", ".join(small))
    steps = int(sum(n // s for n, s in zip(counts, sizes)))
    if steps == 0:
        raise ValueError(f"cache {cache_dir} has {len(train_ids)} training images but no bucket holds "
                         f"a full global batch (sizes {sorted(set(sizes))}); lower "
                         "train.global_batch_size or add images")
    plan_id = hashlib.sha256(repr((manifest["settings_id"], manifest["num_records"], sizes,
                                   int(config.data.seed), float(config.data.val_fraction),
                                   [s["name"] for s in manifest["shards"]])).encode()).hexdigest()[:16]
    reader = _Reader(config, index, record_weights(config, cache_dir, index), tokenize_fn,
                     process_index, process_count, augment=True, debug=debug)
    ds = _PlanDataset(index.bucket_ids, train_ids, sizes, int(config.data.seed), plan_id).map(reader)
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(config.data.prefetch))
    used = [b for b in range(len(sizes)) if counts[b] >= sizes[b]]
    return DataIterator(iter(ds), reader, index, sizes, used, steps)


def make_val_iterator(config, cache_dir: str, tokenize_fn: TokenizeFn, process_index: int = 0,
                      process_count: int = 1, global_batch_size: int | None = None,
                      batch_multiple: int | None = None, debug: bool = False) -> DataIterator:
    """The held-out split, once, in a fixed order, captions as cached (no dropout/shuffle).

    Batches go bucket by bucket in key order; a bucket's last batch is filled up by cycling
    through that bucket's records again, so every held-out image is seen and every process gets
    the same number of full batches. Empty if the split is empty.
    """
    _, index, sizes, _, val_ids = _open(config, cache_dir, process_index, process_count,
                                        global_batch_size, batch_multiple)
    specs = []
    for b in range(len(index.buckets)):
        ids = np.array(sorted(val_ids[index.bucket_ids[val_ids] == b], key=lambda i: index.keys[i]),
                       np.int64)
        for start in range(0, len(ids), sizes[b]):
            batch_ids = np.resize(np.roll(ids, -start), sizes[b])  # wraps around the bucket
            specs.append({"bucket": b, "ids": batch_ids, "epoch": 0, "batch": len(specs)})
    if not specs:
        log.warning("validation split of %s is empty (data.val_fraction=%s)", cache_dir,
                    config.data.val_fraction)
    reader = _Reader(config, index, record_weights(config, cache_dir, index), tokenize_fn,
                     process_index, process_count, augment=False, debug=debug)
    ds = grain.MapDataset.source(specs).map(reader).to_iter_dataset()
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(config.data.prefetch))
    used = sorted({spec["bucket"] for spec in specs})
    return DataIterator(iter(ds), reader, index, sizes, used, len(specs))
