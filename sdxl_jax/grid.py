"""Image grids as PNG files: previews, reconstructions, comparison pictures."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(images_m1_1: np.ndarray) -> np.ndarray:
    return np.clip(np.round((images_m1_1 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}×{cols} grid")
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, path: str) -> None:
    """Written to a temporary name and renamed: a reader never sees half a PNG."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
