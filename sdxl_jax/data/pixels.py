"""Pixel batches for VAE decoder finetuning: the latent cache holds latents, the decoder needs the
images themselves.

    images folder | JSONL manifest ─scan (header only)─▶ bucket per image
    ─global batch plan (plan.py, via the latent pipeline's checkpointable plan iterator)─▶
    this process's rows: decode, cover-fit to the bucket, random crop to data.crop_size
    ─▶ background-thread prefetch (grain ThreadPrefetchIterDataset)

Same contract as the latent loader: one bucket per global batch, every process its slice of
the same plan, `get_state()/set_state()` JSON dicts that continue with the very next batch.
With `data.crop_size > 0` every batch is crop × crop whatever its bucket (one compiled step);
with 0 the batch has the bucket's full resolution (one compile per bucket). Random choices
(the overhang crop, the training crop) are keyed by (seed, epoch, batch, global slot), so they
survive a restore and do not depend on the number of processes. Captions are not needed.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from sdxl_jax.data.buckets import assign_bucket, batch_sizes, buckets_from_config, fit_cover
from sdxl_jax.data.images import BadInput, list_folder, list_manifest, load_pixels, probe_size
# The plan iterator of the latent loader: (record buckets, ids, sizes, seed, plan id) → global
# batch specs with a checkpointable position. Generic over what a "record" is, so reused here.
from sdxl_jax.data.pipeline import ReaderIterator, _PlanDataset, split_records

log = logging.getLogger(__name__)

_PIXEL_STREAM = 0x9A11  # separates the crop randomness from the plan's stream


@dataclass(frozen=True)
class PixelItem:
    """One usable image: its file, stable key, displayed size (w, h) and bucket index."""
    path: str
    key: str
    size: tuple[int, int]
    bucket: int


def scan_images(config, images_dir: str | None = None, manifest: str | None = None,
                threads: int = 8) -> tuple[list[PixelItem], list[dict], list[tuple[int, int]]]:
    """(usable items sorted by key, skipped [{"key", "reason"}], bucket table).

    Reads image headers only; every unusable input is returned with its reason (and summarised
    in the log by the iterator), never dropped silently.
    """
    if bool(images_dir) == bool(manifest):
        raise ValueError("give exactly one input: data.images_dir (a folder of images) or "
                         "data.manifest (JSONL of {\"path\", \"caption\"})")
    sources, listed_skips = list_folder(images_dir) if images_dir else list_manifest(manifest)
    d = config.data
    buckets = buckets_from_config(d.buckets)

    def one(src):
        try:
            w, h = probe_size(src.path, d.max_image_pixels)
            if w * h < d.min_image_pixels:
                raise BadInput(f"too small: {w}x{h} < data.min_image_pixels = {d.min_image_pixels}")
            idx, err = assign_bucket(w, h, buckets)
            if err > d.buckets.max_ar_error:
                raise BadInput(f"aspect ratio too extreme: {w}x{h} vs bucket {buckets[idx]} "
                               f"(|log ar error| {err:.3f} > data.buckets.max_ar_error)")
        except BadInput as e:
            return {"key": src.key, "reason": str(e)}
        return PixelItem(src.path, src.key, (w, h), idx)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, sources))
    items = sorted((r for r in results if isinstance(r, PixelItem)), key=lambda it: it.key)
    skipped = [{"key": k, "reason": r} for k, r in listed_skips]
    skipped += [r for r in results if isinstance(r, dict)]
    if not items:
        raise ValueError(f"no usable image in {images_dir or manifest} ({len(skipped)} skipped, "
                         f"e.g. {skipped[:2]})")
    return items, skipped, buckets


def split_items(items: list[PixelItem], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): the latent loader's key-hash ranking, so the held-out images of
    the decoder run are chosen by the same rule as the UNet run's validation records."""
    return split_records(SimpleNamespace(keys=[it.key for it in items]), val_fraction)


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, _PIXEL_STREAM, *words])


