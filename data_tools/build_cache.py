"""VAE-encode a dataset into the latent cache the trainer reads.

    python -m data_tools.build_cache --images DIR --out CACHE --config configs/ztsnr.py:tiny
    python -m data_tools.build_cache --manifest data.jsonl --out CACHE --config configs/ztsnr.py

Rerunning continues an interrupted build; different settings (VAE, buckets, crop, dtype…) are
refused unless --rebuild. Unusable inputs are listed with their reason in CACHE/skipped.jsonl.
Config fields can be overridden as in train.py (--config.data.shard_size=256). On several
hosts run the same command on every host (after jax.distributed is initialised by
sdxl_jax.parallel): each process encodes its share of the images.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from sdxl_jax.data.build import build_cache  # noqa: F401  (the library entry point)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ztsnr.py", "config file[:preset]")
_IMAGES = flags.DEFINE_string("images", None, "folder of images with same-name .txt captions")
_MANIFEST = flags.DEFINE_string("manifest", None, "JSONL file of {\"path\": …, \"caption\": …}")
_OUT = flags.DEFINE_string("out", None, "cache folder (default: config data.cache_dir)")
_REBUILD = flags.DEFINE_bool("rebuild", False, "delete an existing cache with other settings and start over")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sdxl_jax import parallel
    from sdxl_jax.models import block_torch
    block_torch()
    parallel.maybe_initialize_distributed()
    cfg = _CONFIG.value
    images = _IMAGES.value or (None if _MANIFEST.value else cfg.data.images_dir or None)
    manifest = _MANIFEST.value or (None if images else cfg.data.manifest or None)
    try:
        m = build_cache(cfg, images_dir=images, manifest=manifest, out=_OUT.value, rebuild=_REBUILD.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"build_cache: {e}")
    stats = m["latent_stats"]
    print(f"cache: {m['num_records']} images, {m['num_skipped']} skipped "
          f"(see {m['skip_report']}); buckets {m['bucket_counts']}")
    print(f"latent mean {[round(x, 4) for x in stats['mean']]} std {[round(x, 4) for x in stats['std']]}")


if __name__ == "__main__":
    app.run(main)
