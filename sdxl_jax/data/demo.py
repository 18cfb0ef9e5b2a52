"""The synthetic demo dataset: flat shapes on flat backgrounds, with their known colours.

Images are `NNNNN.png|jpg|webp` with a same-name `.txt` of comma-separated tags (the
background first, then the colour and shape of every object and how many), aspect ratios from
1:2 to 2:1 and an area around side². Every 16th image is plain black ("completely black"),
every 16th (offset 8) plain white ("white background"): the cases that zero-terminal-SNR
training is about. Large flat shapes keep the images smooth enough for a tiny VAE/UNet to
learn something.

The background tag comes first because the demo's prompts name it first ("blue background,
yellow square") and the trainer keeps the first tag in place (`data.keep_first_n=1`) while it
shuffles the rest. The tiny text towers are random and frozen, so their states depend on a
word's position as much as on the word: with the background tag anywhere but first (it used to
come last), a colour word in first position meant a shape's colour in every training caption,
and the demo model painted "blue background" prompts black (prompt_check: 16 of 32 backgrounds
right at 1,500 steps; background first: 28 of 32, same steps and seeds).

Every example is first drawn as an `ExampleSpec` (size, background, shapes, tags) and then
rendered, so the colours a picture should have are known exactly: `palette()` gives the RGB of
every colour name and `caption_expectation` reads the background and shape colours a caption
(or a prompt such as "white background, red circle") asks for. `tools/prompt_check` scores
sampled images against them. The CLI is `python -m data_tools.make_demo_dataset`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
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
BLACK_TAG = "completely black"  # the plain black images' first tag (no "<colour> background" needed)
NO_SHAPES_TAG = "no shapes"
MARKER = "demo.json"
# 2: the background tag first (1: last). A folder written with other captions is rewritten.
CAPTION_VERSION = 2
# "<word> background" tags that name no colour
_PLAIN_BACKGROUND_TAGS = ("simple background",)


@dataclass(frozen=True)
class DrawnShape:
    color: str
    shape: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class ExampleSpec:
    """Everything example i is made of; `shapes` in drawing order (later ones on top)."""
    width: int
    height: int
    ext: str
    background: str
    shapes: tuple[DrawnShape, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Expectation:
    """What a caption asks for: a background colour (None: the caption names none), the
    (colour, shape) pairs it names, in caption order, and whether it says there are no shapes
    ("completely black", "no shapes": the plain images)."""
    background: str | None
    shapes: tuple[tuple[str, str], ...]
    plain: bool = False


def palette() -> dict[str, tuple[int, int, int]]:
    """Colour name → RGB of every colour the generator paints (backgrounds and shapes)."""
    return dict(COLORS)


def caption_expectation(caption: str) -> Expectation:
    """The background and shape colours named by a caption's tags. Other tags (counts,
    "masterpiece", "no shapes", "simple background") name no colour and are ignored; a
    "<word> background" tag with an unknown colour or two different backgrounds is an error."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    background, shapes = None, []
    plain = any(t in (BLACK_TAG, NO_SHAPES_TAG) for t in tags)
    for tag in tags:
        words = tag.split()
        if tag == BLACK_TAG:
            found = "black"
        elif len(words) == 2 and words[1] == "background" and tag not in _PLAIN_BACKGROUND_TAGS:
            if words[0] not in COLORS:
                raise ValueError(f"caption {caption!r}: tag {tag!r} names an unknown colour; the "
                                 f"demo's colours are {sorted(COLORS)}")
            found = words[0]
        else:
            if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES:
                shapes.append((words[0], words[1]))
            continue
        if background is not None and background != found:
            raise ValueError(f"caption {caption!r} names two backgrounds: {background} and {found}")
        background = found
    if plain and shapes:
        raise ValueError(f"caption {caption!r} names shapes and says there are none")
    return Expectation(background, tuple(dict.fromkeys(shapes)), plain)


def example_spec(i: int, seed: int = 0, side: int = 256) -> ExampleSpec:
    """The spec of example `i`; a pure function of (i, seed, side)."""
    rng = np.random.default_rng([seed, i])
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    area = side * side * rng.uniform(1.0, 1.6)
    w, h = round(math.sqrt(area * aw / ah)), round(math.sqrt(area * ah / aw))
    ext = ".jpg" if i % 5 == 2 else ".webp" if i % 7 == 3 else ".png"
    if i % 16 == 0:
        return ExampleSpec(w, h, ext, "black", (), (BLACK_TAG, "black background"))
    if i % 16 == 8:
        return ExampleSpec(w, h, ext, "white", (), ("white background", "simple background", NO_SHAPES_TAG))
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    count = int(rng.integers(1, 4))
    shapes, tags = [], []
    for _ in range(count):
        color = str(rng.choice([c for c in COLORS if c != bg]))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = min(w, h) * rng.uniform(0.18, 0.32)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        shapes.append(DrawnShape(color, shape, float(cx), float(cy), float(r)))
        tags.append(f"{color} {shape}")
    tags = [f"{bg} background"] + list(dict.fromkeys(tags)) + [COUNT_TAGS[count]]
    if rng.random() < 0.25:
        tags.append("masterpiece")
    return ExampleSpec(w, h, ext, bg, tuple(shapes), tuple(tags))


def render(spec: ExampleSpec) -> Image.Image:
    """The RGB picture of a spec."""
    img = Image.new("RGB", (spec.width, spec.height), COLORS[spec.background])
    draw = ImageDraw.Draw(img)
    for s in spec.shapes:
        fill, cx, cy, r = COLORS[s.color], s.cx, s.cy, s.r
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img


def make_example(i: int, seed: int = 0, side: int = 256) -> tuple[Image.Image, list[str], str]:
    """(image, tags, file extension) of example `i`; a pure function of (i, seed, side)."""
    spec = example_spec(i, seed, side)
    return render(spec), list(spec.tags), spec.ext


def make_demo_dataset(out: str, n: int = 256, seed: int = 0, side: int = 256) -> list[str]:
    """Write the dataset into `out` (kept as is when it already holds this exact dataset)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    spec = {"n": n, "seed": seed, "side": side, "captions": CAPTION_VERSION}
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


def data_dir(workdir: str) -> str:
    """Where the generated demo dataset of a run is: <workdir>/demo_data, on this host for a
    gs:// workdir (PIL writes files)."""
    import os
    from sdxl_jax import paths
    return os.path.join(paths.local_mirror_dir(workdir, "runs"), "demo_data")
