"""qsdcompress: turn a pretrained spike-driven Transformer into a low-bit QSD-Transformer.

Python API (the CLI is a thin layer over it)::

    import qsdcompress as q
    model = q.load()                 # bundled qsd_tiny trained on digits
    q.eval(model)                    # {'top1': ..., 'top5': ..., 'loss': ..., 'samples': ...}
    q.export(q.convert(model, bits=4), "model.onnx")

``qsdcompress.export`` and ``qsdcompress.report`` are functions; their subpackages are
:mod:`qsdcompress.onnx_export` and :mod:`qsdcompress.reporting`.

``import qsdcompress`` is quick: torch, timm, onnx, scipy... are imported when a name that needs
them is first used (PEP 562 module ``__getattr__``). ``timm.create_model("qsd_8_512")`` still works
after ``import qsdcompress``: the architectures are registered in timm when timm is imported.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import DEFAULT_WORKDIR
from .errors import QsdError

if TYPE_CHECKING:  # the real imports, for readers and type checkers; at run time see _LAZY
    from .onnx_export import export  # noqa: F401
    from .reporting import report  # noqa: F401
    from .loading import bundled_model, load, model_meta, save  # noqa: F401
    from .mixed import sensitivity  # noqa: F401
    from .models import create_model, list_models  # noqa: F401
    from .neurons import set_spike_mode  # noqa: F401
    from .pipeline import convert_model as convert  # noqa: F401
    from .pipeline import demo  # noqa: F401
    from .pipeline import run_eval as eval  # noqa: A004, F401
    from .train import finetune  # noqa: F401

#: top-level name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "load": ("loading", "load"), "save": ("loading", "save"), "bundled_model": ("loading", "bundled_model"),
    "model_meta": ("loading", "model_meta"), "create_model": ("models", "create_model"),
    "list_models": ("models", "list_models"), "set_spike_mode": ("neurons", "set_spike_mode"),
    "convert": ("pipeline", "convert_model"), "demo": ("pipeline", "demo"), "eval": ("pipeline", "run_eval"),
    "sensitivity": ("mixed", "sensitivity"), "finetune": ("train", "finetune"),
    "export": ("onnx_export", "export"), "report": ("reporting", "report"),
}


def _register_models() -> None:
    """Import :mod:`qsdcompress.loading`: it registers the architectures in timm and hands
    :mod:`qsdcompress.models` its pretrained-weights loader (see that package's docstring)."""
    importlib.import_module(".loading", __name__)


def __getattr__(name: str) -> Any:
    """The API names and the subpackages, imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _LAZY:
        _register_models()  # what the name needs may create a model
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    try:  # a subpackage or module (``q.quant``), as the eager package offered
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _RegisterAfterImports:
    """Keeps the promise of an eager package without its cost: ``import qsdcompress, timm`` (then
    ``timm.create_model("qsd_8_512")``) and ``import qsdcompress.quant`` (then
    ``models.create_model(..., pretrained=True)``) find the architectures registered in timm and
    the pretrained loader installed. A ``sys.meta_path`` entry wraps the loaders of ``timm`` and
    of the package's modules; when the outermost of those imports has finished (never in the
    middle of one: ``models`` imports timm, ``loading`` imports ``models``) and timm or
    ``models`` is loaded, :mod:`qsdcompress.loading` is imported; then the entry leaves."""

    def __init__(self) -> None:
        self.local = threading.local()  # import depth per thread

    def wanted(self, name: str) -> bool:
        return name == "timm" or name.startswith(__name__ + ".")

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not self.wanted(name):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            try:
                spec.loader.exec_module = self.wrap(spec.loader.exec_module)
            except (AttributeError, TypeError):  # a loader that takes no attributes: __getattr__ registers
                pass
        return spec

    def wrap(self, run: Any) -> Any:
        def exec_module(module: Any) -> None:
            self.local.depth = getattr(self.local, "depth", 0) + 1
            try:
                run(module)
            finally:
                self.local.depth -= 1
            if self.local.depth == 0:
                self.done()

        return exec_module

    def done(self) -> None:
        if f"{__name__}.loading" in sys.modules:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        elif "timm" in sys.modules or f"{__name__}.models" in sys.modules:
            _register_models()


def _register_with_timm() -> None:
    if "timm" in sys.modules:  # ``import timm, qsdcompress``: register now (timm is paid for already)
        _register_models()
    elif not any(isinstance(f, _RegisterAfterImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImports())


def _quiet_cuda_probe() -> None:
    """brevitas imports ``torch.utils.cpp_extension``, which logs "No CUDA runtime is found" on a
    machine with CUDA tools (``nvcc``) but no GPU; every command would print it. Only that record is
    dropped (a filter on its logger: no torch import here)."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))


_quiet_cuda_probe()
_register_with_timm()

# ``eval`` is left out of ``__all__`` so that ``from qsdcompress import *`` keeps the builtin.
__all__ = [
    "__version__", "create_model", "list_models", "load", "save", "convert", "sensitivity", "finetune", "export",
    "report", "demo", "bundled_model", "model_meta", "set_spike_mode", "QsdError", "DEFAULT_WORKDIR",
]
