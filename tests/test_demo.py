"""The demo generator's known colours, prompt_check's scorer and the VAE's KL term."""
import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import demo
from sdxl_jax.tools import prompt_check as pc

RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 40, 40), "blue": (40, 80, 220),
       "yellow": (240, 210, 40), "grey": (128, 128, 128)}


def test_palette_and_caption_expectations_are_the_literal_table():
    pal = demo.palette()
    for name, rgb in RGB.items():
        assert pal[name] == rgb
    E = demo.Expectation
    assert demo.caption_expectation("completely black") == E("black", (), True)
    assert demo.caption_expectation("white background, red circle") == E("white", (("red", "circle"),))
    assert demo.caption_expectation("blue background, yellow square") == E("blue", (("yellow", "square"),))
    assert demo.caption_expectation("red circle, 2 shapes, masterpiece, grey background, red circle, "
                                    "black triangle") == E("grey", (("red", "circle"), ("black", "triangle")))
    assert demo.caption_expectation("white background, simple background, no shapes") == E("white", (), True)
    assert demo.caption_expectation("red circle") == E(None, (("red", "circle"),))
    with pytest.raises(ValueError, match="'blu background' names an unknown colour"):
        demo.caption_expectation("blu background, red circle")
    with pytest.raises(ValueError, match="two backgrounds"):
        demo.caption_expectation("completely black, white background")


def _border_mode(img: np.ndarray) -> tuple:
    band = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    colours, counts = np.unique(band, axis=0, return_counts=True)
    return tuple(int(v) for v in colours[np.argmax(counts)])


def test_specs_match_the_rendered_pixels():
    pal = demo.palette()
    kinds = set()
    for i in range(40):
        spec = demo.example_spec(i, seed=0, side=64)
        img = np.asarray(demo.render(spec))
        assert img.shape == (spec.height, spec.width, 3)
        assert _border_mode(img) == pal[spec.background], i
        if spec.shapes:  # the last-drawn shape is on top: its centre has its colour exactly
            top = spec.shapes[-1]
            assert tuple(img[int(top.cy), int(top.cx)]) == pal[top.color], i
        want = demo.caption_expectation(", ".join(spec.tags))
        assert want.background == spec.background
        assert set(want.shapes) == {(s.color, s.shape) for s in spec.shapes}
        assert want.plain == (not spec.shapes)
        # the background is the first tag: where the prompts name it and keep_first_n=1 keeps it
        first = demo.caption_expectation(spec.tags[0])
        assert first.background == spec.background and not first.shapes, i
        kinds.add("plain" if not spec.shapes else "shapes")
    assert demo.example_spec(0).tags[0] == "completely black" and demo.example_spec(8).background == "white"
    assert kinds == {"plain", "shapes"}


def test_written_files_border_is_the_captions_background(tmp_path):
    """Through the files as written (png, lossy jpg and webp): prompt_check's border colour is
    the background the caption names, and the CLI module re-exports the same generator."""
    from data_tools import make_demo_dataset as cli
    assert cli.make_demo_dataset is demo.make_demo_dataset
    files = demo.make_demo_dataset(str(tmp_path), n=24, seed=0, side=64)
    assert {f.rsplit(".", 1)[1] for f in files} == {"png", "jpg", "webp"}
    for name in files:
        img = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        caption = (tmp_path / name).with_suffix(".txt").read_text()
        assert pc.score_image(img).background == demo.caption_expectation(caption).background, name


def _canvas(bg, size=64):
    return np.broadcast_to(np.array(RGB[bg], np.uint8), (size, size, 3)).copy()


def test_scorer_classifies_literal_images_and_rejects_wrong_ones():
    img = _canvas("blue")
    img[20:44, 20:44] = RGB["yellow"]  # a 24×24 square: 576 of 4096 pixels
    s = pc.score_image(img)
    assert s == pc.Score("blue", "yellow", 576 / 4096)
    assert pc.judge(s, demo.caption_expectation("blue background, yellow square")) == (True, True)
    assert pc.judge(s, demo.caption_expectation("white background, red circle")) == (False, False)
    assert pc.judge(s, demo.caption_expectation("blue background, red circle")) == (True, False)

    black = _canvas("black")
    assert pc.score_image(black) == pc.Score("black", None, 0.0)
    assert pc.judge(pc.score_image(black), demo.caption_expectation("completely black")) == (True, True)
    grey = _canvas("grey")  # a grey "black" image is wrong
    assert pc.judge(pc.score_image(grey), demo.caption_expectation("completely black")) == (False, True)
    black[40:60, 40:60] = RGB["red"]  # 400 px ≥ 2 %: a shape where there should be none
    assert pc.judge(pc.score_image(black), demo.caption_expectation("completely black")) == (True, False)

    # a shape across the top edge covers part of the border band; noise of ±30 per channel:
    # the median of the band and the nearest palette colours still see white + red
    rng = np.random.default_rng(0)
    img = _canvas("white").astype(np.int32)
    img[0:30, 10:50] = RGB["red"]
    img = np.clip(img + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8)
    s = pc.score_image(img)
    assert (s.background, s.shape) == ("white", "red") and abs(s.shape_fraction - 1200 / 4096) < 0.01


