"""Where a number comes from: the package versions and the machine, recorded next to every
output (``.qsd`` files, run directories, benchmark results)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

import torch


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


__all__ = ["package_versions", "cpu_name", "machine_description"]
