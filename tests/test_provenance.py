"""provenance: the CPU's name and identity from /proc/cpuinfo (with fallbacks), the threads in use."""
from __future__ import annotations

import os
import platform

import torch

from qsdcompress.provenance import cpu_name, machine_description, package_versions


def test_cpu_name_reads_cpuinfo_and_falls_back_to_the_architecture(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_name(info) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cpu_name(tmp_path / "missing") == "aarch64"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # ARM cpuinfo has no model name
    assert cpu_name(info) == "aarch64"


def test_machine_description_records_the_threads_in_use_and_the_cpu_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\n")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m = machine_description(info)
        assert m["torch_threads"] == 1 and m["cores"] == os.cpu_count()
        assert m["cpu"] == "AMD EPYC" and m["cpu_id"] == "cpu family 26 model 2 stepping 1"
        assert m["cuda"] is None or isinstance(m["cuda"], str)
        assert machine_description(tmp_path / "missing")["cpu_id"] is None
    finally:
        torch.set_num_threads(before)


def test_package_versions_name_python_and_torch():
    v = package_versions()
    assert v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__.split("+")[0]
