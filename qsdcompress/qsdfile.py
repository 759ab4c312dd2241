"""The ``.qsd`` format, and reading any weights file into tensors and metadata.

A ``.qsd`` file is a safetensors file whose metadata key ``qsdcompress`` holds a JSON document
(architecture and its arguments, quantization and neuron config, provenance). Its tensors are
stored as one flat tensor per dtype plus a compressed index of names and shapes, and quantized
weights as bit-packed integers (:func:`pack_ints`; ``loading.save`` decides which, from the
model's quantizers).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from .errors import QsdError, one_line
from .io import (META_KEY, PICKLE_EXT, SAFETENSORS_EXT, atomic_path, read_safetensors, torch_load_safe,
                 unwrap_state_dict)
from .provenance import package_versions

FORMAT_VERSION = 2  # 2: one flat tensor per dtype + index; packed low-bit weights
INDEX_KEY = "qsdcompress_index"


def read_checkpoint(path: str | os.PathLike, prefer_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and qsdcompress metadata (empty if none) of any supported weights file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXT:
        tensors, raw = read_safetensors(path)
        if INDEX_KEY in raw:
            tensors = _ungroup(tensors, raw[INDEX_KEY], path)
        meta = {}
        if META_KEY in raw:
            try:
                meta = json.loads(raw[META_KEY])
            except json.JSONDecodeError:
                raise QsdError(f"{path}: its qsdcompress metadata is not valid JSON") from None
        return tensors, meta
    if suffix in PICKLE_EXT or suffix == "":
        return unwrap_state_dict(torch_load_safe(path), prefer_ema=prefer_ema), {}
    if suffix == ".onnx":
        raise QsdError(f"{path} is an ONNX file: use `qsdcompress eval {path}` to evaluate it with onnxruntime")
    raise QsdError(f"unsupported checkpoint type {suffix!r} for {path}; use .qsd, .safetensors, .pth or .pt")


def _group_by_dtype(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """One flat tensor per dtype and an index ``[name, dtype, shape, offset]`` to cut them apart."""
    flat: dict[str, list[torch.Tensor]] = {}
    index, offsets = [], {}
    for name, v in tensors.items():
        key = str(v.dtype).replace("torch.", "")
        off = offsets.get(key, 0)
        index.append([name, key, list(v.shape), off])
        flat.setdefault(key, []).append(v.detach().cpu().reshape(-1))
        offsets[key] = off + v.numel()
    return {k: torch.cat(vs) for k, vs in flat.items()}, index


def save_qsd(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors + JSON metadata atomically as a ``.qsd`` (safetensors) file.

    The tensors are stored as one flat tensor per dtype plus a compressed index of names and
    shapes: a small model has hundreds of tiny tensors, and safetensors' per-tensor header
    (about 130 bytes each) would otherwise be a quarter of a 4-bit file.
    """
    import base64
    import zlib

    from safetensors.torch import save_file

    path = Path(path)
    # the writer's format and versions, not those of the file the model was loaded from
    meta = {**meta, "format_version": FORMAT_VERSION, "versions": package_versions()}
    flat, index = _group_by_dtype(state_dict)
    packed_index = base64.b85encode(zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)).decode()
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta, default=str), INDEX_KEY: packed_index})
    return path


def _ungroup(flat: dict[str, torch.Tensor], raw_index: str, path: Path) -> dict[str, torch.Tensor]:
    import base64
    import zlib

    try:
        index = json.loads(zlib.decompress(base64.b85decode(raw_index)))
        out = {}
        for name, dtype, shape, off in index:
            n = int(torch.Size(shape).numel())
            out[name] = flat[dtype][off:off + n].reshape(shape).clone()
    except Exception as e:  # corrupt index or tensors
        raise QsdError(f"{path}: its tensor index is unreadable (truncated or corrupt?): {one_line(e)}") from None
    return out


def pack_ints(ints, bits: int) -> bytes:
    """Signed ``bits``-bit integers as a dense bit stream (``bits`` bits each, little-endian bit
    order, numpy's packbits): a 3-bit layer takes 3/8 of a byte per weight, not 4/8. One bit
    stores the sign of a binary weight (``{-1, +1}`` -> ``{0, 1}``)."""
    import numpy as np

    v = np.asarray(ints, dtype=np.int64).ravel()
    if bits == 1:
        u = (v > 0).astype(np.uint8)[:, None]
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if v.size and (v.min() < lo or v.max() > hi):
            raise QsdError(f"integers outside the signed {bits}-bit range [{lo}, {hi}]")
        u = ((v & ((1 << bits) - 1))[:, None] >> np.arange(bits)) & 1
    return np.packbits(u.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_ints(data: bytes, count: int, bits: int):
    """The ``count`` signed integers :func:`pack_ints` wrote (int64 numpy array)."""
    import numpy as np

    need = -(-count * bits // 8)
    if len(data) != need:
        raise QsdError(f"packed weights hold {len(data)} bytes, expected {need} for {count} x {bits} bits")
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    if bits == 1:
        return b.astype(np.int64) * 2 - 1
    u = (b.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
    return np.where(u >= 1 << (bits - 1), u - (1 << bits), u)


def read_header_metadata(path: str | os.PathLike) -> dict:
    """The qsdcompress metadata of a ``.qsd``/safetensors file from its header alone (no tensors
    read): cheap enough to list and choose among many files."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return json.loads(header.get("__metadata__", {}).get(META_KEY, "{}"))
    except (OSError, ValueError, struct.error):
        return {}


__all__ = ["read_checkpoint", "save_qsd", "pack_ints", "unpack_ints", "read_header_metadata", "FORMAT_VERSION",
           "INDEX_KEY"]
