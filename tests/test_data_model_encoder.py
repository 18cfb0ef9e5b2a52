"""build_cache's default encoder: the model layer's tiny VAE, jitted over the 8 local test devices."""
import jax
import numpy as np
from PIL import Image

from configs.ztsnr import get_config
from sdxl_jax import models
from sdxl_jax.data import cache as C
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.encode import params_fingerprint


def test_build_with_the_model_vae(tmp_path):
    cfg = get_config("tiny")
    cfg.model.dtype = "float32"
    cfg.data.buckets.crop = "center"
    images = tmp_path / "images"
    images.mkdir()
    colours = [(255, 0, 0), (0, 0, 0), (250, 250, 250)]
    for i, rgb in enumerate(colours):  # 128x128: the tiny base bucket, one compile
        img = Image.new("RGB", (128, 128), rgb)
        img.paste((0, 128, 255), (32, 32, 80, 96))
        img.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"colour {i}")
    # random parameters of the right shapes, drawn in numpy (init_params' compile is the slow part)
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if len(a.shape) >= 2:  # kernels: N(0, 1/fan_in) keeps activations O(1)
            return rng.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])), a.shape).astype(np.float32)
        return np.full(a.shape, 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0, np.float32)
    params = jax.tree_util.tree_map_with_path(leaf, models.abstract_params("vae", "tiny"))
    m = build_cache(cfg, images_dir=str(images), out=str(tmp_path / "c"), vae_params=params,
                    process_index=0, process_count=1, progress=False)
    assert m["num_records"] == 3 and m["num_skipped"] == 0
    assert m["vae_fingerprint"] == params_fingerprint(
        params, {"preset": "tiny", "dtype": "float32", "fn": "vae_encode/mean"})
    # the stored latents are the VAE posterior means of the same pixels, encoded unsharded here
    vae = models.build_vae("tiny", "float32")
    pixels = np.stack([np.asarray(Image.open(images / f"{i}.png"), np.float32) / 127.5 - 1 for i in range(3)])
    mean, _ = jax.jit(lambda p, x: models.vae_encode(vae, p, x))(params, pixels)
    index = C.read_index(str(tmp_path / "c"))
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(index.files[0])
    for raw in reader.read(list(range(3))):
        rec = C.decode_record(raw)
        i = int(rec["key"].split(".")[0])
        assert rec["latent"].shape == (16, 16, 4)
        np.testing.assert_allclose(rec["latent"].astype(np.float32), np.asarray(mean[i]),
                                   rtol=2e-3, atol=2e-3)
    assert np.abs(np.asarray(mean[0]) - np.asarray(mean[1])).max() > 0.1  # the latents do depend on the image
