"""Reading the raw dataset: listing inputs, captions, image headers and pixels.

Every problem with one input becomes a `BadInput(reason)` that the cache builder records in
skipped.jsonl; nothing here raises past one image. Unusual but valid images (CMYK, palette,
alpha, 16-bit, EXIF-rotated, animated) are converted, not skipped.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdxl_jax.data.buckets import Bucket, Fit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112

# What probe_size/load_pixels read: a file path, the bytes of an encoded image file, or a
# uint8 pixel array (h, w) / (h, w, 1|3|4), as records of a TFDS dataset hold them.
ImageInput = Union[str, bytes, np.ndarray]


class BadInput(Exception):
    """One input cannot be used; the message is the reason written to the skip report."""


@dataclass(frozen=True)
class Source:
    """One image to cache: `path` on disk, `key` the stable name stored in the cache."""
    path: str
    key: str
    caption: str | None  # None: read from the .txt next to the image
    # records that are not files (sdxl_jax.data.tfds_source): returns (image, caption) on
    # demand, raising BadInput; `path` then only names the record in the skip report
    read: Callable[[], tuple[ImageInput, str]] | None = None


def list_folder(images_dir: str) -> tuple[list[Source], list[tuple[str, str]]]:
    """All images under `images_dir` (recursive, sorted; symlinked folders followed once) with
    captions from same-name .txt files, plus (name, reason) skips for unusable file names."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {images_dir!r} does not exist")
    found, skipped, visited = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop or a second link to the same folder
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                key = path.relative_to(root).as_posix()
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    skipped.append((ascii(key), "file name is not valid UTF-8"))
                    continue
                found.append(Source(str(path), key, None))
    return found, skipped


def list_manifest(manifest: str) -> tuple[list[Source], list[tuple[str, str]]]:
    """Sources from a JSONL file of {"path": …, "caption": …}, plus (line, reason) skips.

    Relative paths are taken relative to the manifest's folder.
    """
    mpath = Path(manifest)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest {manifest!r} does not exist")
    sources, skipped, seen = [], [], set()
    with open(mpath, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{manifest}:{lineno}"
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
                path, caption = entry["path"], entry.get("caption")
                if not isinstance(path, str) or not (caption is None or isinstance(caption, str)):
                    raise TypeError("path must be a string and caption a string")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                skipped.append((where, f"bad manifest line: {type(e).__name__}: {e}"))
                continue
            if caption is None:
                skipped.append((path, f"missing caption ({where} has no \"caption\")"))
                continue
            full = Path(path) if os.path.isabs(path) else mpath.parent / path
            if path in seen:
                skipped.append((path, f"duplicate entry ({where})"))
                continue
            seen.add(path)
            sources.append(Source(str(full), path, caption))
    return sources, skipped


def read_caption(src: Source) -> str:
    """The caption text: given inline, or the UTF-8 .txt next to the image."""
    if src.caption is not None:
        return src.caption
    txt = Path(src.path).with_suffix(".txt")
    try:
        data = txt.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"missing caption: no {txt.name}") from None
    except OSError as e:
        raise BadInput(f"unreadable caption: {txt.name}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"caption not UTF-8: {txt.name} ({e.reason} at byte {e.start})") from None


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    """A uint8 pixel array as a Pillow image, checked like a file header."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise BadInput(f"image array of shape {arr.shape} and dtype {arr.dtype}: "
                       "expected uint8 (h, w) or (h, w, 1|3|4)")
    h, w = arr.shape[:2]
    if w * h == 0:
        raise BadInput(f"empty image array of shape {arr.shape}")
    if w * h > max_pixels:
        raise BadInput(f"too many pixels: {w}x{h} = {w * h} > data.max_image_pixels = {max_pixels}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 (h, w) → L, (h, w, 3|4) → RGB|RGBA


def _open(image: ImageInput, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and reject empty, non-image and oversized inputs."""
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, bytes):
        if not image:
            raise BadInput("empty image (0 bytes)")
        path = io.BytesIO(image)
    else:
        path = image
        try:
            if os.path.getsize(path) == 0:
                raise BadInput("empty file (0 bytes)")
        except FileNotFoundError:
            raise BadInput("file not found") from None
        except OSError as e:
            raise BadInput(f"unreadable file: {e}") from None
    # Our limit (data.max_image_pixels) is checked from the header below; Pillow's own guard
    # (a warning above MAX_IMAGE_PIXELS) is raised to the same limit and treated as an error.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise BadInput("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f"too many pixels (decompression bomb guard): {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is one bad file
        raise BadInput(f"cannot open image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadInput(f"too many pixels: {w}x{h} = {w * h} > data.max_image_pixels = {max_pixels}")
    return img


def _rotated(img: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height for display."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) in _ROTATING_ORIENTATIONS
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return False


def probe_size(image: ImageInput, max_pixels: int) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header only."""
    with _open(image, max_pixels) as img:
        w, h = img.size
        return (h, w) if _rotated(img) else (w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited over white; 16-bit greyscale scaled (not clipped) to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_pixels(image: ImageInput, max_pixels: int, fit: Fit, bucket: Bucket) -> np.ndarray:
    """The image fitted to `bucket` as float32 (h, w, 3) in [−1, 1].

    Decodes fully (so truncated or corrupt data raises BadInput here), applies the EXIF
    orientation, converts to RGB, resizes with Lanczos to `fit.resized` and crops. Large JPEGs
    are decoded at a reduced DCT scale that still leaves at least 2× for Lanczos to shrink.
    """
    try:
        with _open(image, max_pixels) as img:
            img.seek(0)  # first frame of animated files
            if img.format == "JPEG":
                rw, rh = fit.resized[::-1] if _rotated(img) else fit.resized
                img.draft(None, (2 * rw, 2 * rh))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            bw, bh = bucket
            box = (fit.crop_left, fit.crop_top, fit.crop_left + bw, fit.crop_top + bh)
            img = img.resize(fit.resized, Image.Resampling.LANCZOS, reducing_gap=3.0).crop(box)
            arr = np.asarray(img, dtype=np.float32)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces as many types
        raise BadInput(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.shape != (bucket[1], bucket[0], 3):
        raise BadInput(f"decoded to {arr.shape}, expected {(bucket[1], bucket[0], 3)}")
    return arr * (1.0 / 127.5) - 1.0
