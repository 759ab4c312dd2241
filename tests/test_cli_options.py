"""One behaviour across commands: an option name means one thing (one type, one default) in every
command that has it; --workdir, --device and --json everywhere they apply; finetune's options are
FinetuneConfig's fields."""
from __future__ import annotations

import dataclasses

import click

from qsdcompress.cli import main
from qsdcompress.config import FinetuneConfig

# per-command exceptions, each with its reason
OWN_DEFAULT = {("demo", "--data"): "the demo runs on a bundled data set: digits unless asked",
               ("demo", "--epochs"): "none: finetune's own default"}


def _options() -> dict[str, list[tuple[str, click.Option]]]:
    seen: dict[str, list[tuple[str, click.Option]]] = {}
    for cmd_name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                seen.setdefault(max(p.opts, key=len), []).append((cmd_name, p))
    return seen


def _default(p: click.Option) -> str:
    unset = p.default is None or type(p.default).__name__ == "Sentinel"
    return repr(False if p.is_flag and unset else None if unset else p.default)


def test_an_option_name_has_one_type_and_one_default_in_every_command():
    bad = []
    for name, uses in _options().items():
        kinds = {(type(p.type).__name__, p.multiple, p.is_flag) for _, p in uses}
        defaults = {_default(p) for c, p in uses if (c, name) not in OWN_DEFAULT}
        if len(kinds) > 1 or len(defaults) > 1:
            bad.append(f"{name}: " + ", ".join(f"{c} {type(p.type).__name__} {p.default!r}" for c, p in uses))
    assert not bad, "\n".join(bad)


def test_every_command_that_runs_a_model_takes_workdir_device_and_json():
    for cmd_name, cmd in main.commands.items():
        names = {p.name for p in cmd.params}
        assert "as_json" in names, cmd_name
        if cmd_name != "list":
            assert "workdir" in names, cmd_name
        if cmd_name not in ("list", "export"):  # export's check runs PyTorch on the runtime's CPU
            assert "device" in names, cmd_name


def test_finetune_options_are_the_config_fields():
    params = {p.name for p in main.commands["finetune"].params}
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert fields - params == set(), fields - params  # model is the argument, the rest options
    opt = next(p for p in main.commands["finetune"].params if p.name == "epochs")
    assert opt.default == FinetuneConfig().epochs and "Epochs" in opt.help


def test_convert_options_are_the_quant_config_and_budget_fields():
    from qsdcompress.config import Budget, QuantConfig

    params = {p.name: p for p in main.commands["convert"].params}
    for cls in (QuantConfig, Budget):
        cli_fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
        assert cli_fields - set(params) == set(), cls.__name__
    assert params["bits"].default == str(QuantConfig().bits)
    assert params["candidate_bits"].default == ",".join(map(str, Budget().candidate_bits))
    assert "--sensitivity-samples" in params["samples"].opts and params["samples"].default == Budget().samples
    assert params["calib_batches"].hidden and "--calib-data" in params["calib_data"].opts


def test_convert_command_line_builds_the_configs(monkeypatch, tmp_path):
    """What the options become: the same QuantConfig/Budget the API builds from the same values."""
    from click.testing import CliRunner

    from qsdcompress import pipeline
    from qsdcompress.config import Budget, QuantConfig
    from qsdcompress.results import ModelList

    seen = {}  # what run_convert received; it returns an empty result (any Result prints)
    monkeypatch.setattr(pipeline, "run_convert",
                        lambda model, cfg, **kw: seen.update(cfg=cfg, **kw) or ModelList(models=[]))
    args = ["convert", "--bits", "3", "--layer-bits", "head=8", "--layer-bits", "block*=2", "--skip", "stem*",
            "--calib-batches", "2", "--calib-batch-size", "16", "--no-reestimate-bn", "--max-drop", "0.5",
            "--candidate-bits", "2,4", "--workdir", str(tmp_path), "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"].validate()
    assert cfg == QuantConfig(bits=3, layer_bits={"head": 8, "block*": 2}, skip=["stem*"], calib_batches=2,
                              calib_batch_size=16, reestimate_bn=False)
    assert cfg.num_calib_samples == 32
    assert seen["budget"].validate() == Budget(max_drop=0.5, candidate_bits=[2, 4])
    res = CliRunner().invoke(main, ["convert", "--workdir", str(tmp_path), "--json"])
    assert res.exit_code == 0 and seen["cfg"].validate() == QuantConfig() and not seen["budget"].active
