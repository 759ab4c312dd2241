"""A quick, quiet start: ``import qsdcompress`` and ``qsdcompress --help`` load none of the heavy
libraries, the API names still resolve, timm still finds the architectures, torch's "No CUDA
runtime is found" is not printed, and a Hugging Face look-up without network fails in seconds."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qsdcompress as q

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "brevitas", "onnx", "onnxruntime", "pandas", "matplotlib", "scipy", "sklearn",
         "huggingface_hub", "numpy")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


@pytest.mark.parametrize("code", [
    "import qsdcompress",
    "from qsdcompress.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
])
def test_import_and_help_load_no_heavy_library(code):
    out = _python(f"{code}\nimport sys\nprint('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert "LOADED []" in out, out


def test_timm_finds_the_architectures_and_the_pretrained_loader_is_installed():
    out = _python("import qsdcompress, timm\n"
                  "m = timm.create_model('qsd_tiny')\n"
                  "import qsdcompress.models as models\n"
                  "print('OK', type(m).__name__, models._PRETRAINED_LOADER is not None)")
    assert "OK SpikeDrivenTransformer True" in out, out
    out = _python("import qsdcompress.quant\n"  # a subpackage that imports models in the middle of its import
                  "import qsdcompress.models as models\n"
                  "print('OK', models._PRETRAINED_LOADER is not None)")
    assert "OK True" in out, out


def test_api_names_resolve_to_their_functions():
    from qsdcompress import loading, models, neurons, pipeline
    from qsdcompress.mixed import sensitivity
    from qsdcompress.train import finetune

    assert q.load is loading.load and q.save is loading.save and q.bundled_model is loading.bundled_model
    assert q.model_meta is loading.model_meta and q.create_model is models.create_model
    assert q.list_models is models.list_models and q.set_spike_mode is neurons.set_spike_mode
    assert q.eval is pipeline.run_eval and q.convert is pipeline.convert_model and q.demo is pipeline.demo
    assert q.sensitivity is sensitivity and q.finetune is finetune
    assert {"load", "eval", "export", "report"} <= set(dir(q))
    assert q.quant.QuantConfig is not None  # subpackages as attributes, as before
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        q.no_such_name  # noqa: B018


def test_the_no_cuda_runtime_message_is_dropped_and_others_are_kept():
    log = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    h = Keep()
    log.addHandler(h)
    try:
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        log.warning("something else")
    finally:
        log.removeHandler(h)
    assert seen == ["something else"]


@pytest.fixture
def online_mode(monkeypatch):
    """No HF_HUB_OFFLINE anywhere: the look-up would go to the network."""
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import qsdcompress.io as qio

    monkeypatch.setattr(qio, "_REACHABLE", {})
    return qio


def test_no_network_teacher_lookup_fails_fast_with_one_line(online_mode, monkeypatch, tmp_path):
    from qsdcompress.distill import load_teacher
    from qsdcompress.errors import QsdError

    monkeypatch.setattr(online_mode, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(QsdError) as e:
        load_teacher("vit_base", q.create_model("qsd_tiny"))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg and "--teacher-checkpoint PATH" in msg


def test_reachability_probe_gives_up_after_its_timeout(online_mode, monkeypatch):
    import socket

    def hang(*_a, **_k):
        time.sleep(5)

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.perf_counter()
    assert online_mode.hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - t0 < 1.5
    monkeypatch.setattr(socket, "create_connection", lambda *_a, **_k: (_ for _ in ()).throw(OSError("dns")))
    online_mode._REACHABLE.clear()
    assert online_mode.hub_reachable(timeout=0.2) is False
    assert "cannot be reached" in online_mode.hub_unavailable()


def test_reachability_probe_asks_the_proxy_when_one_applies(monkeypatch):
    from qsdcompress.io import _hub_address

    for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    assert _hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert _hub_address() == ("hub.example", 8443)
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")
    assert _hub_address() == ("proxy.local", 3128)
    monkeypatch.setenv("no_proxy", "hub.example")
    assert _hub_address() == ("hub.example", 8443)
