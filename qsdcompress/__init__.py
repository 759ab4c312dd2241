"""qsdcompress: turn a pretrained spike-driven Transformer into a low-bit QSD-Transformer.

Python API (the CLI is a thin layer over it)::

    import qsdcompress as q
    model = q.load()                 # bundled qsd_tiny trained on digits
    q.eval(model)                    # {'top1': ..., 'top5': ..., 'loss': ..., 'samples': ...}
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import DEFAULT_WORKDIR, bundled_model, eval, load, model_meta, save  # noqa: A004
from .errors import QsdError
from .models import create_model, list_models
from .neurons import set_spike_mode

__all__ = [
    "__version__", "create_model", "list_models", "load", "save", "eval", "bundled_model",
    "model_meta", "set_spike_mode", "QsdError", "DEFAULT_WORKDIR",
]
