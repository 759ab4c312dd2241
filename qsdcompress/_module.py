"""Modules that can be called like the function they are named after.

``qsdcompress.export`` is both the export subpackage (``import qsdcompress.export as m`` gives the
module, with ``m.ExportConfig``) and the friendly API function (``qsdcompress.export(model)``).
Python allows a module object to change its class (``module.__class__ = ...``); the subclass only
adds ``__call__``.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable as ``fn``."""

    class CallableModule(types.ModuleType):
        __doc__ = fn.__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule


__all__ = ["make_callable"]
