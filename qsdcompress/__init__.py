"""qsdcompress: turn a pretrained spike-driven Transformer into a low-bit QSD-Transformer.

Python API (the CLI is a thin layer over it)::

    import qsdcompress as q
    model = q.load()                 # bundled qsd_tiny trained on digits
    q.eval(model)                    # {'top1': ..., 'top5': ..., 'loss': ..., 'samples': ...}
    q.export(q.convert(model, bits=4), "model.onnx")

``qsdcompress.export`` and ``qsdcompress.report`` are both the subpackages of those names and
callable as the functions (``import qsdcompress.export as m`` gives the module).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import export, report  # callable modules: q.export(...) is export.export(...)
from .api import (DEFAULT_WORKDIR, bundled_model, convert, demo, eval, finetune, load, model_meta,  # noqa: A004, F401
                  save, sensitivity)
from .errors import QsdError
from .models import create_model, list_models
from .neurons import set_spike_mode

# ``eval`` is left out of ``__all__`` so that ``from qsdcompress import *`` keeps the builtin.
__all__ = [
    "__version__", "create_model", "list_models", "load", "save", "convert", "sensitivity", "finetune", "export",
    "report", "demo", "bundled_model", "model_meta", "set_spike_mode", "QsdError", "DEFAULT_WORKDIR",
]
