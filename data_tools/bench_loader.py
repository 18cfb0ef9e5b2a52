"""Loader throughput and cache-build overhead.

    python -m data_tools.bench_loader --cache CACHE [--config configs/ztsnr.py:tiny]
        [--batch 32] [--steps 200] [--tokenizer fake|model|clip]
        [--compare_build 32]
    python -m data_tools.bench_loader --cache /tmp/c1024 --synthetic 256 --side 1024

1. Loader: samples/s of make_train_iterator (global batch --batch, one process) after a
   warm-up, i.e. what the background pipeline can deliver to a train step.
2. Build overhead: the first --compare_build images of the cache's source are cached again
   (temporary folder) with the config's VAE and timed against the bare jitted VAE encode of the
   same, already decoded, images in the same batches: ratio = build time / encode time.
   Both are timed after compiling every bucket shape.

--tokenizer clip: CLIP's real 49,408-token vocabulary (both SDXL towers' tokenizers), built from
the BPE file in the open_clip_torch wheel (requirements-nodeps.txt) or --vocab_dir (a folder with
vocab.json and merges.txt, or a diffusers SDXL folder).

--synthetic N creates CACHE first (if missing) from N demo images of about --side² pixels,
all cropped to one square side² bucket and "encoded" by 8×8 average pooling (no VAE): a quick
way to measure the loader at SDXL latent sizes (--side 1024 → 128×128×4 latents).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ztsnr.py:tiny", "config file[:preset]")
_CACHE = flags.DEFINE_string("cache", None, "latent cache folder", required=True)
_BATCH = flags.DEFINE_integer("batch", 32, "global batch size for the loader benchmark")
_STEPS = flags.DEFINE_integer("steps", 200, "batches to time")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "fake", ["fake", "model", "clip"],
                               "fake: byte ids (loader alone); model: the preset's CLIP tokenizers; "
                               "clip: CLIP's real vocabulary")
_VOCAB_DIR = flags.DEFINE_string("vocab_dir", "", "--tokenizer clip: vocab.json + merges.txt folder, "
                                 "or a diffusers SDXL folder (default: open_clip_torch's BPE file)")
_COMPARE = flags.DEFINE_integer("compare_build", 32, "images for the build-overhead test; 0 skips it")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 0, "create CACHE from this many demo images if missing")
_SIDE = flags.DEFINE_integer("side", 1024, "image side for --synthetic")


def pool_encode(images: np.ndarray):
    """Stand-in encoder: 8×8 average pooling to (R, G, B, grey); std 0.1. Not a VAE."""
    b, h, w, _ = images.shape
    rgb = images.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    mean = np.concatenate([rgb, rgb.mean(-1, keepdims=True)], -1)
    return mean, np.full_like(mean, 0.1)


def fake_tokenize(max_chunks: int):
    """Deterministic byte-level ids (no vocabulary) of the right shape."""
    length = 77 * max_chunks

    def tokenize(captions):
        ids = np.zeros((len(captions), length), np.int32)
        for i, c in enumerate(captions):
            b = np.frombuffer(c.encode("utf-8")[:length], np.uint8)
            ids[i, :len(b)] = b
        return ids, ids
    return tokenize


def _clip_tokenizers():
    """CLIP's real vocabulary: --vocab_dir, else the BPE file of the open_clip_torch wheel."""
    from sdxl_jax.models import tokenizer as T
    folder = _VOCAB_DIR.value
    if folder and os.path.isdir(os.path.join(folder, "tokenizer_2")):
        return T.get_tokenizers("sdxl", folder)
    if not folder:
        import importlib.metadata
        try:
            bpe = importlib.metadata.distribution("open_clip_torch").locate_file(
                "open_clip/bpe_simple_vocab_16e6.txt.gz")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit("error: --tokenizer clip needs open_clip_torch (pip install --no-deps "
                             "-r requirements-nodeps.txt) or --vocab_dir") from None
        folder = tempfile.mkdtemp(prefix="clip_vocab_")
        T.write_clip_vocab(str(bpe), folder)
    return T.tokenizers_from_files(os.path.join(folder, "vocab.json"),
                                   os.path.join(folder, "merges.txt"))


def _model_tokenize(cfg, kind: str = "model"):
    from sdxl_jax import models
    if kind == "clip":
        tok_l, tok_g = _clip_tokenizers()
    else:
        tok_l, tok_g = models.get_tokenizers(cfg.model.preset, cfg.model.pretrained)
    n = cfg.text.max_chunks
    return lambda caps: (models.tokenize(tok_l, caps, n), models.tokenize(tok_g, caps, n))


