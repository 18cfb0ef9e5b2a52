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

from sdxl_jax import paths
from sdxl_jax.data.buckets import Bucket, Fit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# x.png / x.jpg → x.mask.png: the image's loss mask (greyscale, white counts, black is ignored;
# METHODS §15). Never an input itself; it takes precedence over the image's alpha channel.
MASK_SUFFIX = ".mask.png"
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


def mask_file(path: str) -> str:
    """Where the loss mask of the image at `path` would be: x.png / x.jpg → x.mask.png."""
    return os.path.splitext(path)[0] + MASK_SUFFIX


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def list_folder(images_dir: str) -> tuple[list[Source], list[tuple[str, str]]]:
    """All images under `images_dir` (recursive, sorted; symlinked folders followed once) with
    captions from same-name .txt files, plus (name, reason) skips for unusable file names.
    Loss mask files (x.mask.png) belong to their image and are not listed. A gs:// folder is
    listed in one paged request (paths.walk_files)."""
    if paths.is_remote(images_dir):
        return _list_remote_folder(paths.absolute(images_dir))
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
            if name.lower().endswith(IMAGE_EXTENSIONS) and not is_mask_file(name):
                path = Path(dirpath) / name
                key = path.relative_to(root).as_posix()
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    skipped.append((ascii(key), "file name is not valid UTF-8"))
                    continue
                found.append(Source(str(path), key, None))
    return found, skipped


def _list_remote_folder(root: str) -> tuple[list[Source], list[tuple[str, str]]]:
    if not paths.isdir(root):
        raise FileNotFoundError(f"images folder {root!r} does not exist")
    return [Source(paths.join(root, key), key, None) for key in paths.walk_files(root)
            if key.lower().endswith(IMAGE_EXTENSIONS) and not is_mask_file(key)], []


def list_manifest(manifest: str) -> tuple[list[Source], list[tuple[str, str]]]:
    """Sources from a JSONL file of {"path": …, "caption": …}, plus (line, reason) skips.

    Relative paths are taken relative to the manifest's folder; the manifest and its entries
    may be gs:// URLs.
    """
    if not paths.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest!r} does not exist")
    folder = os.path.dirname(paths.absolute(manifest))
    sources, skipped, seen = [], [], set()
    for lineno, raw in enumerate(paths.read_bytes(manifest).splitlines(), 1):
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
        if is_mask_file(path):
            skipped.append((path, f"a loss mask file ({where}), not an image: list the image "
                                  f"it belongs to (x.png for x{MASK_SUFFIX})"))
            continue
        if caption is None:
            skipped.append((path, f"missing caption ({where} has no \"caption\")"))
            continue
        full = path if os.path.isabs(path) or paths.is_remote(path) else paths.join(folder, path)
        if path in seen:
            skipped.append((path, f"duplicate entry ({where})"))
            continue
        seen.add(path)
        sources.append(Source(full, path, caption))
    return sources, skipped


