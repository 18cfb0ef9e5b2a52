"""Captions as tag lists: normalisation, frequencies, loss weights (METHODS §9), dropout and shuffle.

Captions are comma-separated tags ("1girl, red hair, white background"). The cache stores the
normalised tag list; weights and caption augmentation are computed when the data is loaded, so
changing α, the clip range, the meta patterns or the dropout needs no re-encode.
"""
from __future__ import annotations

import fnmatch
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

_SPACES = re.compile(r"\s+")


def normalize_tag(tag: str) -> str:
    """Lower case, underscores as spaces, single inner spaces, no outer spaces.

    Underscores are kept in tags without any letter or digit (emoticons like "^_^").
    """
    tag = tag.strip().lower()
    if any(ch.isalnum() for ch in tag):
        tag = tag.replace("_", " ")
    return _SPACES.sub(" ", tag).strip()


def normalize_tags(caption: str) -> list[str]:
    """Split a caption on commas and normalise each tag; empty tags and repeats are dropped."""
    seen: dict[str, None] = {}
    for raw in caption.split(","):
        tag = normalize_tag(raw)
        if tag and tag not in seen:
            seen[tag] = None
    return list(seen)


def is_meta(tag: str, patterns: Sequence[str]) -> bool:
    """Whether a (normalised) tag matches one of the fnmatch-style meta patterns."""
    return any(fnmatch.fnmatchcase(tag, p.lower()) for p in patterns)


def tag_counts(tag_lists: Iterable[Sequence[str]]) -> dict[str, int]:
    """Document frequency: in how many images each tag occurs, most frequent first."""
    counts = Counter(t for tags in tag_lists for t in set(tags))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reference_frequency(counts: dict[str, int], meta_patterns: Sequence[str] = ()) -> float:
    """f_ref: the median frequency over the counted (non-meta) tags; 1 if there are none."""
    freqs = [c for t, c in counts.items() if not is_meta(t, meta_patterns)]
    return float(np.median(freqs)) if freqs else 1.0


def tag_weights(tag_lists: Sequence[Sequence[str]], counts: dict[str, int], alpha: float,
                w_min: float, w_max: float, meta_patterns: Sequence[str] = ()) -> np.ndarray:
    """Per-image loss weights that attenuate over-represented concepts (METHODS §9, [ours]).

    w_i = clip(exp(mean over counted tags of −α·log(f_tag/f_ref)), w_min, w_max), then all w are
    divided by their mean. Meta tags and tags missing from `counts` are not counted; an image
    with no counted tag starts at w = 1 (exp of an empty mean taken as 0).
    """
    if not tag_lists:
        return np.zeros((0,), np.float32)
    f_ref = reference_frequency(counts, meta_patterns)
    log_ratio = {t: float(np.log(c / f_ref)) for t, c in counts.items()
                 if c > 0 and not is_meta(t, meta_patterns)}
    w = np.ones(len(tag_lists), np.float64)
    for i, tags in enumerate(tag_lists):
        logs = [log_ratio[t] for t in tags if t in log_ratio]
        if logs:
            w[i] = np.exp(-alpha * sum(logs) / len(logs))
    w = np.clip(w, w_min, w_max)
    return (w / w.mean()).astype(np.float32)


def augment_caption(tags: Sequence[str], rng: np.random.Generator, dropout: float,
                    shuffle: bool, keep_first_n: int) -> str:
    """The caption the text encoder sees: "" with probability `dropout` (for CFG), otherwise the
    tags joined by ", ", shuffled after the first `keep_first_n` when `shuffle`.

    One uniform draw decides the dropout and is always consumed, so the random stream does not
    depend on the caption.
    """
    drop = rng.random() < dropout
    if drop:
        return ""
    tags = list(tags)
    if shuffle and len(tags) > keep_first_n + 1:
        head, tail = tags[:keep_first_n], tags[keep_first_n:]
        tags = head + [tail[j] for j in rng.permutation(len(tail))]
    return ", ".join(tags)
