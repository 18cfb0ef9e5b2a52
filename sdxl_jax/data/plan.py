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
_REPEAT_STREAM = 0x5EC0  # the per-epoch draw of fractional source repeats (EpochRecords)


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


class EpochRecords:
    """The records of each epoch when sources repeat (data.sources): every record of source s
    ⌊m_s⌋ times, and once more for round(frac(m_s)·n_s) of them, drawn afresh each epoch from
    (seed, epoch, s) alone (the same on every process), where m_s = repeats_s × weight_s.

    So each epoch holds exactly M_s = ⌊m_s⌋·n_s + round(frac(m_s)·n_s) copies of source s
    (a per-record coin flip would add binomial noise to the mix) and a record appears m_s times
    per epoch on average. plan_epoch then runs on this multiset unchanged: copies of a record
    are shuffled like any other entry, so two can share a batch (as with kohya's repeats).
    """

    def __init__(self, ids_per_source: Sequence[np.ndarray], multiplicity: Sequence[float], seed: int):
        self.ids = [np.asarray(ids, np.int64) for ids in ids_per_source]
        self.multiplicity = [float(m) for m in multiplicity]
        self.seed = int(seed)

    def per_source(self, epoch: int) -> list[np.ndarray]:
        """Sorted record ids (with repeats) of each source in `epoch`."""
        out = []
        for s, (ids, m) in enumerate(zip(self.ids, self.multiplicity)):
            whole, frac = divmod(m, 1.0)
            extra = ids[:0]
            if frac > 0:
                rng = np.random.default_rng([self.seed, _REPEAT_STREAM, epoch, s])
                extra = rng.permutation(ids)[:int(round(frac * len(ids)))]
            out.append(np.sort(np.concatenate([np.repeat(ids, int(whole)), extra])))
        return out

    def __call__(self, epoch: int) -> np.ndarray:
        return np.sort(np.concatenate(self.per_source(epoch)))

    def most(self) -> np.ndarray:
        """Every record ⌈m_s⌉ times: an upper bound on any epoch's records (which buckets can
        ever fill a batch)."""
        return np.concatenate([np.repeat(ids, int(np.ceil(m))) for ids, m in zip(self.ids, self.multiplicity)])
