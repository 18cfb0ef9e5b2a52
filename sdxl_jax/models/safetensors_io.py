"""Reading and writing .safetensors with numpy only (no torch), tensor by tensor.

Why not `safetensors.numpy`: numpy has no bfloat16, so bf16 checkpoints (most SDXL finetunes)
cannot be read through it; and `save_file` needs every tensor in memory at once. The format is
simple (8-byte little-endian header length, a JSON header of dtype / shape / byte offsets,
then the raw little-endian bytes), so this module reads each tensor as a fresh numpy array
(bf16 and fp8 as ml_dtypes types) and writes files streaming one tensor at a time, atomically.
The header is checked against the file size up front, so a truncated download fails naming
the first tensor whose bytes are missing, before anything is converted.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

# safetensors dtype codes ↔ numpy dtypes (explicit little-endian for the standard ones).
_CODES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class WeightsError(ValueError):
    """A weights file, folder or tree that cannot be used; the message names the culprit."""


class TensorInfo(NamedTuple):
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple
    begin: int  # byte offsets within the data section
    end: int


def dtype_code(dtype) -> str:
    dtype = np.dtype(dtype)
    for code, dt in _CODES.items():
        if dt == dtype:
            return code
    raise WeightsError(f"dtype {dtype} cannot be stored in safetensors")


class SafetensorsFile:
    """Header of one .safetensors file (validated against the file size) + per-tensor reads."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{path}: truncated ({size} bytes): no safetensors header")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, _MAX_HEADER):
                raise WeightsError(
                    f"{path}: header claims {n} bytes but the file has {size - 8} after the length "
                    "field: truncated, or not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path}: header is not valid JSON ({e}); not a safetensors "
                                   "file, or corrupted") from e
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: header is not a JSON object; not a safetensors file")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, info in header.items():
            try:
                code, shape = info["dtype"], tuple(info["shape"])
                begin, end = info["data_offsets"]
            except (TypeError, KeyError, ValueError) as e:
                raise WeightsError(f"{path}: malformed header entry for tensor {key!r}") from e
            if code not in _CODES:
                raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {code}")
            self.tensors[key] = TensorInfo(code, shape, int(begin), int(end))
        self._check_ranges(size - self._data_start)

    def _check_ranges(self, available: int) -> None:
        for key, t in sorted(self.tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            want = int(np.prod(t.shape, dtype=np.int64)) * _CODES[t.dtype].itemsize
            if t.end - t.begin != want or t.begin < 0:
                raise WeightsError(
                    f"{self.path}: tensor {key!r} {t.dtype}{list(t.shape)} needs {want} bytes but "
                    f"its byte range is [{t.begin}, {t.end}): corrupted header")
            if t.end > available:
                raise WeightsError(
                    f"{self.path}: truncated: tensor {key!r} needs bytes [{t.begin}, {t.end}) of "
                    f"the data section, which holds only {available} bytes; re-download or "
                    "re-export the file")

    def shape(self, key: str) -> tuple:
        return self.tensors[key].shape

    def get(self, key: str) -> np.ndarray:
        """A fresh numpy array (its own memory, not a view of a mapping) in the stored dtype."""
        t = self.tensors[key]
        dtype = _CODES[t.dtype]
        count = int(np.prod(t.shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + t.begin)
            arr = np.fromfile(f, dtype=dtype, count=count)
        if arr.size != count:  # the file shrank since the header was checked
            raise WeightsError(f"{self.path}: truncated while reading tensor {key!r}")
        return arr.reshape(t.shape)


class TensorSpec(NamedTuple):
    key: str
    dtype: np.dtype
    shape: tuple


def write_safetensors(path: str, specs: Iterable[TensorSpec],
                      produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """Write `specs` in order, asking `produce(key)` for one tensor at a time.

    Only one tensor is held at a time, so exporting a full SDXL never duplicates the model in
    host memory. The file appears atomically: written to a temporary name, then renamed.
    """
    specs = list(specs)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        nbytes = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        header[s.key] = {"dtype": dtype_code(s.dtype), "shape": [int(d) for d in s.shape],
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for s in specs:
                arr = np.asarray(produce(s.key))
                if tuple(arr.shape) != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                    raise WeightsError(f"tensor {s.key!r}: produced {arr.dtype}{list(arr.shape)}, "
                                       f"expected {np.dtype(s.dtype)}{list(s.shape)}")
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
