"""Safetensors files written one tensor at a time, sharded with an index past a size.

The `safetensors` library's writers take every tensor of a file at once (a dict held in
memory); an export that may hold one tensor at a time writes the format itself instead. It
is small: an 8-byte little-endian header length, a JSON header of
{name: {"dtype", "shape", "data_offsets"}} padded with spaces to 8 bytes, then the raw
little-endian bytes in offset order. The offsets follow from the shapes alone, so every
header is written first and each tensor goes straight to its place, in whatever order the
tensors come. Files are read back with the library (import, tests).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
               np.dtype(np.float16): "F16"}


def shard_plan(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype,
               max_shard_bytes: int) -> list[list[int]]:
    """Tensor indices per file, in order: a file closes before the tensor that would take it
    past max_shard_bytes (a tensor larger than that has a file of its own)."""
    itemsize = np.dtype(dtype).itemsize
    files: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += n
    return files


def file_names(num_files: int) -> list[str]:
    if num_files == 1:
        return [SINGLE_NAME]
    return [f"model-{k + 1:05d}-of-{num_files:05d}.safetensors" for k in range(num_files)]


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _header(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> bytes:
    code = DTYPE_CODES[np.dtype(dtype)]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(out_dir: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...]]],
          tensors: Iterable[tuple[int, np.ndarray]], dtype: np.dtype, max_shard_bytes: int
          ) -> list[pathlib.Path]:
    """Writes the tensors of `specs` ((name, shape) each), which `tensors` yields as
    (index into specs, array) pairs, each once, in any order, cast to `dtype`: a single
    model.safetensors or shards with model.safetensors.index.json. Each array is written
    before the next is asked for. The bytes do not depend on the order. Returns the files."""
    out_dir = pathlib.Path(out_dir)
    plan = shard_plan(specs, dtype, max_shard_bytes)
    names = file_names(len(plan))
    place: dict[int, tuple[int, int]] = {}  # spec index -> (file, byte offset in it)
    files = []
    try:
        for k, (fname, idx) in enumerate(zip(names, plan, strict=True)):
            header = _header([specs[i] for i in idx], dtype)
            f = open(out_dir / fname, "wb")  # noqa: SIM115 - closed below, all at once
            files.append(f)
            f.write(header)
            offset = len(header)
            for i in idx:
                place[i] = (k, offset)
                offset += _nbytes(specs[i][1], dtype)
            f.truncate(offset)
        for i, a in tensors:
            name, shape = specs[i]
            if i not in place:
                raise ValueError(f"{name}: given twice")
            a = np.asarray(a)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
            a = np.ascontiguousarray(a.astype(dtype, copy=False))
            k, offset = place.pop(i)
            files[k].seek(offset)
            files[k].write(a.reshape(-1).view(np.uint8).data)  # little-endian on every host here
            del a
        if place:
            raise ValueError(f"{specs[min(place)][0]}: never given")
    finally:
        for f in files:
            f.close()
    if len(names) > 1:
        total = sum(_nbytes(shape, dtype) for _, shape in specs)
        weight_map = {specs[i][0]: fname for fname, idx in zip(names, plan, strict=True)
                      for i in idx}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def weight_files(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    hf_dir = pathlib.Path(hf_dir)
    index = hf_dir / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = hf_dir / SINGLE_NAME
    if not single.is_file():
        return {}
    with open(single, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: SINGLE_NAME for k in header if k != "__metadata__"}