def read_caption(src: Source) -> str:
    """The caption text: given inline, or the UTF-8 .txt next to the image."""
    if src.caption is not None:
        return src.caption
    txt = os.path.splitext(src.path)[0] + ".txt"
    name = os.path.basename(txt)
    try:
        data = paths.read_bytes(txt)
    except FileNotFoundError:
        raise BadInput(f"missing caption: no {name}") from None
    except paths.StorageError:
        raise
    except OSError as e:
        raise BadInput(f"unreadable caption: {name}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"caption not UTF-8: {name} ({e.reason} at byte {e.start})") from None


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
    if isinstance(image, str) and paths.is_remote(image):  # gs://: read whole, decoded from memory
        try:
            image = paths.read_bytes(image)
        except FileNotFoundError:
            raise BadInput("file not found") from None
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


_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale as 8-bit L (scaled, not clipped); other modes unchanged."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited over white; 16-bit greyscale scaled (not clipped) to 8 bits."""
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _alpha(img: Image.Image) -> Image.Image | None:
    """The alpha channel as an L image; None without one or when it is fully opaque (a mask of
    ones is what a record without a mask gets anyway)."""
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        return None if alpha.getextrema()[0] == 255 else alpha
    return None


def load_pixels(image: ImageInput, max_pixels: int, fit: Fit, bucket: Bucket) -> np.ndarray:
    """The image fitted to `bucket` as float32 (h, w, 3) in [−1, 1].

    Decodes fully (so truncated or corrupt data raises BadInput here), applies the EXIF
    orientation, converts to RGB, resizes with Lanczos to `fit.resized` and crops. Large JPEGs
    are decoded at a reduced DCT scale that still leaves at least 2× for Lanczos to shrink.
    """
    return _load(image, max_pixels, fit, bucket, False, None)[0]


def load_pixels_and_mask(image: ImageInput, max_pixels: int, fit: Fit, bucket: Bucket,
                         mask_path: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(load_pixels' pixels, the loss mask or None). The mask is float32 (h, w) in [0, 1] at the
    bucket's pixel size, resized and cropped exactly as the pixels: the greyscale file
    `mask_path` (x.mask.png; white counts) when given, else the image's alpha channel (opaque
    counts; None when there is none or it is fully opaque). A mask file that cannot be read,
    or whose aspect ratio is not the image's (±1 %), is a BadInput of the image."""
    return _load(image, max_pixels, fit, bucket, True, mask_path)


def mask_to_latent(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """A pixel-resolution mask (H, W) as the area mean over each latent cell: (h, w, 1) float32."""
    (H, W), (h, w) = mask.shape, latent_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"mask {H}x{W} does not downsample evenly to the latent {h}x{w}")
    f = H // h
    return mask.astype(np.float32).reshape(h, f, w, f).mean(axis=(1, 3))[..., None]


def _load(image: ImageInput, max_pixels: int, fit: Fit, bucket: Bucket, want_mask: bool,
          mask_path: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    bw, bh = bucket
    box = (fit.crop_left, fit.crop_top, fit.crop_left + bw, fit.crop_top + bh)

    def cut(img: Image.Image) -> np.ndarray:  # one resize + crop for pixels and mask alike
        return np.asarray(img.resize(fit.resized, Image.Resampling.LANCZOS, reducing_gap=3.0).crop(box),
                          dtype=np.float32)
    mask = None
    try:
        with _open(image, max_pixels) as img:
            img.seek(0)  # first frame of animated files
            size = None  # as displayed; a JPEG's before the draft (a PNG's EXIF only after load)
            if img.format == "JPEG":
                rotated = _rotated(img)
                size = img.size[::-1] if rotated else img.size
                rw, rh = fit.resized[::-1] if rotated else fit.resized
                img.draft(None, (2 * rw, 2 * rh))
            img.load()
            img = ImageOps.exif_transpose(img)
            size = size or img.size
            if want_mask and mask_path is None:
                alpha = _alpha(img)
                mask = None if alpha is None else cut(alpha) * (1.0 / 255.0)
            arr = cut(_to_rgb(img))
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces as many types
        raise BadInput(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.shape != (bh, bw, 3):
        raise BadInput(f"decoded to {arr.shape}, expected {(bh, bw, 3)}")
    if want_mask and mask_path is not None:
        mask = _read_mask(mask_path, max_pixels, size, cut)
    return arr * (1.0 / 127.5) - 1.0, mask


def _read_mask(path: str, max_pixels: int, size: tuple[int, int], cut) -> np.ndarray:
    """The mask file at `path` for an image displayed at `size` (w, h), cut like its pixels."""
    name = os.path.basename(path)
    try:
        with _open(path, max_pixels) as img:
            img.load()
            img = _to_8bit(ImageOps.exif_transpose(img))
            (mw, mh), (w, h) = img.size, size
            if abs((mw * h) / (mh * w) - 1.0) > 0.01:
                raise BadInput(f"{mw}x{mh}, the image is {w}x{h} (not the same aspect ratio)")
            mask = cut(img if img.mode == "L" else img.convert("L")) * (1.0 / 255.0)
    except BadInput as e:
        raise BadInput(f"mask file {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - as for the image itself
        raise BadInput(f"mask file {name}: cannot decode: {type(e).__name__}: {e}") from None
    return mask
