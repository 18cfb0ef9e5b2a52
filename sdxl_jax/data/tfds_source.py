"""A prepared TensorFlow Datasets split as a cache-builder input, read without TensorFlow.

TFDS datasets prepared in the ArrayRecord format allow random access through
`tfds.data_source`, which deserialises records with protobuf and numpy only. Every record of
the split becomes one `images.Source` whose `read` fetches (image, caption) on demand, so the
scan, bucketing, fit/crop, decoding, VAE encoding, sharding, resume and fingerprint code of
sdxl_jax.data.build is the one the folder and JSONL sources use. An `Image` feature is read
undecoded (the encoded file bytes), so Pillow decodes it exactly as it decodes a file: the
same EXIF rotation, JPEG draft scaling and alpha handling, hence the same latents as a folder
of the same files. A plain uint8 array feature is used as pixels.

    python -m data_tools.build_cache --tfds NAME[:SPLIT] [--tfds-data-dir DIR] \
        --image-key image --caption-key caption --out CACHE --config configs/ztsnr.py

Captions may be text, bytes (UTF-8) or a list of tags (joined with ", ", as the tag parser of
sdxl_jax.data.tags splits them again). Nested features are named with "/" ("meta/caption").
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from sdxl_jax import paths
from sdxl_jax.data.images import BadInput, ImageInput, Source

DEFAULT_SPLIT = "train"
# NAME[/CONFIG][:VERSION][:SPLIT]; a split may hold colons itself ("train[:10%]")
_SPEC = re.compile(r"^(?P<name>[^:\s]+(?::[\d*]+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?$")


@dataclass(frozen=True)
class TfdsInput:
    """Which TFDS split to cache and which of its features hold the image and the caption."""
    name: str  # "dataset[/config][:version]", as tfds.data_source takes it
    split: str = DEFAULT_SPLIT  # any TFDS split string: "train", "train[:1000]", "validation"
    data_dir: str | None = None  # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's rule)
    image_key: str = "image"
    caption_key: str = "caption"


def parse_tfds_spec(spec: str, data_dir: str | None = None, image_key: str = "image",
                    caption_key: str = "caption") -> TfdsInput:
    """A TfdsInput from "NAME[:SPLIT]" (NAME may carry a version: "ds/config:1.0.0:test")."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"--tfds {spec!r}: expected NAME[:SPLIT], e.g. 'my_dataset:train' or "
                         "'my_dataset/config:1.0.0:train[:10%]'")
    return TfdsInput(m["name"], m["split"] or DEFAULT_SPLIT, data_dir or None, image_key, caption_key)


def tfds_from_config(data, spec: str | None = None, data_dir: str | None = None,
                     image_key: str | None = None, caption_key: str | None = None) -> TfdsInput | None:
    """The TFDS input of a config's `data` section (data.tfds, data.tfds_data_dir,
    data.tfds_image_key, data.tfds_caption_key; absent keys take the defaults), each value
    overridden by the argument given; None when no dataset is named."""
    spec = spec or data.get("tfds", "")
    if not spec:
        return None
    return parse_tfds_spec(spec, data_dir or data.get("tfds_data_dir", "") or None,
                           image_key or data.get("tfds_image_key", "") or "image",
                           caption_key or data.get("tfds_caption_key", "") or "caption")


def _data_dir(inp: TfdsInput) -> str:
    from tensorflow_datasets.core import constants
    return paths.absolute(inp.data_dir or constants.get_default_data_dir())


def _not_prepared(inp: TfdsInput, data_dir: str, missing: str | None = None) -> FileNotFoundError:
    base = inp.name.split(":")[0]
    where = f"no {missing} there; " if missing else ""
    return FileNotFoundError(
        f"TFDS dataset {inp.name!r} is not prepared in {data_dir} ({where}downloads are not "
        f"possible offline): prepare it once where its source data is reachable with `tfds build {base} "
        f"--data_dir {data_dir} --file_format array_record`, or point --tfds-data-dir at "
        "where it is prepared")


