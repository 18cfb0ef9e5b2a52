"""The global batch plan (METHODS §7): which records form global batch k of epoch e.

Pure numpy and identical on every process (it depends only on the record→bucket table, the
batch sizes, the seed, the epoch and the carried-over records), so all hosts agree on the
bucket, hence on the shapes, at every step without communicating.

Within an epoch each bucket's records are shuffled, the records carried over from the previous
epoch are moved to the front (so they are used now), and the shuffled list is cut into full
batches. The tail that does not fill a batch (fewer than one batch) is carried to the next
epoch. So an epoch uses each record at most once, every epoch has the same number of batches,
no batch is ragged, and no record waits more than one epoch. The bucket of each successive
batch is drawn with probability proportional to the bucket's remaining records.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

_PLAN_STREAM = 0x9E3779B1  # separates the plan's random stream from the captions' stream


class EpochPlan(NamedTuple):
    bucket_ids: np.ndarray  # (T,) bucket of each global batch
    batches: list[np.ndarray]  # T arrays of record ids, one global batch each
    carry_out: np.ndarray  # sorted record ids left for the next epoch


def plan_epoch(record_buckets: np.ndarray, records: np.ndarray, batch_sizes: Sequence[int],
               seed: int, epoch: int, carry_in: np.ndarray) -> EpochPlan:
    """Plan one epoch over `records` (ids), with `record_buckets[id]` and global `batch_sizes[b]`."""
    rng = np.random.default_rng([seed, _PLAN_STREAM, epoch])
    carry_in = np.asarray(carry_in, np.int64)
    per_bucket: dict[int, np.ndarray] = {}
    carry_out = []
    for b in np.unique(record_buckets[records]):
        ids = rng.permutation(records[record_buckets[records] == b])
        first = np.isin(ids, carry_in)
        ids = np.concatenate([ids[first], ids[~first]])
        n_full = len(ids) // batch_sizes[b] * batch_sizes[b]
        per_bucket[int(b)] = ids[:n_full]
        carry_out.append(ids[n_full:])
    remaining = {b: len(ids) for b, ids in per_bucket.items() if len(ids)}
    order = sorted(remaining)
    left = np.array([remaining[b] for b in order], np.float64)
    taken = {b: 0 for b in order}
    draws = rng.random(int(sum(remaining[b] // batch_sizes[b] for b in order)))
    bucket_ids, batches = [], []
    for u in draws:
        j = min(int(np.searchsorted(np.cumsum(left), u * left.sum(), side="right")), len(order) - 1)
        while left[j] == 0:  # u·sum landing exactly on a boundary of an exhausted bucket
            j -= 1
        b = order[j]
        size = batch_sizes[b]
        batches.append(per_bucket[b][taken[b]:taken[b] + size])
        bucket_ids.append(b)
        taken[b] += size
        left[j] -= size
    carry = np.sort(np.concatenate(carry_out)) if carry_out else np.zeros((0,), np.int64)
    return EpochPlan(np.asarray(bucket_ids, np.int32), batches, carry.astype(np.int64))
