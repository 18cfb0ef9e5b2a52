"""Does the demo model follow its prompts? Sample the demo's prompts and score the colours.

    python -m sdxl_jax.tools.prompt_check --workdir runs/demo [--seeds 0 1 2 3] [--out grid.png]

Samples each prompt (default: one per demo background, "completely black" first) with the run's
own sample settings, then scores every image against the colours the demo generator paints
(sdxl_jax/data/demo.py): the background is the palette colour nearest to the median of the
border band (a shape may touch the edge, so not the mean); the shape colour is the palette
colour that most non-background pixels are nearest to, if they cover at least
`min_shape_fraction` of the image (the demo's smallest shape, a triangle of r = 0.18·side,
covers 5.8 %). Nearest palette colour rather than hue, because black, white and grey have none.
Prints one row per image and the fraction right.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from sdxl_jax.data.demo import Expectation, caption_expectation, palette

PROMPTS = ("completely black", "white background, red circle", "blue background, yellow square",
           "grey background, green triangle", "yellow background, purple circle",
           "green background, white square", "black background, orange triangle",
           "white background, simple background, no shapes")
BORDER = 0.08  # width of the border band, as a fraction of the shorter side
MIN_SHAPE_FRACTION = 0.02


@dataclass(frozen=True)
class Score:
    """The colours found in one image."""
    background: str
    shape: str | None  # None: fewer than min_shape_fraction of the pixels are not background
    shape_fraction: float  # share of the image nearest to `shape`


def nearest_colours(pixels: np.ndarray, colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `list(colours)` of the nearest (Euclidean RGB) colour of every pixel (..., 3)."""
    table = np.asarray(list(colours.values()), np.float64)
    d = np.sum((pixels[..., None, :].astype(np.float64) - table) ** 2, axis=-1)
    return np.argmin(d, axis=-1)


def score_image(image: np.ndarray, colours: dict | None = None, border: float = BORDER,
                min_shape_fraction: float = MIN_SHAPE_FRACTION) -> Score:
    """Background and dominant shape colour of an (H, W, 3) uint8 image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"score_image expects an (H, W, 3) RGB image, got shape {image.shape}")
    colours = colours or palette()
    names = list(colours)
    h, w, _ = image.shape
    b = max(1, int(round(border * min(h, w))))
    band = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                           image[b:-b, :b].reshape(-1, 3), image[b:-b, -b:].reshape(-1, 3)])
    bg = int(nearest_colours(np.median(band, axis=0), colours))
    labels = nearest_colours(image, colours).ravel()
    counts = np.bincount(labels, minlength=len(names)).astype(np.float64) / labels.size
    counts[bg] = 0.0
    top = int(np.argmax(counts))
    found = names[top] if counts[top] >= min_shape_fraction else None
    return Score(names[bg], found, float(counts[top]))


def judge(score: Score, want: Expectation) -> tuple[bool | None, bool | None]:
    """(background right, shape right); None where the prompt asks nothing of that kind. With
    shapes named, the dominant one must have one of their colours; for a plain prompt
    ("completely black", "no shapes") there must be no shape at all."""
    bg = None if want.background is None else score.background == want.background
    if want.shapes:
        shape = score.shape in {c for c, _ in want.shapes}
    elif want.plain:
        shape = score.shape is None
    else:
        shape = None
    return bg, shape


def check(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Score prompt-major images (len(prompts)·len(seeds), H, W, 3): one row per image."""
    rows = []
    for k, (prompt, seed) in enumerate((p, s) for p in prompts for s in seeds):
        want = caption_expectation(prompt)
        score = score_image(images[k])
        bg_ok, shape_ok = judge(score, want)
        rows.append(dict(prompt=prompt, seed=int(seed), want_background=want.background,
                         want_shapes=[c for c, _ in want.shapes] or (["none"] if want.plain else []),
                         **asdict(score), background_ok=bg_ok, shape_ok=shape_ok))
    return rows


def summary(rows: list[dict]) -> dict:
    """Fraction right per kind, over the rows where that kind was asked for."""
    out = {}
    for kind in ("background", "shape"):
        asked = [r[f"{kind}_ok"] for r in rows if r[f"{kind}_ok"] is not None]
        out[kind] = (sum(asked), len(asked), sum(asked) / len(asked) if asked else float("nan"))
    return out


def format_table(rows: list[dict]) -> str:
    mark = {True: "yes", False: "NO", None: "-"}
    lines = [f"{'prompt':<50}{'seed':>5}  {'background want/got':<20}{'ok':>4}  "
             f"{'shape want/got (share)':<30}{'ok':>4}"]
    for r in rows:
        bg = f"{r['want_background'] or '-'}/{r['background']}"
        shape = f"{'|'.join(r['want_shapes']) or '-'}/{r['shape'] or 'none'} ({r['shape_fraction']:.0%})"
        lines.append(f"{r['prompt'][:49]:<50}{r['seed']:>5}  {bg:<20}{mark[r['background_ok']]:>4}  "
                     f"{shape:<30}{mark[r['shape_ok']]:>4}")
    s = summary(rows)
    for kind, (right, asked, frac) in s.items():
        lines.append(f"{kind} right: {right}/{asked} ({frac:.0%})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="a trained run (the tiny demo)")
    p.add_argument("--prompt", action="append", help="repeat; default: the demo prompts above")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--out", default="", help="also write the sample grid (one row per prompt) here")
    p.add_argument("--json", default="", help="also write the rows and the summary here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    prompts = a.prompt or list(PROMPTS)
    try:
        for prompt in prompts:
            caption_expectation(prompt)
    except ValueError as e:
        sys.exit(f"error: --prompt: {e}")
    from sdxl_jax.sample import SampleSettings, load_run, make_grid, sampler_for_run, save_png
    try:
        cfg, params, meta = load_run(a.workdir, weights=a.weights)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e} (train the demo first: python train.py --config configs/ztsnr.py:tiny "
                 f"--workdir {a.workdir})")
    settings = SampleSettings.from_config(cfg["sample"])
    if a.steps:
        settings.steps = a.steps
    images, _ = sampler_for_run(cfg, meta)(params, prompts, a.seeds, settings)
    rows = check(images, prompts, a.seeds)
    print(format_table(rows))
    if a.out:
        save_png(make_grid(images, len(prompts), len(a.seeds)), a.out)
        print(f"wrote {a.out}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "summary": summary(rows)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
