"""Several datasets in one run (`data.sources`): naming, kohya folder names, and the one record
index the loader plans over.

A source is one latent cache (built from its images_dir or manifest when missing) with
`repeats` (an integer, kohya's per-folder repeat count) and `weight` (a float): each epoch holds
every record of source s m_s = repeats_s × weight_s times on average (plan.EpochRecords), so the
mix of an epoch is in proportion to n_s·m_s. Record ids of the combined index are positions in
the concatenation of the sources' shard files, i.e. source s's local id plus the records of the
sources before it, so one RecordSource reads them all.

kohya's habit: a folder named `N_name` means "repeat N times". An entry whose images_dir is
named so gets repeats N unless it gives repeats itself; an images_dir (an entry's, or the single
`data.images_dir`) whose immediate subfolders are all `N_name` (kohya's train_data_dir layout)
stands for one source per subfolder with repeats N (times the entry's own repeats). A folder
mixing `N_name` subfolders with plain ones is refused, naming them: read as one plain source it
would silently drop the repeats.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sdxl_jax import paths
from sdxl_jax.data import cache as C
from sdxl_jax.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DataSource:
    name: str
    cache_dir: str
    images_dir: str = ""  # inputs to build a missing cache from (at most one of the two)
    manifest: str = ""
    repeats: int = 1
    weight: float = 1.0

    @property
    def multiplicity(self) -> float:
        """Expected copies of each record per epoch."""
        return self.repeats * self.weight


def as_sources(data) -> list[DataSource]:
    """A cache folder (the single-source loader) or a list of sources, as a list of sources."""
    if isinstance(data, (str, os.PathLike)):
        return [DataSource("data", str(data))]
    sources = list(data)
    if not sources:
        raise ValueError("no data source given")
    return sources


def kohya_folder(path: str) -> tuple[int, str] | None:
    """(N, name) for a folder named `N_name` with N ≥ 1, else None."""
    m = KOHYA_FOLDER.match(os.path.basename(os.path.normpath(path)))
    return (int(m.group(1)), m.group(2)) if m and int(m.group(1)) >= 1 else None


def kohya_subfolders(images_dir: str) -> list[tuple[str, int, str]]:
    """[(path, N, name)] when every (non-hidden) immediate subfolder of `images_dir` is named
    `N_name`, sorted by folder name; [] when the folder is not laid out that way (or missing).

    Images lying directly in such a folder would belong to no source: that is an error rather
    than a silent drop."""
    if not os.path.isdir(images_dir):
        return []
    entries = sorted(e for e in os.listdir(images_dir) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(images_dir, e))]
    parsed = [(os.path.join(images_dir, e), kohya_folder(e)) for e in subdirs]
    plain = [e for e, (_, k) in zip(subdirs, parsed) if k is None]
    if plain and len(plain) < len(parsed):
        kohya = [e for e in subdirs if e not in plain]
        raise ValueError(f"{images_dir} mixes kohya-style N_name subfolders ({', '.join(kohya[:3])}) "
                         f"with plain ones ({', '.join(plain[:3])}): as one folder their repeat "
                         f"counts would be lost. Rename {plain[0]} to 1_{plain[0]} (or another "
                         "N_ prefix), or list each folder in data.sources")
    if not parsed or plain:
        return []
    loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(images_dir, e))]
    if loose:
        raise ValueError(f"{images_dir} has kohya-style N_name subfolders ({', '.join(subdirs[:3])}, …) "
                         f"and also {len(loose)} images directly inside it (e.g. {loose[0]}), which "
                         "would belong to no source: move them into an N_name subfolder")
    return [(path, n, name) for path, (n, name) in parsed]


def _entry(s) -> dict[str, Any]:
    return dict(s.to_dict() if hasattr(s, "to_dict") else s)


def _safe(name: str) -> str:
    """A derived name as config.validate requires explicit ones (cache folder, loss_<name> tag)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source"


def _path_hash(path: str) -> str:
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]


