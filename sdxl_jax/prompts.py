"""Prompt files for previews and the sample CLI, in kohya sd-scripts' format.

One prompt per line; blank lines and lines starting with `#` are skipped. Options follow the
prompt, each introduced by " --" (as kohya splits them):

    masterpiece, 1girl, night sky --n lowres, bad hands --w 832 --h 1216 --d 42 --l 6.5 --s 28

`--n` negative prompt, `--w`/`--h` size in pixels, `--d` seed, `--l` CFG scale, `--s` steps; an
option given twice keeps the last value (as in kohya). Any other option is an error naming the
file and line. A prompt with its own size is drawn at the nearest training bucket: nearest in
log aspect ratio, then nearest in log area, then the first in bucket order, so previews use
shapes the model trained on; a missing side takes the default size's.

Prompts with the same settings (size, steps, CFG, negative) are sampled together, in batches
of at most `batch_size` images (one compiled shape per setting), so a long file is a long run,
never one giant batch.

Seeds are integers in [0, 2³²): JAX's PRNGKey keeps 32 bits without x64, so a larger seed would
draw the same noise as a smaller one (and one beyond 64 bits cannot be converted at all).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sdxl_jax.data.buckets import Bucket, make_buckets

# option letter → (PromptSpec field, parser)
OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "l": ("cfg", float), "s": ("steps", int)}
_OPTION_START = re.compile(r"(?:^|\s)--(?=\S)")
SEED_LIMIT = 2 ** 32  # seeds are 0 … SEED_LIMIT - 1 (see the module docstring)
DEFAULT_BATCH = 8  # images per sampling call: the usual preview grids stay one call (not measured
# against device memory: the sample CLI's --batch-size lowers it)
GRID_FILL = 128  # grey around rows narrower or shorter than the widest


@dataclass(frozen=True)
class PromptSpec:
    """One line of a prompt file; None = the default setting."""
    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    line: int = 0


def parse_prompt_line(text: str, where: str = "prompt") -> PromptSpec | None:
    """The PromptSpec of one line, None for a blank or comment line; ValueError names `where`."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    parts = _OPTION_START.split(text)
    values: dict = {}
    for part in parts[1:]:
        name, _, value = part.partition(" ")
        key = name.lower()
        value = value.strip()
        if key not in OPTIONS:
            raise ValueError(f"{where}: unknown option --{name}; prompt files take "
                             + ", ".join(f"--{k}" for k in OPTIONS))
        field, kind = OPTIONS[key]
        if kind is str:
            values[field] = value
            continue
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{where}: --{name} needs {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
        if field == "seed":
            check_seed(number, f"{where}: --{name}")
        if field in ("width", "height", "steps") and number < 1:
            raise ValueError(f"{where}: --{name} {number} must be at least 1")
        if kind is float and not math.isfinite(number):
            raise ValueError(f"{where}: --{name} {value} must be a finite number")
        values[field] = number
    return PromptSpec(prompt=parts[0].strip(), **values)


def check_seed(seed: int, where: str = "seed") -> int:
    """`seed` when it is in [0, 2³²), else ValueError naming `where`."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{where} {seed}: a seed must be an integer from 0 to {SEED_LIMIT - 1}")
    return seed


def read_prompt_file(path: str) -> list[PromptSpec]:
    """Every prompt of a kohya-style prompt file, with its line number (from 1)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"prompt file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    specs = []
    for i, line in enumerate(lines, 1):
        spec = parse_prompt_line(line, f"{path}:{i}")
        if spec is not None:
            specs.append(dataclasses.replace(spec, line=i))
    if not specs:
        raise ValueError(f"prompt file {path!r} holds no prompt (only blank or # lines)")
    return specs


def config_buckets(cfg) -> list[Bucket]:
    """The bucket table of a run config (ConfigDict or the dict saved with a checkpoint)."""
    b = cfg["data"]["buckets"]
    return make_buckets(int(b["max_area"]), int(b["min_side"]), int(b["max_side"]), int(b["step"]),
                        tuple(b["base"]) if b["base"] else None)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio, then in log area, then the first listed."""
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    ar, area = math.log(width / height), math.log(width * height)
    # rounded so that float noise between equal ratios cannot decide a tie
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 9),
                                       round(abs(math.log(b[0] * b[1]) - area), 9)))


@dataclass(frozen=True)
class PromptJob:
    """One grid row: a prompt, its seeds (the columns) and its sampling settings."""
    prompt: str
    seeds: tuple[int, ...]
    settings: object  # sdxl_jax.sample.SampleSettings


def resolve_prompts(specs: Sequence[PromptSpec], defaults, seeds: Sequence[int],
                    buckets: Sequence[Bucket]) -> list[PromptJob]:
    """Jobs of the specs over `defaults` (a SampleSettings): `--d` replaces the seed list, a
    given `--w`/`--h` snaps to the nearest bucket, other options replace the default value."""
    jobs = []
    for spec in specs:
        s = defaults
        if spec.width is not None or spec.height is not None:
            w, h = nearest_bucket(spec.width or defaults.width, spec.height or defaults.height, buckets)
            s = dataclasses.replace(s, width=w, height=h)
        for field in ("negative", "cfg", "steps"):
            if getattr(spec, field) is not None:
                s = dataclasses.replace(s, **{field: getattr(spec, field)})
        jobs.append(PromptJob(spec.prompt, (spec.seed,) if spec.seed is not None else tuple(seeds), s))
    return jobs


def preview_jobs(sample_cfg, buckets: Sequence[Bucket]) -> list[PromptJob]:
    """The in-training previews: `sample.prompts_file` when set, else sample.prompts × seeds."""
    from sdxl_jax.sampling import SampleSettings
    defaults = SampleSettings.from_config(sample_cfg)
    seeds = tuple(int(s) for s in sample_cfg["seeds"])
    path = sample_cfg.get("prompts_file", "")  # absent from configs saved before the key
    if path:
        return resolve_prompts(read_prompt_file(path), defaults, seeds, buckets)
    return [PromptJob(p, seeds, defaults) for p in sample_cfg["prompts"]]


def render_jobs(sampler, unet_params, jobs: Sequence[PromptJob], text_params=None,
                batch_size: int = DEFAULT_BATCH, on_done=None) -> list[np.ndarray] | None:
    """uint8 images (len(seeds), H, W, 3) per job, in job order. Jobs with equal settings are
    sampled together in `sampler.generate` calls of at most `batch_size` images; a setting with
    more images than that runs in full batches (the last one padded by repeating its last
    image), so each setting compiles one shape whatever the file's length.

    `on_done(index, images)`, when given, receives each job's images as soon as its last batch
    finishes and nothing is kept (returns None): a long prompt file holds one batch in memory.
    `text_params` replace the sampler's frozen text encoders (runs that train them)."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: must be at least 1")
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(dataclasses.astuple(job.settings), []).append(i)
    out: list = [None] * len(jobs)
    for members in groups.values():
        pairs = [(i, jobs[i].prompt, seed) for i in members for seed in jobs[i].seeds]
        settings = jobs[members[0]].settings
        size = min(batch_size, len(pairs))
        parts: dict[int, list] = {}
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            batch = [(p, seed) for _, p, seed in chunk]
            batch += batch[-1:] * (size - len(batch))
            images, _ = (sampler.generate(unet_params, batch, settings) if text_params is None
                         else sampler.generate(unet_params, batch, settings, text_params))
            for (i, _, _), image in zip(chunk, images):
                parts.setdefault(i, []).append(image)
                if len(parts[i]) == len(jobs[i].seeds):
                    done = np.stack(parts.pop(i))
                    if on_done is None:
                        out[i] = done
                    else:
                        on_done(i, done)
    return None if on_done is not None else out


def rows_grid(rows: Sequence[np.ndarray], fill: int = GRID_FILL) -> np.ndarray:
    """One grid row per (n, H, W, 3) block, its images side by side; rows narrower than the
    widest are padded on the right with `fill` (a row's images share one size)."""
    width = max(r.shape[0] * r.shape[2] for r in rows)
    out = []
    for r in rows:
        n, h, w, c = r.shape
        line = r.transpose(1, 0, 2, 3).reshape(h, n * w, c)
        out.append(np.pad(line, ((0, 0), (0, width - n * w), (0, 0)), constant_values=fill))
    return np.concatenate(out, axis=0)


def render_grid(sampler, unet_params, jobs: Sequence[PromptJob], text_params=None,
                batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """The preview grid of the jobs: one row per job, one column per seed."""
    return rows_grid(render_jobs(sampler, unet_params, jobs, text_params, batch_size))
