"""A deterministic synthetic dataset of captioned images: flat shapes on flat backgrounds.

    python -m data_tools.make_demo_dataset --out DIR [--n 256] [--seed 0] [--side 256]

Images are `NNNNN.png|jpg|webp` with a same-name `.txt` of comma-separated tags (colour and
shape of every object, how many, the background), aspect ratios from 1:2 to 2:1 and an area
around side². Every 16th image is plain black ("completely black"), every 16th (offset 8)
plain white ("white background"): the cases that zero-terminal-SNR training is about. Large
flat shapes keep the images smooth enough for a tiny VAE/UNet to learn something.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
          "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
          "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128)}
BACKGROUNDS = ("white", "white", "white", "black", "grey", "blue", "yellow", "green")
SHAPES = ("circle", "square", "triangle")
ASPECTS = ((1, 2), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (2, 1))  # (w, h)
COUNT_TAGS = {1: "1 shape", 2: "2 shapes", 3: "3 shapes"}
MARKER = "demo.json"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


def make_example(i: int, seed: int = 0, side: int = 256) -> tuple[Image.Image, list[str], str]:
    """(image, tags, file extension) of example `i`; a pure function of (i, seed, side)."""
    rng = np.random.default_rng([seed, i])
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    area = side * side * rng.uniform(1.0, 1.6)
    w, h = round(math.sqrt(area * aw / ah)), round(math.sqrt(area * ah / aw))
    ext = ".jpg" if i % 5 == 2 else ".webp" if i % 7 == 3 else ".png"
    if i % 16 == 0:
        return Image.new("RGB", (w, h), COLORS["black"]), ["completely black", "black background"], ext
    if i % 16 == 8:
        return (Image.new("RGB", (w, h), COLORS["white"]),
                ["white background", "simple background", "no shapes"], ext)
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = Image.new("RGB", (w, h), COLORS[bg])
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(1, 4))
    tags = []
    for _ in range(count):
        color = rng.choice([c for c in COLORS if c != bg])
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = min(w, h) * rng.uniform(0.18, 0.32)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        tags.append(f"{color} {shape}")
    tags = list(dict.fromkeys(tags)) + [COUNT_TAGS[count], f"{bg} background"]
    if rng.random() < 0.25:
        tags.append("masterpiece")
    return img, tags, ext


def make_demo_dataset(out: str, n: int = 256, seed: int = 0, side: int = 256) -> list[str]:
    """Write the dataset into `out` (kept as is when it already holds this exact dataset)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    spec = {"n": n, "seed": seed, "side": side}
    marker = root / MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("spec") == spec and all((root / f).exists() for f in done["files"]):
            return done["files"]
    files = []
    for i in range(n):
        img, tags, ext = make_example(i, seed, side)
        path = root / f"{i:05d}{ext}"
        if ext == ".png":
            img.save(path, compress_level=1)
        elif ext == ".jpg":
            img.save(path, quality=95)
        else:
            img.save(path, quality=90, method=0)
        path.with_suffix(".txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
        files.append(path.name)
    marker.write_text(json.dumps({"spec": spec, "files": files}))
    return files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write images and captions into")
    ap.add_argument("--n", type=int, default=256, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", type=int, default=256, help="images have an area of about side²")
    args = ap.parse_args(argv)
    files = make_demo_dataset(args.out, args.n, args.seed, args.side)
    print(f"wrote {len(files)} captioned images to {args.out}")


if __name__ == "__main__":
    main()
