"""Bad input as a new user makes it: one-line errors, non-zero exit, no traceback, nothing half-written."""
import os
import string

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.zoo import MODELS

BUNDLED_SNN = MODELS["qsd_tiny_digits"].path

MARKER = "/tmp/qsdcompress_cli_pwned_marker"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def invoke(args, cwd):
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def assert_clean_error(r, *needles):
    out = r.output
    assert r.exit_code != 0, out
    assert "Traceback" not in out, out
    assert "error:" in out or "Usage:" in out, out
    for n in needles:
        assert n in out, (n, out)


@pytest.fixture
def bad_files(tmp_path):
    """One file of each kind of bad input."""
    files = {}
    files["missing"] = tmp_path / "missing.qsd"
    files["empty"] = tmp_path / "empty.qsd"
    files["empty"].write_bytes(b"")
    files["garbage"] = tmp_path / "garbage.qsd"
    files["garbage"].write_bytes(os.urandom(256))
    trunc = tmp_path / "truncated.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(trunc))
    trunc.write_bytes(trunc.read_bytes()[:-100])
    files["truncated_safetensors"] = trunc
    qtrunc = tmp_path / "truncated.qsd"
    qtrunc.write_bytes(BUNDLED_SNN.read_bytes()[: BUNDLED_SNN.stat().st_size // 3])
    files["truncated_qsd"] = qtrunc
    pth = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, pth)
    pth.write_bytes(pth.read_bytes()[:300])
    files["truncated_pth"] = pth
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Evil()}, evil)
    files["evil"] = evil
    other = tmp_path / "other_arch.pth"
    from qsdcompress import create_model

    torch.save({"model": create_model("metaspikformer_8_384", embed_dim=(8, 16, 32, 32)).state_dict()}, other)
    files["other_arch"] = other
    return files


@pytest.mark.parametrize("kind,needle", [
    ("missing", "not found"), ("empty", "empty"), ("garbage", "corrupt"),
    ("truncated_safetensors", "corrupt"), ("truncated_qsd", "corrupt"), ("truncated_pth", "corrupt"),
    ("evil", "refused"),
])
@pytest.mark.parametrize("command", ["eval", "convert", "export", "report"])
def test_bad_model_files(bad_files, tmp_path, kind, needle, command):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    args = [command, bad_files[kind]]
    if command == "eval" and kind == "truncated_safetensors":
        args += ["--arch", "qsd_tiny"]
    r = invoke(args + ["--workdir", tmp_path / "wd"] if command != "eval" else args, tmp_path)
    assert_clean_error(r, needle)
    assert not os.path.exists(MARKER), "the pickle ran code"
    wd = tmp_path / "wd"
    assert not wd.exists() or not any(wd.iterdir()), "nothing is written on failure"


def test_bad_file_for_finetune(bad_files, tmp_path):
    for kind, needle in [("truncated_qsd", "corrupt"), ("evil", "refused"), ("missing", "not found")]:
        r = invoke(["finetune", bad_files[kind], "--workdir", tmp_path / "wd"], tmp_path)
        assert_clean_error(r, needle)
    assert not os.path.exists(MARKER)


def test_checkpoint_of_another_architecture_names_keys(bad_files, tmp_path):
    r = invoke(["eval", "--arch", "qsd_tiny", "--checkpoint", bad_files["other_arch"]], tmp_path)
    assert_clean_error(r, "does not fit architecture qsd_tiny", "missing", "unexpected")


@pytest.mark.parametrize("bits", ["0", "9", "-1", "x", "4.5", ""])
def test_bits_out_of_range(tmp_path, bits):
    r = invoke(["convert", "--bits", bits, "--workdir", tmp_path / "wd"], tmp_path)
    assert_clean_error(r)
    assert not (tmp_path / "wd" / "converted.qsd").exists()


def test_unknown_names_suggest_closest(tmp_path):
    assert_clean_error(invoke(["eval", "--arch", "qsd_tinny", "--checkpoint", BUNDLED_SNN], tmp_path),
                       "qsd_tiny")
    (tmp_path / "wd").mkdir()
    q.save(q.load(BUNDLED_SNN), tmp_path / "wd" / "converted.qsd", kind="converted")
    r = invoke(["finetune", "--teacher", "vit_bse", "--workdir", tmp_path / "wd"], tmp_path)
    assert_clean_error(r, "vit_base")