def test_check_rows_and_summary_count_literals():
    ok = _canvas("white")
    ok[16:48, 16:48] = RGB["red"]
    wrong = _canvas("grey")
    images = np.stack([_canvas("black"), wrong, ok, ok])
    rows = pc.check(images, ["completely black", "white background, red circle"], [0, 1])
    assert [(r["background_ok"], r["shape_ok"]) for r in rows] == [(True, True), (False, True),
                                                                    (True, True), (True, True)]
    assert pc.summary(rows) == {"background": (3, 4, 0.75), "shape": (4, 4, 1.0)}
    table = pc.format_table(rows)
    assert "background right: 3/4 (75%)" in table and table.count("\n") == len(rows) + 2


def test_kl_term_equals_float64_numpy():
    import jax
    import jax.numpy as jnp

    from sdxl_jax.train import vae_losses as L
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 3, (3, 4, 5, 4)).astype(np.float32)
    std = np.exp(rng.uniform(-8, 1, (3, 4, 5, 4))).astype(np.float32)
    values = 32 * 40 * 3  # the encoded image's H·W·3
    m, s = mean.astype(np.float64), std.astype(np.float64)
    want = 0.5 * np.sum(m ** 2 + s ** 2 - 1 - np.log(s ** 2), axis=(1, 2, 3)) / values
    got = np.asarray(L.kl_loss(jnp.asarray(mean), jnp.asarray(std), values))
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    # the prior itself has zero divergence; ∂/∂μ = μ / image_values, ∂/∂σ = (σ − 1/σ) / image_values
    assert np.all(np.asarray(L.kl_loss(jnp.zeros((2, 3, 3, 4)), jnp.ones((2, 3, 3, 4)), 7)) == 0.0)
    gm, gs = jax.grad(lambda a, b: jnp.sum(L.kl_loss(a, b, values)), argnums=(0, 1))(jnp.asarray(mean),
                                                                                       jnp.asarray(std))
    np.testing.assert_allclose(np.asarray(gm), m / values, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gs), (s - 1 / s) / values, rtol=1e-5)
    assert L.KL_WEIGHT == 1e-6


def test_mean_leak_is_the_z_score_of_a_class_mean_under_noise():
    from sdxl_jax.tools.black_check import mean_leak
    assert mean_leak([3.0, 4.0, 0.0, 0.0], 10.0, (16, 16)) == pytest.approx(8.0)  # ‖(3,4)‖·16/10
    assert mean_leak([3.0, 4.0, 0.0, 0.0], 10.0, (128, 128)) == pytest.approx(64.0)  # ∝ latent side
    # the unit: the spatial mean of N(0, σ²) noise over h×w latents has std σ/√(h·w) per channel
    rng = np.random.default_rng(0)
    means = (10.0 * rng.standard_normal((2000, 16, 16, 4), np.float32)).mean(axis=(1, 2))
    np.testing.assert_allclose(means.std(axis=0), 10.0 / 16, rtol=0.06)


def test_a_folder_written_with_older_captions_is_rewritten(tmp_path):
    """demo.json records the caption version: a folder from before the background-first
    captions is written again instead of being kept as this dataset."""
    import json
    files = demo.make_demo_dataset(str(tmp_path), n=3, side=32)
    caption = (tmp_path / files[1]).with_suffix(".txt")
    new = caption.read_text()
    marker = tmp_path / demo.MARKER
    done = json.loads(marker.read_text())
    done["spec"]["captions"] = 1
    marker.write_text(json.dumps(done))
    caption.write_text("red circle, 1 shape, blue background\n")
    assert demo.make_demo_dataset(str(tmp_path), n=3, side=32) == files
    assert caption.read_text() == new and new.startswith(demo.example_spec(1, side=32).tags[0])
