"""qsdcompress: turn a pretrained spike-driven Transformer into a low-bit QSD-Transformer.

Python API (the CLI is a thin layer over it)::

    import qsdcompress as q
    model = q.load()                 # bundled qsd_tiny trained on digits
    q.eval(model)                    # {'top1': ..., 'top5': ..., 'loss': ..., 'samples': ...}
"""
from __future__ import annotations

__version__ = "0.1.0"

# The submodules `export` and `report` are imported first so that the package attributes of the
# same names end up being the API functions (a later submodule import does not rebind them).
from . import export as _export_module, report as _report_module  # noqa: F401
from .api import (DEFAULT_WORKDIR, bundled_model, convert, demo, eval, export, finetune, load,  # noqa: A004
                  model_meta, report, save)
from .errors import QsdError
from .models import create_model, list_models
from .neurons import set_spike_mode

__all__ = [
    "__version__", "create_model", "list_models", "load", "save", "eval", "convert", "finetune", "export", "report",
    "demo", "bundled_model",
    "model_meta", "set_spike_mode", "QsdError", "DEFAULT_WORKDIR",
]