def crop_window(rng: np.random.Generator, height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of a uniform crop × crop window inside height × width."""
    if crop > min(height, width):
        raise ValueError(f"data.crop_size={crop} is larger than a {width}x{height} bucket; lower "
                         "it or raise data.buckets.min_side")
    return int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))


class _PixelReader:
    """Global batch spec → this process's rows as float32 (local, H, W, 3) in [−1, 1]."""

    def __init__(self, config, items, buckets, process_index: int, process_count: int):
        d = config.data
        self._items, self._buckets = items, buckets
        self._p, self._n = process_index, process_count
        self._seed, self._crop, self._fit = int(d.seed), int(d.crop_size), d.buckets.crop
        self._max_pixels = int(d.max_image_pixels)
        self._pool = ThreadPoolExecutor(max(1, int(d.read_threads)), thread_name_prefix="pixels")
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _load(self, spec, slot: int):
        it = self._items[int(spec["ids"][slot])]
        bucket = self._buckets[spec["bucket"]]
        rng = _rng(self._seed, spec["epoch"], spec["batch"], slot)
        fit = fit_cover(*it.size, bucket, self._fit, rng)
        try:
            px = load_pixels(it.path, self._max_pixels, fit, bucket)
        except BadInput as e:
            return it, str(e)
        if self._crop:
            top, left = crop_window(rng, px.shape[0], px.shape[1], self._crop)
            px = px[top:top + self._crop, left:left + self._crop]
        return it, px

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        local = len(spec["ids"]) // self._n
        slots = range(self._p * local, (self._p + 1) * local)
        loaded = list(self._pool.map(lambda s: self._load(spec, s), slots))
        good = [px for _, px in loaded if not isinstance(px, str)]
        for it, px in loaded:
            if isinstance(px, str):
                with self._lock:
                    if it.key not in self._warned:  # once per file, not once per epoch
                        self._warned.add(it.key)
                        log.warning("pixel batch: %s cannot be decoded (%s); its slot is filled "
                                    "with another image of the batch", it.path, px)
        if not good:
            raise ValueError(f"no image of global batch {spec['batch']} (epoch {spec['epoch']}) "
                             f"could be decoded, e.g. {loaded[0][0].path}: {loaded[0][1]}")
        # a bad file keeps the batch full (fixed shape) by repeating good rows of the same batch
        rows = [px if not isinstance(px, str) else good[i % len(good)] for i, (_, px) in enumerate(loaded)]
        return {"images": np.stack(rows).astype(np.float32)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class PixelIterator(ReaderIterator):
    """Infinite training batches {"images": (local, H, W, 3) float32}; JSON-able state.

    `batch_sizes` maps bucket (w, h) → global batch size for the buckets in use, `image_shape`
    is the (H, W) of every batch when data.crop_size > 0 (else None), `skipped` lists inputs that
    were not usable and why, `held_out` the held-out items (never trained on).
    """

    def __init__(self, inner, reader: _PixelReader, sizes: dict, image_shape, skipped, held_out):
        super().__init__(inner, reader)
        self.batch_sizes, self.image_shape = sizes, image_shape
        self.skipped, self.held_out = skipped, held_out


def make_pixel_iterator(config, images_dir: str | None = None, manifest: str | None = None,
                        process_index: int = 0, process_count: int = 1,
                        global_batch_size: int | None = None,
                        batch_multiple: int | None = None) -> PixelIterator:
    """Training batches of pixels for this process (see the module doc).

    Every process must call this with the same config and inputs. `batch_multiple` is the
    data-parallel size the global batch must divide by (default process_count).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    d = config.data
    items, skipped, buckets = scan_images(config, images_dir, manifest, int(d.read_threads) * 4)
    if skipped:
        kinds = Counter(s["reason"].split(":")[0] for s in skipped)
        log.warning("pixel data: %d inputs skipped (%s), e.g. %s: %s", len(skipped),
                    ", ".join(f"{k}: {n}" for k, n in kinds.most_common()), skipped[0]["key"],
                    skipped[0]["reason"])
    train_ids, val_ids = split_items(items, float(d.val_fraction))
    multiple = batch_multiple or process_count
    if multiple % process_count:
        raise ValueError(f"batch_multiple {multiple} must be a multiple of process_count {process_count}")
    crop = int(d.crop_size)
    # scaling the batch by bucket area only makes sense when the bucket sets the batch's size
    sizes = batch_sizes(buckets, global_batch_size or int(config.train.global_batch_size), multiple,
                        bool(d.buckets.scale_batch_by_area) and not crop, d.buckets.max_area)
    record_buckets = np.asarray([it.bucket for it in items], np.int32)
    counts = np.bincount(record_buckets[train_ids], minlength=len(buckets))
    used = [b for b in range(len(buckets)) if counts[b] >= sizes[b]]
    if not used:
        raise ValueError(f"{len(train_ids)} training images but no bucket holds a full global batch "
                         f"(sizes {sorted(set(sizes))}); lower train.global_batch_size or add images")
    too_small = [buckets[b] for b in used if crop > min(buckets[b])]
    if too_small:
        raise ValueError(f"data.crop_size={crop} is larger than bucket(s) {too_small}; lower it or "
                         "raise data.buckets.min_side")
    plan_id = hashlib.sha256(repr(("pixels", [it.key for it in items], [it.bucket for it in items],
                                   sizes, int(d.seed), float(d.val_fraction))).encode()).hexdigest()[:16]
    reader = _PixelReader(config, items, buckets, process_index, process_count)
    ds = _PlanDataset(record_buckets, train_ids, sizes, int(d.seed), plan_id).map(reader)
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(d.prefetch))
    return PixelIterator(iter(ds), reader, {buckets[b]: sizes[b] for b in used},
                         (crop, crop) if crop else None, skipped, [items[i] for i in val_ids])


def square_images(held: list[PixelItem], n: int, size: int, max_pixels: int
                  ) -> tuple[np.ndarray, list[str]]:
    """The first `n` decodable items by key, cover-fitted and centre-cropped to size × size:
    fixed across runs and resumes, so reconstruction errors at different steps (or of different
    runs) are comparable."""
    out, keys = [], []
    for it in sorted(held, key=lambda it: it.key):
        if len(out) == n:
            break
        try:
            out.append(load_pixels(it.path, max_pixels, fit_cover(*it.size, (size, size), "center"),
                                   (size, size)))
            keys.append(it.key)
        except BadInput as e:
            log.warning("held-out image %s cannot be decoded (%s); using the next one", it.path, e)
    if len(out) < n:
        raise ValueError(f"{len(out)} decodable held-out images but {n} are needed "
                         "(sample.num_images); raise data.val_fraction or lower sample.num_images")
    return np.stack(out).astype(np.float32), keys