@contextlib.contextmanager
def _quiet_tfds():
    """Hide TFDS's own log lines while it looks for the dataset ("Failed to load dataset …
    from files", "Variant folder … has no dataset_info.json"): our error says it in one line."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _feature_keys(features, prefix: str = "") -> list[str]:
    """Every feature name, nested ones as "outer/inner"."""
    import tensorflow_datasets as tfds
    keys = []
    for k in features.keys():
        sub = features[k]
        keys.append(prefix + k)
        if isinstance(sub, tfds.features.FeaturesDict):
            keys += _feature_keys(sub, prefix + k + "/")
    return keys


def _feature(features, key: str, what: str, name: str):
    node = features
    try:
        for part in key.split("/"):
            node = node[part]
    except (KeyError, TypeError):
        raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} for the {what} "
                         f"(features: {', '.join(sorted(_feature_keys(features)))}); pass "
                         f"--{what}-key") from None
    return node


def _skip_images(features) -> dict | None:
    """Decoders that leave every Image feature as its encoded file bytes: the one we use is
    decoded by Pillow like a file (images.load_pixels); others are not decoded at all."""
    import tensorflow_datasets as tfds
    out = {}
    for k in features.keys():
        sub = features[k]
        if isinstance(sub, tfds.features.Image):
            out[k] = tfds.decode.SkipDecoding()
        elif isinstance(sub, tfds.features.FeaturesDict) and (inner := _skip_images(sub)):
            out[k] = inner
    return out or None


def _get(record: dict, key: str) -> Any:
    for part in key.split("/"):
        record = record[part]
    return record


def caption_text(value: Any) -> str:
    """A caption from a TFDS value: text, UTF-8 bytes, or a list/array of tags."""
    if isinstance(value, np.ndarray):
        value = value.tolist()  # 0-d → its item, 1-d → a list
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"caption not UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in value):
        return ", ".join(caption_text(v) for v in value)
    raise BadInput(f"caption of type {type(value).__name__}: expected text, bytes or a list of tags")


def image_input(value: Any) -> ImageInput:
    """What images.probe_size/load_pixels read: encoded bytes, or a uint8 pixel array."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.ndarray)):
        return value
    raise BadInput(f"image of type {type(value).__name__}: expected encoded image bytes or a "
                   "uint8 pixel array (one image per record)")


class TfdsRecords:
    """One prepared split opened with `tfds.data_source`; `sources()` lists its records."""

    def __init__(self, inp: TfdsInput):
        import tensorflow_datasets as tfds
        self.input = inp
        data_dir = _data_dir(inp)
        try:
            with _quiet_tfds():
                builder = tfds.builder(inp.name, data_dir=data_dir)
                prepared = builder.is_prepared()
        except tfds.core.DatasetNotFoundError:
            raise _not_prepared(inp, data_dir) from None
        if not prepared:
            raise _not_prepared(inp, data_dir, os.path.relpath(builder.data_dir, data_dir))
        info = builder.info
        if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"TFDS dataset {info.full_name!r} in {data_dir} is stored as "
                f"{info.file_format.value}, but random access without TensorFlow needs array_record: "
                f"convert it with `tfds convert_format --dataset_dir {builder.data_dir} "
                "--out_file_format array_record`, or rebuild it with --file_format array_record")
        _feature(info.features, inp.image_key, "image", info.full_name)
        _feature(info.features, inp.caption_key, "caption", info.full_name)
        try:
            self._ds = tfds.data_source(inp.name, split=inp.split, data_dir=data_dir, download=False,
                                        decoders=_skip_images(info.features))
        except ValueError as e:  # an unknown split or a bad slice
            raise ValueError(f"TFDS dataset {info.full_name!r}, split {inp.split!r}: {e} "
                             f"(splits: {', '.join(info.splits)})") from None
        if len(self._ds) == 0:
            raise ValueError(f"TFDS dataset {info.full_name!r}, split {inp.split!r} in {data_dir} is empty")
        self.full_name = info.full_name  # "name[/config]/version": the exact prepared version
        # what the cached bytes depend on, for the cache settings (a rebuild is refused otherwise)
        self.description = (f"tfds:{info.full_name}:{inp.split}@{data_dir} "
                            f"image={inp.image_key} caption={inp.caption_key}")

    def read(self, index: int) -> tuple[ImageInput, str]:
        """(image, caption) of record `index`; BadInput when a value cannot be used."""
        try:
            record = self._ds[index]
        except Exception as e:  # noqa: BLE001 - a corrupt record is one bad input
            raise BadInput(f"unreadable TFDS record: {type(e).__name__}: {e}") from None
        return (image_input(_get(record, self.input.image_key)),
                caption_text(_get(record, self.input.caption_key)))

    def sources(self) -> tuple[list[Source], list[tuple[str, str]]]:
        """A Source per record (key "SPLIT/INDEX", stable for resumes), and no listing skips."""
        split = self.input.split
        return [Source(f"tfds:{self.full_name}:{split}[{i}]", f"{split}/{i:08d}", None,
                       partial(self.read, i)) for i in range(len(self._ds))], []


def open_tfds(inp: TfdsInput | str) -> TfdsRecords:
    """Open a prepared split ("NAME[:SPLIT]" or a TfdsInput); fails before any work otherwise."""
    return TfdsRecords(parse_tfds_spec(inp) if isinstance(inp, str) else inp)
