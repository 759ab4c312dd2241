"""Files: safe checkpoint reading, the ``.qsd`` format, atomic writes.

Files users hand us are untrusted: ``.pth``/``.pt`` go through ``torch.load(weights_only=True)``
(no code runs, a pickle that asks for a callable is refused) and ``.safetensors``/``.qsd`` hold
only tensors. A ``.qsd`` file is a safetensors file whose metadata key ``qsdcompress`` holds a
JSON document (architecture and its arguments, quantization and neuron config, provenance).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import QsdError, one_line

META_KEY = "qsdcompress"
FORMAT_VERSION = 2  # 2: one flat tensor per dtype + index; packed low-bit weights
QUANT_EXTRA_SUFFIXES = (".alpha", ".init_state")
SAFETENSORS_EXT = (".safetensors", ".qsd")
PICKLE_EXT = (".pth", ".pt", ".bin", ".ckpt", ".tar")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) as a directory, or one clear error before any work is done:
    a command must not compute for minutes and then fail because its output cannot be written."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise QsdError(f"{what} {path}: {parent} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QsdError(f"{what} {path} cannot be created: {one_line(e)}") from None
    if not os.access(path, os.W_OK):
        raise QsdError(f"{what} {path} is not writable")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def hf_offline() -> bool:
    """Hugging Face offline mode: huggingface_hub's setting, or ``HF_HUB_OFFLINE`` set after the hub
    was imported (its constants are read once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in ("1", "ON", "YES", "TRUE")


#: seconds the Hugging Face endpoint (or the HTTPS proxy) gets to accept a connection
HUB_CONNECT_TIMEOUT = 3.0
_REACHABLE: dict[tuple[str, int], tuple[bool, float]] = {}  # address -> (answer, time.monotonic() asked)


def _hub_address() -> tuple[str, int]:
    """Where a Hub request first connects: the HTTPS proxy when one applies, else the endpoint
    (``HF_ENDPOINT``, default https://huggingface.co)."""
    import urllib.parse
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hugging Face Hub (or its proxy) opens within ``timeout``
    seconds (the answer is kept for a minute). Without network huggingface_hub retries for about a
    minute before it gives up; this answers in at most ``timeout`` (name resolution included)."""
    import socket
    import threading
    import time

    address = _hub_address()
    if time.monotonic() - _REACHABLE.get(address, (False, -1e9))[1] > 60:
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection(address, timeout=timeout).close()
                result.append(True)
            except OSError:
                result.append(False)

        t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
        t.start()
        t.join(timeout)
        _REACHABLE[address] = (bool(result and result[0]), time.monotonic())
    return _REACHABLE[address][0]


def hub_unavailable() -> str | None:
    """Why the Hugging Face Hub cannot be asked (then only the local cache is read), or None."""
    if hf_offline():
        return "offline (HF_HUB_OFFLINE)"
    if not hub_reachable():
        host, port = _hub_address()
        return f"{host}:{port} cannot be reached (no network?)"
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages a number depends on, recorded next to every output."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("qsdcompress", "torch", "timm", "brevitas", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpuinfo(path: str | os.PathLike) -> dict[str, str]:
    """The first processor's ``key: value`` lines of a Linux ``/proc/cpuinfo``; {} without one."""
    out: dict[str, str] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                if out:
                    break
                continue
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the architecture (``x86_64``)."""
    return _model_name(_cpuinfo(cpuinfo))


def _model_name(info: Mapping[str, str]) -> str:
    return info.get("model name") or platform.machine() or "unknown"


def machine_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine a number was measured on: timings (CPU seconds) differ by 2x between CPUs that
    a virtual machine names alike (``AMD EPYC``), hence the family/model numbers, and float rounding
    differs between CPUs; both are recorded with results."""
    info = _cpuinfo(cpuinfo)
    ident = " ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if info.get(k))
    return {"cpu": _model_name(info), "cpu_id": ident or None,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise QsdError(f"file not found: {path}")
    if path.is_dir():
        raise QsdError(f"expected a file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise QsdError(f"file is empty: {path}")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw string metadata of a safetensors (or .qsd) file."""
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except QsdError:
        raise
    except Exception as e:  # truncated or not a safetensors file
        raise QsdError(f"{path} is not a readable safetensors file (truncated or corrupt?): {one_line(e)}") from None
    return tensors, meta


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``: a pickle that would run code is refused, nothing runs."""
    path = Path(path)
    _check_exists(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise QsdError(
            f"refused to load {path}: it is not a plain weights file (the pickle asks to run code or "
            f"build objects: {one_line(e)}); convert it to safetensors with trusted code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise QsdError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {one_line(e)}") from None


_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")


def unwrap_state_dict(obj: Any, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Find the state_dict inside the containers training scripts write.

    Accepts a bare state_dict, ``{'model': ...}``, ``{'state_dict': ...}``, ``model_ema`` /
    ``state_dict_ema`` (used when ``prefer_ema`` or when nothing else is there), and strips
    ``module.`` prefixes left by DataParallel/DDP.
    """
    if not isinstance(obj, Mapping):
        raise QsdError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    order = (_EMA_KEYS + _CONTAINER_KEYS) if prefer_ema else (_CONTAINER_KEYS + _EMA_KEYS)
    sd: Any = obj
    for _ in range(3):  # nested containers, e.g. {'state_dict': {'model': ...}}
        if sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for k in order:
            if isinstance(sd.get(k), Mapping) and sd[k]:
                sd = sd[k]
                break
        else:
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, obj.keys()))[:8])
        raise QsdError(f"no tensors found in the checkpoint (top-level keys: {keys})")
    prefixes = ("module.", "_orig_mod.", "model.")
    for p in prefixes[:2]:
        if all(k.startswith(p) for k in tensors):
            tensors = {k[len(p):]: v for k, v in tensors.items()}
    return tensors


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


INDEX_KEY = "qsdcompress_index"


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


def strip_quant_extras(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the reference LSQ extras (``alpha``, ``init_state``, ``act.*``) from a state_dict."""
    kept, dropped = {}, []
    for k, v in sd.items():
        if k.endswith(QUANT_EXTRA_SUFFIXES) or ".act." in k:
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def load_state_dict_checked(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                            ignore: Callable[[str], bool] | None = None) -> None:
    """Strict loading with a readable error naming the first mismatched keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (ignore and ignore(k))]
    unexpected = [k for k in sd if k not in own and not (ignore and ignore(k))]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), first: {', '.join(unexpected[:3])}")
        if shape:
            parts.append(f"shape mismatch: {'; '.join(shape[:3])}")
        arch = getattr(model, "arch", type(model).__name__)
        raise QsdError(f"{source} does not fit architecture {arch}: " + "; ".join(parts)
                       + " (is it a checkpoint of another architecture? pass --arch)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