def test_data_folder_problems(tmp_path):
    """A model that records no data of its own (a fresh one), so that the folder is what is read."""
    model = q.save(q.create_model("qsd_tiny").eval(), tmp_path / "fresh.qsd")
    (tmp_path / "empty").mkdir()
    assert_clean_error(invoke(["eval", model, "--data", tmp_path / "empty"], tmp_path), "no class subfolders")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"not a png")
    assert_clean_error(invoke(["eval", model, "--data", flat], tmp_path), "no class subfolders")
    for k in range(10):  # as many classes as the model, so that the images themselves are read
        bad = tmp_path / "badimg" / f"cls{k}"
        bad.mkdir(parents=True)
        (bad / "a.png").write_bytes(b"not a png")
    assert_clean_error(invoke(["eval", model, "--data", tmp_path / "badimg"], tmp_path), "cannot read image")
    one = tmp_path / "oneclass" / "cls"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes(b"not a png")
    assert_clean_error(invoke(["eval", model, "--data", tmp_path / "oneclass"], tmp_path),
                       "oneclass has 1 classes, the model predicts 10")


def test_workdir_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    import qsdcompress.pipeline as pipeline

    (tmp_path / "afile").write_text("x")
    calls = []
    monkeypatch.setattr(pipeline, "convert", lambda *a, **k: calls.append(1))
    r = invoke(["convert", "--workdir", tmp_path / "afile" / "sub"], tmp_path)
    assert_clean_error(r, "is a file, not a directory")
    assert not calls  # refused up front, not after calibrating
    r = invoke(["export", "-o", tmp_path / "afile" / "m.onnx"], tmp_path)
    assert_clean_error(r, "is a file, not a directory")


def test_workdir_without_expected_file(tmp_path):
    (tmp_path / "wd").mkdir()
    r = invoke(["finetune", "--workdir", tmp_path / "wd"], tmp_path)
    assert_clean_error(r, "convert")


_TOKENS = st.one_of(
    st.sampled_from(["--bits", "--batch-size", "--data", "--spike-mode", "--device", "--split", "--max-batches",
                     "--layer-bits", "--skip", "--scale-init", "--ie-lif", "--teacher", "--epochs", "--format",
                     "--batches", "--energy-table", "-o", "--arch", "--json", "0", "-3", "9", "abc", "4",
                     "digits", "synthetic:0", "cuda", "binary", "qkv", "*=2", "=", "nope.qsd", ""]),
    st.text(alphabet=string.ascii_letters + string.digits + "-_:=*./", max_size=12),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["eval", "convert", "finetune", "export", "report"]),
       args=st.lists(_TOKENS, max_size=4))
def test_fuzzed_arguments_never_traceback(tmp_path, command, args):
    # a bad extra argument first so that no long job starts when every fuzzed value happens to be valid
    r = invoke([command, "--workdir" if command != "eval" else "--max-batches",
                tmp_path / "fuzz-wd" if command != "eval" else "1", *args, "--definitely-not-an-option"],
               tmp_path)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.one_of(st.integers(-5, 20).map(str), st.text(max_size=4)),
       batch=st.one_of(st.integers(-3, 3).map(str), st.text(max_size=3)),
       data=st.sampled_from(["digits", "synthetic:4", "synthetic:x", "cifar10:/nope", "/no/such/dir", ""]))
def test_fuzzed_values_fail_cleanly_or_run(tmp_path, bits, batch, data):
    """Values are fuzzed for real: a valid combination runs (small), an invalid one is a clean error."""
    r = invoke(["eval", "--data", data, "--batch-size", batch, "--max-batches", "1"], tmp_path)
    assert "Traceback" not in r.output
    assert r.exit_code in (0, 2), r.output
    if r.exit_code:
        assert "error:" in r.output or "Usage:" in r.output
    r = invoke(["convert", "--bits", bits, "--calib-batches", "0", "--no-eval", "--first-last-bits", "8",
                "--skip", "nothing-matches-this", "--workdir", tmp_path / "wd"], tmp_path)
    assert "Traceback" not in r.output and r.exit_code == 2, r.output  # the glob matches nothing
