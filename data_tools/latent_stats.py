"""Per-channel mean and std of every latent in a cache (float64, streaming; METHODS §10).

    python -m data_tools.latent_stats --cache CACHE

Prints the statistics and stores them in CACHE/latent_stats.json. build_cache computes the same
numbers while encoding (manifest.json "latent_stats"); this recomputes them from the stored
latents, e.g. for a cache copied from elsewhere or as a check.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from sdxl_jax.data.cache import (SHARD_EXT, STATS, LatentStats, decode_record, load_manifest,
                                 write_json)
_READ_CHUNK = 256  # records per read: bounded memory for any shard size


def compute_latent_stats(cache_dir: str) -> LatentStats:
    """Stream every shard of the cache once; memory is one chunk of records."""
    stats = LatentStats()
    for shard in load_manifest(cache_dir)["shards"]:
        reader = ArrayRecordReader(str(Path(cache_dir) / (shard["name"] + SHARD_EXT)))
        try:
            n = reader.num_records()
            for start in range(0, n, _READ_CHUNK):
                raws = reader.read(list(range(start, min(n, start + _READ_CHUNK))))
                stats.update(np.stack([decode_record(r)["latent"] for r in raws]))
        finally:
            reader.close()
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="latent cache folder (built by build_cache)")
    args = ap.parse_args(argv)
    try:
        stats = compute_latent_stats(args.cache)
    except (OSError, ValueError) as e:
        raise SystemExit(f"latent_stats: {e}") from None
    if stats.count == 0:
        raise SystemExit(f"cache {args.cache} holds no latents")
    result = {"count": stats.count, "mean": stats.mean.tolist(), "std": stats.std.tolist()}
    write_json(Path(args.cache) / STATS, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
