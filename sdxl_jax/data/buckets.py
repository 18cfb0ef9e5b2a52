"""Aspect-ratio buckets (METHODS §7): the bucket table, nearest-bucket assignment, cover-fit + crop.

Buckets are (width, height) pairs in pixels on a `step` grid under a pixel-area budget. Every
global batch comes from one bucket, so the number of distinct shapes (and compiled train steps)
is the number of buckets.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(max_area: int, min_side: int, max_side: int, step: int = 64,
                 base: Bucket | None = None) -> list[Bucket]:
    """NAI v1 bucket table: for each width the tallest height under the area budget, plus transposes.

    For w = min_side, min_side+step, … ≤ max_side: h = the largest multiple of `step`, ≤ max_side,
    with w·h ≤ max_area (pairs with h < min_side are dropped); both (w, h) and (h, w) are added,
    then the base bucket; the result is deduplicated and sorted by aspect ratio (tall to wide).
    """
    if min(max_area, min_side, max_side, step) <= 0 or min_side > max_side:
        raise ValueError(f"bad bucket settings: max_area={max_area}, min_side={min_side}, "
                         f"max_side={max_side}, step={step}")
    buckets: set[Bucket] = set()
    w = min_side
    while w <= max_side:
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    if base:
        buckets.add((int(base[0]), int(base[1])))
    if not buckets:
        raise ValueError(f"no bucket fits max_area={max_area} with sides in [{min_side}, {max_side}]")
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def buckets_from_config(bcfg) -> list[Bucket]:
    """The bucket table of a `config.data.buckets` section."""
    return make_buckets(bcfg.max_area, bcfg.min_side, bcfg.max_side, bcfg.step, tuple(bcfg.base))


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> tuple[int, float]:
    """Index of the bucket nearest in log aspect ratio, and that error |log(ar_b) − log(ar_img)|.

    Ties go to the larger-area bucket (less upscaling); then to the lower index.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ar = math.log(width / height)
    errors = [abs(math.log(bw / bh) - log_ar) for bw, bh in buckets]
    best = min(range(len(buckets)),
               key=lambda i: (round(errors[i], 12), -buckets[i][0] * buckets[i][1], i))
    return best, errors[best]


class Fit(NamedTuple):
    """How one image becomes one bucket: resize to `resized` (w, h), then crop at (top, left)."""
    resized: tuple[int, int]
    crop_top: int
    crop_left: int


def fit_cover(width: int, height: int, bucket: Bucket, crop: str = "center",
              rng: np.random.Generator | None = None) -> Fit:
    """Aspect-preserving resize so the image covers the bucket, then a crop of the overhang.

    `crop` is "center" or "random" (uniform offset from `rng`). Offsets are in the resized
    image's pixels, as SDXL's micro-conditioning expects.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw = max(bw, round(width * scale))
    rh = max(bh, round(height * scale))
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    else:
        raise ValueError(f"unknown crop mode {crop!r}; use 'center' or 'random'")
    return Fit((rw, rh), top, left)


def time_ids(orig_w: int, orig_h: int, fit: Fit, bucket: Bucket) -> np.ndarray:
    """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32."""
    bw, bh = bucket
    return np.array([orig_h, orig_w, fit.crop_top, fit.crop_left, bh, bw], np.float32)


def batch_sizes(buckets: Sequence[Bucket], global_batch: int, multiple: int,
                scale_by_area: bool = False, max_area: int | None = None) -> list[int]:
    """Global batch size per bucket.

    Fixed (`global_batch` everywhere) unless `scale_by_area`: then `global_batch·max_area/area`
    rounded to the nearest multiple of `multiple` (the data-parallel size; at least one multiple),
    so smaller canvases use the memory a full-area batch would.
    """
    if global_batch <= 0 or multiple <= 0 or global_batch % multiple:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                         f"data-parallel size {multiple}")
    if not scale_by_area:
        return [global_batch] * len(buckets)
    max_area = max_area or max(w * h for w, h in buckets)
    return [max(multiple, round(global_batch * max_area / (w * h) / multiple) * multiple)
            for w, h in buckets]
