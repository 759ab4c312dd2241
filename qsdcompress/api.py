"""The Python API behind the CLI, one function per command (re-exported at the top level)::

    import qsdcompress as q
    model = q.load()                       # the bundled digits model
    print(q.eval(model)["top1"])
    small = q.convert(model, bits=4)
    q.export(small, "model.onnx")

The functions live with their concerns (:mod:`qsdcompress.loading`, :mod:`qsdcompress.pipeline`,
:mod:`qsdcompress.train`, :mod:`qsdcompress.mixed`, :mod:`qsdcompress.export`, :mod:`qsdcompress.report`); this module
only names them.
"""
from .config import DEFAULT_WORKDIR
from .onnx_export.exporter import export
from .loading import bundled_model, guess_arch, load, model_meta, resolve_model, save
from .mixed import sensitivity
from .pipeline import convert_model as convert
from .pipeline import demo
from .pipeline import run_eval as eval  # noqa: A001 - named after the command
from .reporting import report
from .train import finetune

__all__ = ["load", "save", "eval", "convert", "sensitivity", "finetune", "export", "report", "demo", "bundled_model", "model_meta",
           "guess_arch", "resolve_model", "DEFAULT_WORKDIR"]
