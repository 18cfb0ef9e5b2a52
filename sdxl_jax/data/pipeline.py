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
from typing import Any, Callable, NamedTuple, Sequence

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from sdxl_jax.data import cache as C
from sdxl_jax.data.buckets import batch_sizes as bucket_batch_sizes
from sdxl_jax.data.shard_mirror import ShardMirror
from sdxl_jax.data.plan import EpochPlan, EpochRecords, plan_epoch
from sdxl_jax.data.sources import DataSource, as_sources, check_compatible, combine_indexes
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
    held = held_out(index.keys, val_fraction)
    ids = np.arange(len(held), dtype=np.int64)
    return ids[~held], ids[held]


def held_out(keys: Sequence[str], val_fraction: float) -> np.ndarray:
    """(N,) bool: which of the records with these keys the held-out split takes."""
    n = len(keys)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    order = np.argsort([C.key_fraction(k) for k in keys], kind="stable")
    held = np.zeros(n, bool)
    held[order[:n_val]] = True
    return held


def used_buckets(counts: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The buckets the training loader feeds: those holding at least one global batch
    (`counts`: training records per bucket; `sizes`: each bucket's global batch)."""
    return [b for b in range(len(sizes)) if counts[b] >= sizes[b]]


def record_weights(config, cache_dir: str, index: C.CacheIndex) -> np.ndarray:
    """Per-record loss weights (METHODS §9) from the cache's tag frequencies; ones if disabled."""
    if not config.loss.tag_weighting:
        return np.ones(len(index.keys), np.float32)
    g = config.data.tags
    counts = C.read_json(f"{cache_dir}/{C.TAGS}")
    return tag_weights(index.tags, counts, g.alpha, g.w_min, g.w_max, tuple(g.meta_patterns))


def loss_masks(records: Sequence[dict[str, Any]], shape: tuple[int, int, int]) -> np.ndarray:
    """(B, h, w, 1) float32 loss masks of decoded records (METHODS §15); ones for records
    without a mask."""
    out = np.ones(tuple(shape) + (1,), np.float32)
    for row, rec in enumerate(records):
        if rec.get("mask") is not None:
            out[row] = rec["mask"]
    return out


class _Reader:
    """Global batch spec → this process's numpy batch (the trainer's batch contract).

    Records are read, decoded and cast to float32 by `data.read_threads` threads (each with its
    own ArrayRecord readers; the float16 → float32 cast dominates and releases the GIL);
    captions and tokenisation run in the calling (prefetch) thread.
    """

    def __init__(self, config, index: C.CacheIndex, weights: np.ndarray, tokenize_fn: TokenizeFn,
                 process_index: int, process_count: int, augment: bool, debug: bool,
                 source_of: np.ndarray | None = None, num_sources: int = 0):
        self._index, self._weights, self._tokenize = index, weights, tokenize_fn
        self._p, self._n = process_index, process_count
        self._augment, self._debug = augment, debug
        # ≥ 2 data sources: batch["source_onehot"] (rows, S), for the per-source loss
        self._source_of, self._num_sources = source_of, num_sources
        d = config.data
        self._seed, self._dropout = int(d.seed), float(d.caption_dropout)
        self._shuffle, self._keep = bool(d.tag_shuffle), int(d.keep_first_n)
        self._tokens = int(config.text.max_chunks) * TOKENS_PER_CHUNK
        self._masked = bool(config.loss.masked)  # batch["loss_mask"] only then: same step otherwise
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max(1, int(d.read_threads)), thread_name_prefix="cache-read")
        self._mirror = ShardMirror(index.files, float(d.local_shard_cache_gb) * 2**30)

    def _load(self, out: np.ndarray, row: int, record_id: int) -> dict[str, Any]:
        source = getattr(self._local, "source", None)
        if source is None:
            source = self._local.source = C.RecordSource(self._index.files, self._index.counts,
                                                         self._mirror)
        rec = C.decode_record(source[record_id])
        out[row] = rec.pop("latent")
        return rec

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._mirror.close()

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
        if self._masked:
            batch["loss_mask"] = loss_masks(records, latents.shape[:3])
        if self._source_of is not None:
            batch["source_onehot"] = np.eye(self._num_sources, dtype=np.float32)[self._source_of[mine]]
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
    """Infinite sequence of global batch specs; state = (epoch, batch in epoch, carry-in).

    `epoch_records(epoch)`, when given, is the multiset of record ids epoch `epoch` plans over
    (repeated sources, plan.EpochRecords); otherwise every epoch plans over `train_ids`."""

    def __init__(self, record_buckets: np.ndarray, train_ids: np.ndarray, sizes: Sequence[int],
                 seed: int, plan_id: str, epoch_records: Callable[[int], np.ndarray] | None = None):
        super().__init__()
        self._buckets, self._ids, self._sizes = record_buckets, train_ids, list(sizes)
        self._seed, self._plan_id, self._epoch_records = seed, plan_id, epoch_records
        self._epoch, self._batch = 0, 0
        self._carry = np.zeros((0,), np.int64)
        self._plan: EpochPlan | None = None

    def _current_plan(self) -> EpochPlan:
        if self._plan is None:
            ids = self._ids if self._epoch_records is None else self._epoch_records(self._epoch)
            self._plan = plan_epoch(self._buckets, ids, self._sizes, self._seed, self._epoch,
                                    self._carry)
        return self._plan

    def __next__(self) -> dict[str, Any]:
        plan = self._current_plan()
        while self._batch == len(plan.batches):  # (an epoch of repeated sources may be empty)
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
                f"{self._plan_id!r}: the cache, data.sources (repeats, weights), val_fraction, "
                "seed or batch sizes changed since "
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


class _Opened(NamedTuple):
    """The caches of a loader as one record index (record ids: sources' records in order)."""
    sources: list[DataSource]
    manifests: list[dict[str, Any]]
    index: C.CacheIndex
    sizes: list[int]  # global batch size per bucket
    train: list[np.ndarray]  # per source, its training record ids (global)
    val_ids: np.ndarray
    weights: np.ndarray  # per-record loss weight (tag weights of its own cache)
    source_of: np.ndarray  # (N,) source index of each record

    @property
    def multi(self) -> bool:
        return len(self.sources) > 1

    def plan_id(self, config) -> str:
        d = config.data

        def one(m):
            return m["settings_id"], m["num_records"]

        def shards(m):
            return [s["name"] for s in m["shards"]]
        s0, m0 = self.sources[0], self.manifests[0]
        if not self.multi and s0.multiplicity == 1:  # the single-source id, as before sources existed
            key = one(m0) + (self.sizes, int(d.seed), float(d.val_fraction), shards(m0))
        else:
            key = ([one(m) + (shards(m), s.name, s.repeats, s.weight)
                    for s, m in zip(self.sources, self.manifests)],
                   self.sizes, int(d.seed), float(d.val_fraction))
        return hashlib.sha256(repr(key).encode()).hexdigest()[:16]

    def reader(self, config, tokenize_fn, process_index, process_count, augment, debug) -> "_Reader":
        return _Reader(config, self.index, self.weights, tokenize_fn, process_index, process_count,
                       augment=augment, debug=debug,
                       source_of=self.source_of if self.multi else None,
                       num_sources=len(self.sources))

    def describe(self) -> str:
        return ", ".join(s.cache_dir for s in self.sources)


def _open(config, cache_dir, process_index, process_count, global_batch_size, batch_multiple) -> _Opened:
    """The caches of `cache_dir` (a folder, or a list of sources.DataSource), their batch sizes
    and their train / val split (per source, as for a single cache)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    d = config.data
    for key, ok in (("val_fraction", 0 <= d.val_fraction < 1),
                    ("caption_dropout", 0 <= d.caption_dropout <= 1),
                    ("keep_first_n", d.keep_first_n >= 0), ("read_threads", d.read_threads >= 1),
                    ("prefetch", d.prefetch >= 0),
                    ("local_shard_cache_gb", d.local_shard_cache_gb >= 0)):
        if not ok:
            raise ValueError(f"data.{key}={d[key]!r} is out of range")
    sources = as_sources(cache_dir)
    manifests = [C.load_manifest(s.cache_dir) for s in sources]
    indexes = [C.read_index(s.cache_dir, m) for s, m in zip(sources, manifests)]
    if len(sources) > 1:
        check_compatible(sources, manifests, indexes)
    index = indexes[0] if len(indexes) == 1 else combine_indexes(indexes)
    multiple = batch_multiple or process_count
    if multiple % process_count:
        raise ValueError(f"batch_multiple {multiple} must be a multiple of process_count {process_count}")
    b = config.data.buckets
    sizes = bucket_batch_sizes(index.buckets, global_batch_size or config.train.global_batch_size,
                               multiple, b.scale_batch_by_area, b.max_area)
    train, val, offset = [], [], 0
    for ix in indexes:
        t, v = split_records(ix, config.data.val_fraction)
        train.append(t + offset)
        val.append(v + offset)
        offset += len(ix.keys)
    weights = np.concatenate([record_weights(config, s.cache_dir, ix) for s, ix in zip(sources, indexes)])
    source_of = np.repeat(np.arange(len(sources), dtype=np.int32), [len(ix.keys) for ix in indexes])
    return _Opened(sources, manifests, index, sizes, train, np.concatenate(val), weights, source_of)


def make_train_iterator(config, cache_dir, tokenize_fn: TokenizeFn, process_index: int = 0,
                        process_count: int = 1, global_batch_size: int | None = None,
                        batch_multiple: int | None = None, debug: bool = False) -> DataIterator:
    """Infinite training batches for this process (see the module doc and the batch contract).

    `cache_dir` is one cache folder, or a list of sources.DataSource (data.sources: one plan
    over their records, each source's records repeated repeats × weight times per epoch on
    average, plan.EpochRecords; with ≥ 2 sources batch["source_onehot"] says each row's source).
    Every process must call this with the same config and caches. `batch_multiple` is the
    data-parallel size the (per-bucket) global batch must divide by (default process_count);
    `debug=True` adds batch["debug"] (record ids, captions, keys) for inspection.
    `steps_per_epoch` is epoch 0's (a fractional weight can change an epoch's count by a batch).
    """
    o = _open(config, cache_dir, process_index, process_count, global_batch_size, batch_multiple)
    index, sizes = o.index, o.sizes
    train_ids = np.concatenate(o.train)
    repeated = None
    if o.multi or o.sources[0].multiplicity != 1:
        repeated = EpochRecords(o.train, [s.multiplicity for s in o.sources], int(config.data.seed))
    n_buckets = len(index.buckets)
    counts = np.bincount(index.bucket_ids[train_ids if repeated is None else repeated.most()],
                         minlength=n_buckets)
    small = [f"{C.bucket_key(b)} ({n} < {s})" for b, n, s in zip(index.buckets, counts, sizes) if 0 < n < s]
    if small:
        log.warning("buckets with fewer training images than one global batch are never used: %s",
                    ", ".join(small))
    first = counts if repeated is None else np.bincount(index.bucket_ids[repeated(0)], minlength=n_buckets)
    steps = int(sum(n // s for n, s in zip(first, sizes)))
    if steps == 0:
        raise ValueError(f"cache {o.describe()} has {len(train_ids)} training images but no bucket "
                         f"holds a full global batch (sizes {sorted(set(sizes))}); lower "
                         "train.global_batch_size or add images")
    reader = o.reader(config, tokenize_fn, process_index, process_count, augment=True, debug=debug)
    ds = _PlanDataset(index.bucket_ids, train_ids, sizes, int(config.data.seed), o.plan_id(config),
                      repeated).map(reader)
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(config.data.prefetch))
    return DataIterator(iter(ds), reader, index, sizes, used_buckets(counts, sizes), steps)


def make_val_iterator(config, cache_dir, tokenize_fn: TokenizeFn, process_index: int = 0,
                      process_count: int = 1, global_batch_size: int | None = None,
                      batch_multiple: int | None = None, debug: bool = False) -> DataIterator:
    """The held-out split, once, in a fixed order, captions as cached (no dropout/shuffle).

    Batches go bucket by bucket in key order; a bucket's last batch is filled up by cycling
    through that bucket's records again, so every held-out image is seen and every process gets
    the same number of full batches. Empty if the split is empty. `cache_dir`: as for
    make_train_iterator (several sources: their held-out records together, each once).
    """
    o = _open(config, cache_dir, process_index, process_count, global_batch_size, batch_multiple)
    index, sizes, val_ids = o.index, o.sizes, o.val_ids
    specs = []
    for b in range(len(index.buckets)):
        ids = np.array(sorted(val_ids[index.bucket_ids[val_ids] == b], key=lambda i: index.keys[i]),
                       np.int64)
        for start in range(0, len(ids), sizes[b]):
            batch_ids = np.resize(np.roll(ids, -start), sizes[b])  # wraps around the bucket
            specs.append({"bucket": b, "ids": batch_ids, "epoch": 0, "batch": len(specs)})
    if not specs:
        log.warning("validation split of %s is empty (data.val_fraction=%s)", o.describe(),
                    config.data.val_fraction)
    reader = o.reader(config, tokenize_fn, process_index, process_count, augment=False, debug=debug)
    ds = grain.MapDataset.source(specs).map(reader).to_iter_dataset()
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(config.data.prefetch))
    used = sorted({spec["bucket"] for spec in specs})
    return DataIterator(iter(ds), reader, index, sizes, used, len(specs))