def bench_loader(cfg, cache: str, batch: int, steps: int, tokenize) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) of the train iterator.

    The second number is what the loader costs regardless of other load on the machine.
    """
    from sdxl_jax.data import make_train_iterator
    it = make_train_iterator(cfg, cache, tokenize, global_batch_size=batch)
    for _ in range(5):
        next(it)
    t, cpu = time.perf_counter(), time.process_time()
    n = sum(len(next(it)["loss_weight"]) for _ in range(steps))
    rates = n / (time.perf_counter() - t), n / (time.process_time() - cpu)
    it.close()
    return rates


def _sources(cache: str, n: int) -> list[dict]:
    """Up to n (path, caption) pairs that the cache was built from (cached ones only)."""
    from sdxl_jax.data.cache import load_manifest, read_index
    from sdxl_jax.data.images import list_folder, list_manifest, read_caption
    manifest = load_manifest(cache)
    kind, path = manifest["settings"]["source"].split(":", 1)
    srcs = (list_folder(path) if kind == "images" else list_manifest(path))[0]
    cached = set(read_index(cache, manifest).keys)
    srcs = [s for s in srcs if s.key in cached][:n]
    return [{"path": s.path, "caption": read_caption(s)} for s in srcs]


def bench_build(cfg, cache: str, n: int, repeats: int = 2) -> dict:
    """Build time of n images vs the bare encode of the same decoded batches (after compiling)."""
    from sdxl_jax.data.build import _scan_one, build_cache
    from sdxl_jax.data.buckets import buckets_from_config
    from sdxl_jax.data.encode import make_vae_encoder
    from sdxl_jax.data.images import Source, load_pixels
    from sdxl_jax.run_inputs import resolve_weights
    encode, fingerprint = make_vae_encoder(cfg, resolve_weights(cfg).load(("vae",))["vae"])
    buckets = buckets_from_config(cfg.data.buckets)
    batch = int(cfg.data.build_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        listing = os.path.join(tmp, "subset.jsonl")
        with open(listing, "w") as f:
            for s in _sources(cache, n):
                f.write(json.dumps(s) + "\n")
        items = [_scan_one(Source(s["path"], s["path"], s["caption"]), cfg, buckets)
                 for s in map(json.loads, open(listing))]
        groups: dict[int, list[np.ndarray]] = {}
        for it in items:
            if not isinstance(it, tuple):
                groups.setdefault(it.bucket, []).append(
                    load_pixels(it.src.path, cfg.data.max_image_pixels, it.fit, buckets[it.bucket]))
        batches = []
        for px in groups.values():
            for k in range(0, len(px), batch):
                chunk = np.stack(px[k:k + batch])
                batches.append(np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]))
        for b in {x.shape: x for x in batches}.values():  # compile every bucket shape
            encode(b)
        bare, built = [], []
        for rep in range(repeats):  # interleaved, best of each: less sensitive to other load
            t = time.perf_counter()
            for b in batches:
                encode(b)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            build_cache(cfg, manifest=listing, out=os.path.join(tmp, f"cache{rep}"), encode_fn=encode,
                        encoder_fingerprint=fingerprint, process_index=0, process_count=1,
                        progress=False)
            built.append(time.perf_counter() - t)
    return {"images": sum(len(v) for v in groups.values()), "build_s": min(built),
            "bare_encode_s": min(bare), "ratio": min(built) / min(bare)}


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.WARNING)
    cfg = _CONFIG.value
    cache = _CACHE.value
    if _SYNTHETIC.value and not os.path.exists(os.path.join(cache, "manifest.json")):
        from sdxl_jax.data.demo import make_demo_dataset
        from sdxl_jax.data.build import build_cache
        images = cache.rstrip("/") + "_images"
        make_demo_dataset(images, _SYNTHETIC.value, side=_SIDE.value)
        with cfg.unlocked():
            side = _SIDE.value
            # one square bucket: every image is cropped to side², latents (side/8)²×4
            cfg.data.buckets.update(max_area=side * side, min_side=side, max_side=side,
                                    base=(side, side), max_ar_error=1.0)
            cfg.data.min_image_pixels = side * side // 4
        build_cache(cfg, images_dir=images, out=cache, encode_fn=pool_encode,
                    encoder_fingerprint="avgpool8", process_index=0, process_count=1)
    tokenize = (fake_tokenize(cfg.text.max_chunks) if _TOKENIZER.value == "fake" else
                _model_tokenize(cfg, _TOKENIZER.value))
    rate, cpu_rate = bench_loader(cfg, cache, _BATCH.value, _STEPS.value, tokenize)
    from sdxl_jax.data.cache import load_manifest
    shapes = sorted({tuple(s["latent_shape"]) for s in load_manifest(cache)["shards"]})
    print(f"loader: {rate:,.0f} samples/s ({cpu_rate:,.0f} per CPU-second; global batch "
          f"{_BATCH.value}, latents {shapes}, tokenizer {_TOKENIZER.value}, "
          f"{cfg.data.read_threads} read threads)")
    if _COMPARE.value > 0:
        r = bench_build(cfg, cache, _COMPARE.value)
        print(f"build: {r['images']} images in {r['build_s']:.2f} s vs bare jitted VAE encode "
              f"{r['bare_encode_s']:.2f} s -> overhead ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    from sdxl_jax import cli
    cli.run_absl(main)  # user errors as one line `error: …`; --debug shows the traceback