def resolve_sources(cfg, workdir: str | None = None) -> list[DataSource]:
    """The run's sources from `data.sources` (config.validate checked each entry), or from a
    kohya-layout `data.images_dir`; [] means the single source of data.cache_dir / images_dir /
    manifest / tfds exactly as before sources existed.

    A source without its own cache_dir gets `<data.cache_dir or <workdir>/cache>/<name>`, or with
    a derived name `<derived>-<hash>`, the hash of its input's absolute path: two folders both
    named `cat` never swap caches when listed in another order. Names come from the entry, else from the folder (kohya's N_
    stripped) or file; a derived name that is already taken gets a suffix "-2", "-3", …"""
    d = cfg.data
    root = d.cache_dir or (os.path.join(workdir, "cache") if workdir else "")
    entries = [_entry(s) for s in d.get("sources", ()) or ()]
    if not entries:
        if not d.images_dir:
            return []
        if root and paths.exists(paths.join(root, C.MANIFEST)) and kohya_subfolders(d.images_dir):
            log.warning("data.images_dir %s has kohya-style N_name subfolders, but the single cache "
                        "%s already exists and is used as it is (no repeats); remove it, or list "
                        "the folders in data.sources, to train them as sources", d.images_dir, root)
            return []
        entries = [{"images_dir": d.images_dir}]
        if not kohya_subfolders(d.images_dir):
            return []
    raw = []  # (explicit name or None, derived name, fields)
    for e in entries:
        repeats, weight = e.get("repeats"), float(e.get("weight", 1.0))
        images = e.get("images_dir") or ""
        subs = kohya_subfolders(images) if images else []
        if subs:  # one source per N_name subfolder
            for path, n, name in subs:  # an entry's cache_dir is then the folder of their caches
                own = os.path.join(e["cache_dir"], os.path.basename(path)) if e.get("cache_dir") else ""
                raw.append((None, _safe(name), dict(images_dir=path, cache_dir=own,
                                                    repeats=n * int(repeats or 1), weight=weight)))
            continue
        path = images or e.get("manifest") or e.get("cache_dir")
        kohya = kohya_folder(images) if images else None
        if repeats is None:
            repeats = kohya[0] if kohya else 1
        base = kohya[1] if kohya else os.path.basename(os.path.normpath(path))
        if e.get("manifest") and not images:
            base = os.path.splitext(base)[0]
        raw.append((e.get("name"), _safe(base), dict(images_dir=images, manifest=e.get("manifest") or "",
                                                     cache_dir=e.get("cache_dir") or "",
                                                     repeats=int(repeats), weight=weight)))
    explicit = [name for name, _, _ in raw if name]
    taken = set(explicit)
    if len(taken) < len(explicit):
        dup = sorted(n for n in taken if explicit.count(n) > 1)
        raise ValueError(f"data.sources: two sources are named {dup[0]!r}; names must be distinct")
    out = []
    for name, derived, f in raw:
        # an explicit name is unique; a derived one may be taken, and its "-2" follows the order
        folder = name or f"{derived}-{_path_hash(f['images_dir'] or f['manifest'])}"
        if not name:
            name, k = derived, 1
            while name in taken:
                k += 1
                name = f"{derived}-{k}"
            taken.add(name)
        own = f.pop("cache_dir", "")
        out.append(DataSource(name=name, cache_dir=own or os.path.join(root or "cache", folder), **f))
    return out


def source_names(cfg) -> list[str]:
    """Names of the run's sources ([] for the single source): what the per-source loss reports."""
    return [s.name for s in resolve_sources(cfg)]


# ---- the combined record index -------------------------------------------------------------------

def check_compatible(sources: Sequence[DataSource], manifests: Sequence[dict],
                     indexes: Sequence[C.CacheIndex]) -> None:
    """Sources trained together must hold the same latents: VAE, bucket table and latent shape
    of every bucket. One error naming both sources otherwise."""
    first, m0, ix0 = sources[0], manifests[0], indexes[0]
    for s, m, ix in zip(sources[1:], manifests[1:], indexes[1:]):
        problems = []
        if m.get("vae_fingerprint") != m0.get("vae_fingerprint"):
            problems.append(f"VAE {m0.get('vae_fingerprint')} vs {m.get('vae_fingerprint')}")
        if [list(b) for b in m["buckets"]] != [list(b) for b in m0["buckets"]]:
            problems.append("bucket tables differ (data.buckets.*)")
        else:
            problems += [f"latent shape of bucket {C.bucket_key(b)}: {tuple(a)} vs {tuple(c)}"
                         for b, a, c in zip(ix0.buckets, ix0.latent_shapes, ix.latent_shapes)
                         if any(a) and any(c) and tuple(a) != tuple(c)]
        if problems:
            raise ValueError(f"data sources {first.name!r} ({first.cache_dir}) and {s.name!r} "
                             f"({s.cache_dir}) were cached with different latent settings: "
                             f"{'; '.join(problems)}; rebuild one with the other's config")


def combine_indexes(indexes: Sequence[C.CacheIndex]) -> C.CacheIndex:
    """One index over the records of all `indexes`, in order (ids offset by the records before)."""
    shapes = [next((tuple(ix.latent_shapes[b]) for ix in indexes if any(ix.latent_shapes[b])), (0, 0, 0))
              for b in range(len(indexes[0].buckets))]
    return C.CacheIndex(
        files=[f for ix in indexes for f in ix.files], counts=[c for ix in indexes for c in ix.counts],
        bucket_ids=np.concatenate([ix.bucket_ids for ix in indexes]), buckets=list(indexes[0].buckets),
        latent_shapes=shapes, keys=[k for ix in indexes for k in ix.keys],
        tags=[t for ix in indexes for t in ix.tags])


def pooled_latent_stats(sources: Sequence[DataSource], manifests: Sequence[dict]) -> tuple[tuple, tuple]:
    """Per-channel (mean, std) of the training mix: each cache's statistics weighted by its
    latent count × repeats × weight, i.e. of the latents an epoch feeds the step (with weight 1
    and repeats 1 everywhere: exactly the statistics of the union of the caches)."""
    w, means, vars_ = [], [], []
    for s, m in zip(sources, manifests):
        st = m["latent_stats"]
        w.append(float(st["count"]) * s.multiplicity)
        means.append(np.asarray(st["mean"], np.float64))
        vars_.append(np.asarray(st["std"], np.float64) ** 2)
    w = np.asarray(w) / np.sum(w)
    mean = sum(wi * mi for wi, mi in zip(w, means))
    var = sum(wi * (vi + (mi - mean) ** 2) for wi, mi, vi in zip(w, means, vars_))
    return tuple(float(x) for x in mean), tuple(float(x) for x in np.sqrt(var))
