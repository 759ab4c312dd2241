"""Files: safe reading of the files users hand us, atomic writes, the hub's reachability.

Files users hand us are untrusted: ``.pth``/``.pt`` go through ``torch.load(weights_only=True)``
(no code runs, a pickle that asks for a callable is refused) and ``.safetensors``/``.qsd`` hold
only tensors. The ``.qsd`` format itself is :mod:`qsdcompress.qsdfile`'s.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import QsdError, one_line

META_KEY = "qsdcompress"
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
