"""A merge state's file: named numpy arrays in the safetensors layout, read and written without copying them.

The layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
giving each tensor's dtype, shape and byte range after the header (plus a `__metadata__` map of strings), then the
tensors' bytes. Files written here load with `safetensors.numpy.load_file`, and files written by it load here
(tests/test_index_merge.py checks both ways). The library's own numpy functions copy every array: `save_file`
first into bytes objects (24 MB more of fresh memory per merge of a 1,536-neuron set, copied while holding the GIL,
which stalled the merge's other threads), `load` out of an immutable bytes object. Here the arrays go to the file
in one `writev` call and are read back as views of the caller's buffer.

String arrays travel in the metadata (`STRINGS`, JSON); 0-d arrays are stored with shape [1] and their names
listed under `SCALARS`, as states written by the library recorded them."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

STRINGS = "freud.strings"  # metadata key of the string arrays (safetensors holds numbers only)
SCALARS = "freud.scalars"  # and of the names of the 0-d arrays
DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
          "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_CODES = {np.dtype(numpy_type): code for code, numpy_type in DTYPES.items()}
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one writev call takes


class Stacked:
    """Arrays of one shape and dtype that a state file holds as one array [len(parts), *shape], written from each
    part's own memory: a label collector's recall sample (38 phones' [64 x 1,536] float16, 7.5 MB) is no longer
    copied together before it is written. `np.asarray` stacks it; indexing gives a part."""

    def __init__(self, parts: Sequence[np.ndarray], shape: Sequence[int], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.parts = [np.ascontiguousarray(part, self.dtype) for part in parts]  # no copy when already so
        if any(part.shape != tuple(shape) for part in self.parts):
            raise ValueError(f"every part must have shape {tuple(shape)}")
        self.shape = (len(self.parts), *shape)
        self.ndim = len(self.shape)
        self.nbytes = sum(part.nbytes for part in self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.parts[i]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.stack(self.parts) if self.parts else np.zeros(self.shape, self.dtype)
        return whole if dtype is None else whole.astype(dtype)


def encode(arrays: dict[str, np.ndarray | Stacked]) -> list[memoryview]:
    """The file's bytes as buffers: the header, then each numeric array's memory (no copy of a contiguous array
    or of a `Stacked`'s parts). Arrays are laid out widest dtype first, then by name, so each starts aligned to its
    item size."""
    numbers = {k: v if isinstance(v, Stacked) else np.ascontiguousarray(v)  # 0-d: [1]
               for k, v in arrays.items() if v.dtype.kind in "biuf"}
    scalars = sorted(k for k in numbers if np.ndim(arrays[k]) == 0)
    strings = {k: np.asarray(v).tolist() for k, v in arrays.items() if v.dtype.kind not in "biuf"}
    header: dict[str, Any] = {}
    buffers, offset = [], 0
    for name in sorted(numbers, key=lambda k: (-numbers[k].dtype.itemsize, k)):
        array = numbers[name]
        if array.dtype not in _CODES:
            raise TypeError(f"state array {name!r} has dtype {array.dtype}, which a state file cannot hold")
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        parts = array.parts if isinstance(array, Stacked) else [array]
        buffers.extend(memoryview(part.reshape(-1).view(np.uint8)) for part in parts if part.nbytes)
    header["__metadata__"] = {STRINGS: json.dumps(strings),
                              SCALARS: json.dumps(scalars)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    return [memoryview(len(text).to_bytes(8, "little") + text), *buffers]


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray | Stacked]) -> None:
    """Write the arrays to `path` (created or truncated) with as few `writev` calls as the buffers need."""
    buffers = encode(arrays)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while buffers:
            written = os.writev(fd, buffers[:_IOV_MAX])
            while buffers and written >= len(buffers[0]):  # a short write resumes where it stopped
                written -= len(buffers.pop(0))
            if written:
                buffers[0] = buffers[0][written:]
    finally:
        os.close(fd)


def read(data: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a file read or mapped into `data` (uint8), as views into it, with the metadata's strings."""
    size = int.from_bytes(bytes(data[:8]), "little")
    header = json.loads(bytes(data[8 : 8 + size]))
    metadata = header.pop("__metadata__", None) or {}
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        count = (end - begin) // dtype.itemsize
        out[name] = np.frombuffer(data, dtype, count, 8 + size + begin).reshape(entry["shape"])
    for name in json.loads(metadata.get(SCALARS, "[]")):
        out[name] = out[name].reshape(())
    for name, value in json.loads(metadata.get(STRINGS, "{}")).items():
        out[name] = np.array(value, dtype=str)
    return out
