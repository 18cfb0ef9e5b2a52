"""Image grids as PNG files: previews, reconstructions, comparison pictures."""
from __future__ import annotations

import io

import numpy as np

from sdxl_jax import paths


def to_uint8(images_m1_1: np.ndarray) -> np.ndarray:
    return np.clip(np.round((images_m1_1 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}×{cols} grid")
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, path: str) -> None:
    """A local path or a gs:// URL, written whole: a reader never sees half a PNG."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    paths.write_bytes(path, buf.getvalue())
