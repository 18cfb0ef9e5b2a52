"""VAE-encode a dataset into the latent cache the trainer reads.

    python -m data_tools.build_cache --images DIR --out CACHE --config configs/ztsnr.py:tiny
    python -m data_tools.build_cache --manifest data.jsonl --out CACHE --config configs/ztsnr.py
    python -m data_tools.build_cache --tfds NAME[:SPLIT] [--tfds-data-dir DIR] \
        [--image-key image] [--caption-key caption] --out CACHE --config configs/ztsnr.py

A TFDS dataset must be prepared in the ArrayRecord format (`tfds build NAME --file_format
array_record`); it is read with tfds.data_source, without TensorFlow.

Rerunning continues an interrupted build and rebuilds any finished shard whose file no longer
has its recorded size and record count (--verify also reads every record back); different
settings (VAE, buckets, crop, dtype…) are refused unless --rebuild. Unusable inputs are listed
with their reason in CACHE/skipped.jsonl; a build that caches no image at all is an error.
Config fields can be overridden as in train.py (--config.data.shard_size=256); the VAE is the
one train.py resolves for the same config (sdxl_jax.run_inputs: --config.model.vae_workdir=RUN,
model.pretrained, or the seeded init), and the trainer refuses a cache of another VAE. On several
hosts run the same command on every host (after jax.distributed is initialised by
sdxl_jax.parallel): each process encodes its share of the images.

--out, --images, --manifest (and its entries) and --tfds-data-dir may be gs://BUCKET/PATH: each
shard is written to a local temporary file and uploaded whole once complete, its summary after
it and the manifest last, so an interrupted build resumes and --verify checks as on disk; the
hosts of a multi-host build write into the same gs:// cache.
"""
from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from sdxl_jax.data.build import build_cache  # noqa: F401  (the library entry point)
from sdxl_jax.data.tfds_source import tfds_from_config

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ztsnr.py", "config file[:preset]")
_IMAGES = flags.DEFINE_string("images", None, "folder of images with same-name .txt captions")
_MANIFEST = flags.DEFINE_string("manifest", None, "JSONL file of {\"path\": …, \"caption\": …}")
_TFDS = flags.DEFINE_string("tfds", None, "prepared TFDS dataset NAME[:SPLIT] (default split train; "
                            "NAME may be dataset/config:version)")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds-data-dir", None, "TFDS data dir holding it (default: "
                                     "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
_IMAGE_KEY = flags.DEFINE_string("image-key", None, "TFDS feature with the image (default image; "
                                 "nested: outer/inner)")
_CAPTION_KEY = flags.DEFINE_string("caption-key", None, "TFDS feature with the caption: text, bytes "
                                   "or a list of tags (default caption)")
_OUT = flags.DEFINE_string("out", None, "cache folder (default: config data.cache_dir)")
_REBUILD = flags.DEFINE_bool("rebuild", False, "delete an existing cache with other settings and start over")
_VERIFY = flags.DEFINE_bool("verify", False, "also read back every record of the finished shards "
                            "(slow: reads the whole cache) and rebuild any that fail")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sdxl_jax import parallel
    parallel.maybe_initialize_distributed()
    cfg = _CONFIG.value
    given = _IMAGES.value or _MANIFEST.value or _TFDS.value  # a flag replaces the config's input
    images = _IMAGES.value or (None if given else cfg.data.images_dir or None)
    manifest = _MANIFEST.value or (None if given or images else cfg.data.manifest or None)
    tfds = tfds_from_config(cfg.data if not (_IMAGES.value or _MANIFEST.value) else {},
                            _TFDS.value, _TFDS_DATA_DIR.value, _IMAGE_KEY.value, _CAPTION_KEY.value)
    if tfds is None and (_TFDS_DATA_DIR.value or _IMAGE_KEY.value or _CAPTION_KEY.value):
        raise ValueError("--tfds-data-dir, --image-key and --caption-key describe a TFDS input: "
                         "name it with --tfds NAME[:SPLIT]")
    from sdxl_jax.run_inputs import resolve_build
    cfg, inputs = resolve_build(cfg, images, manifest, tfds, _OUT.value)
    logging.info("encoding with %s", inputs.vae.describe())
    m = build_cache(cfg, images_dir=images, manifest=manifest, out=_OUT.value, rebuild=_REBUILD.value,
                    tfds=tfds, verify=_VERIFY.value, vae_params=inputs.weights.load(("vae",))["vae"])
    stats = m["latent_stats"]
    print(f"cache: {m['num_records']} images, {m['num_skipped']} skipped "
          f"(see {m['skip_report']}); buckets {m['bucket_counts']}")
    print(f"latent mean {[round(x, 4) for x in stats['mean']]} std {[round(x, 4) for x in stats['std']]}")


if __name__ == "__main__":
    from sdxl_jax import cli
    cli.run_absl(main)  # user errors as one line `error: …`; --debug shows the traceback
