"""Safetensors files, read by slices through a memory map and written with every dtype we use.

An HF checkpoint directory holds `model.safetensors`, or shards named by
`model.safetensors.index.json`'s `weight_map`. A file is an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data that
follows), then the raw little-endian bytes.

Why not the safetensors package alone: its numpy and flax backends look up `np.float8_e4m3fn`,
which numpy does not have, so DeepSeek's FP8 weights cannot be read through them, and reading a
slice through the flax backend lands it on a device first. The format is simple enough to map
directly: `read(name, index)` memory-maps only the tensor's bytes and copies out the requested
slice, so assembling one device's shard of a stacked expert tensor touches only those experts'
rows. Every header is validated before anything is mapped: sizes, offsets inside the file,
offsets agreeing with shape x itemsize (a truncated file or a header claiming more bytes than the
file is one clear error, never a read past the end). `write` produces the same layout for every
dtype (transformers reads it back in the parity tests).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from dsv3_jax.errors import CheckpointError, MissingFileError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None


class SafetensorsFile:
    """One file's validated header; tensors are read on demand by slices."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= min(MAX_HEADER, size - 8):
                    raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a "
                                          f"{size}-byte file)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise MissingFileError(f"{path}: no such file (named by the checkpoint's index)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.data_start, self.tensors = 8 + n, {}
        for name, info in header.items():
            self.tensors[name] = self._check(name, info, size - 8 - n)

    def _check(self, name: str, info: dict, data_bytes: int):
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r} "
                                  f"(dtypes we read: {sorted(DTYPES)})") from None
        want = math.prod(shape) * dtype.itemsize
        if not (0 <= begin <= end and end - begin == want):
            raise CheckpointError(f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) but "
                                  f"{info['dtype']}{list(shape)} needs {want}")
        if end > data_bytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {end} of the data but the file "
                                  f"holds {data_bytes} (truncated?)")
        return dtype, shape, begin

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """tensor[index] as a fresh array (index: a tuple of slices/ints over the leading dims)."""
        dtype, shape, begin = self.tensors[name]
        if not math.prod(shape):
            return np.zeros(shape, dtype)[index]
        mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)
        return np.array(mapped[index])


class SafetensorsDir:
    """The tensors of one HF directory: model.safetensors, or an index + shards."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> file")
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            weight_map = {k: "model.safetensors" for k in SafetensorsFile(os.path.join(path, "model.safetensors")).tensors}
        else:
            raise MissingFileError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        self.path, self.weight_map = path, weight_map
        self._files: dict[str, SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):  # validate every header up front
            f = self._file(fname)
            absent = [k for k, v in weight_map.items() if v == fname and k not in f.tensors]
            if absent:
                raise CheckpointError(f"{f.path}: the index names {len(absent)} tensor(s) the file does not "
                                      f"hold, e.g. {absent[0]!r}")

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.path, fname))
        return self._files[fname]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, key: str) -> SafetensorsFile:
        return self._file(self.weight_map[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.file_of(key).dtype(key)

    def get(self, key: str, index: tuple = ()) -> np.ndarray:
        return self.file_of(key).read(key, index)

    def tensor_bytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    def nbytes(self) -> int:
        return sum(self.tensor_bytes(k) for k in self.weight_map)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file with `tensors` (any dtype in DTYPES), names sorted, 8-byte aligned."""
    header, offset = {}, 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise CheckpointError(f"cannot write {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
