"""Safetensors files written one tensor at a time, sharded with an index past a size.

The `safetensors` library's writers take every tensor of a file at once (a dict held in
memory); an export that may hold one tensor at a time writes the format itself instead. It
is small: an 8-byte little-endian header length, a JSON header of
{name: {"dtype", "shape", "data_offsets"}} padded with spaces to 8 bytes, then the raw
little-endian bytes in offset order. Files are read back with the library (import, tests).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Callable, Sequence

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


def _header(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> bytes:
    itemsize, code = np.dtype(dtype).itemsize, DTYPE_CODES[np.dtype(dtype)]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(out_dir: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...]]],
          tensor: Callable[[int], np.ndarray], dtype: np.dtype, max_shard_bytes: int
          ) -> list[pathlib.Path]:
    """Writes the tensors `tensor(i)` (the i-th of `specs`, (name, shape), cast to `dtype`),
    asking for each once, in order, after the previous one is written; a single
    model.safetensors or shards with model.safetensors.index.json. Returns the files."""
    out_dir = pathlib.Path(out_dir)
    plan = shard_plan(specs, dtype, max_shard_bytes)
    names = file_names(len(plan))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, idx in zip(names, plan, strict=True):
        part = [specs[i] for i in idx]
        with open(out_dir / fname, "wb") as f:
            f.write(_header(part, dtype))
            for i, (name, shape) in zip(idx, part, strict=True):
                a = np.asarray(tensor(i))
                if tuple(a.shape) != tuple(shape):
                    raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
                a = np.ascontiguousarray(a.astype(dtype, copy=False))
                f.write(a.reshape(-1).view(np.uint8).data)  # little-endian on every host here
                total += a.nbytes
                weight_map[name] = fname
                del a
    if len(names) > 1:
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
