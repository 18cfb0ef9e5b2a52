"""Per-channel mean and std of every latent in a cache (float64, streaming; METHODS §10).

    python -m data_tools.latent_stats --cache CACHE

Prints the statistics and stores them in CACHE/latent_stats.json. build_cache computes the same
numbers while encoding (manifest.json "latent_stats"); this recomputes them from the stored
latents, e.g. for a cache copied from elsewhere or as a check.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from sdxl_jax import cli
from sdxl_jax.data.cache import STATS, LatentStats, decode_record, read_index, write_json

_READ_CHUNK = 256  # records per read: bounded memory for any shard size


def compute_latent_stats(cache_dir: str) -> LatentStats:
    """Stream every shard of the cache once; memory is one chunk of records."""
    stats = LatentStats()
    for path in read_index(cache_dir).files:  # every shard checked first (presence, size, count)
        reader = ArrayRecordReader(path)
        try:
            n = reader.num_records()
            for start in range(0, n, _READ_CHUNK):
                raws = reader.read(list(range(start, min(n, start + _READ_CHUNK))))
                stats.update(np.stack([decode_record(r)["latent"] for r in raws]))
        finally:
            reader.close()
    return stats


@cli.entry_point  # user errors: one line `error: …`; --debug shows the traceback
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m data_tools.latent_stats",
                            description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="latent cache folder (built by build_cache)")
    args = ap.parse_args(argv)
    stats = compute_latent_stats(args.cache)
    cli.check(stats.count > 0, f"cache {args.cache} holds no latents")
    result = {"count": stats.count, "mean": stats.mean.tolist(), "std": stats.std.tolist()}
    write_json(Path(args.cache) / STATS, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
