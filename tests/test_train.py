"""Finetune loop: kill-and-resume equals an uninterrupted run, 2-process DDP, non-finite loss,
recipes and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.config import FinetuneConfig, read_recipe
from qsdcompress.errors import QsdError
from qsdcompress.qsdfile import read_checkpoint
from qsdcompress.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=16, eval_batch_size=64, eval_max_batches=1, threads=1, device="cpu")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The bundled digits model converted to 4-bit weights with IE-LIF on q/k/v."""
    from qsdcompress.quant import QuantConfig, convert

    path = tmp_path_factory.mktemp("conv") / "converted.qsd"
    model = convert(q.load(), QuantConfig(bits=4, calib_batches=1, scale_init="lsq"))
    q.save(model, path, kind="converted")
    return path


def _workdir(tmp_path: Path, name: str, converted: Path) -> Path:
    wd = tmp_path / name
    wd.mkdir()
    (wd / "converted.qsd").write_bytes(converted.read_bytes())
    return wd


_RUN = """
import os, signal, sys
from qsdcompress.config import FinetuneConfig
from qsdcompress.train import run_finetune
cfg = FinetuneConfig.from_json(sys.argv[1])
kill_at = int(sys.argv[2])
def on_checkpoint(step, path):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run_finetune(cfg, on_checkpoint=on_checkpoint)
"""


def _run(cfg: FinetuneConfig, kill_at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "QSDCOMPRESS_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _RUN, cfg.to_json(), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, converted):
    opts = dict(SMALL, epochs=2, limit_train_batches=3, save_every=2, ema=True, ema_decay=0.9, seed=3)
    full_dir = _workdir(tmp_path, "full", converted)
    killed_dir = _workdir(tmp_path, "killed", converted)
    r = _run(FinetuneConfig(workdir=str(full_dir), **opts))
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = FinetuneConfig(workdir=str(killed_dir), **opts)
    r = _run(cfg, kill_at=4)  # step 4 is inside epoch 2 (3 steps per epoch)
    assert r.returncode == -9, r.stderr[-2000:]
    ckpt = load_checkpoint(killed_dir / "finetune" / "checkpoint.json")
    assert ckpt["progress"] == {"step": 4, "epoch": 1, "batch": 1}
    assert not list((killed_dir / "finetune").glob("*.pt"))  # no pickle written
    assert not (killed_dir / "finetuned.qsd").exists()

    cfg.resume = "auto"
    r = _run(cfg)
    assert r.returncode == 0, r.stderr[-2000:]

    a, meta_a = read_checkpoint(full_dir / "finetuned.qsd")
    b, meta_b = read_checkpoint(killed_dir / "finetuned.qsd")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # training changed the weights (the output may still be the input: never worse on validation)
    inp = q.load(converted).state_dict()
    trained = load_checkpoint(full_dir / "finetune" / "checkpoint.json")["model"]
    assert any(not torch.equal(inp[k], trained[k]) for k in inp if inp[k].is_floating_point())
    assert meta_a["finetune"]["top1"] == meta_b["finetune"]["top1"]
    assert meta_a["finetune"]["kept"] == meta_b["finetune"]["kept"]
    assert meta_a["finetune"]["steps"] == meta_b["finetune"]["steps"] == 6
    csv_a = (full_dir / "finetune" / "metrics.csv").read_text().splitlines()
    csv_b = (killed_dir / "finetune" / "metrics.csv").read_text().splitlines()
    drop = csv_a[0].split(",").index("images_per_s")  # wall-clock speed differs, the rest must not

    def strip(rows):
        return [[c for i, c in enumerate(row.split(",")) if i != drop] for row in rows]

    assert strip(csv_a) == strip(csv_b) and len(csv_a) == 3


_DDP = """
import json, os, sys, torch
import qsdcompress as q
from qsdcompress.config import FinetuneConfig
from qsdcompress.train import run_finetune
cfg = FinetuneConfig.from_json(sys.argv[1])
student = q.load(os.path.join(cfg.workdir, "converted.qsd"))
trained = {}
def on_checkpoint(step, path):  # the weights each rank trained to (the output may be the input)
    trained["state"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
model, result = run_finetune(cfg, student, on_checkpoint=on_checkpoint)
rank = os.environ["RANK"]
torch.save(trained["state"], os.path.join(sys.argv[2], f"rank{rank}.pt"))
torch.save(model.state_dict(), os.path.join(sys.argv[2], f"kept{rank}.pt"))
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({k: v for k, v in result.items() if k != "history"}, f)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, converted):
    wd = _workdir(tmp_path, "ddp", converted)
    out = tmp_path / "ranks"
    out.mkdir()
    cfg = FinetuneConfig(workdir=str(wd), steps=2, **{**SMALL, "batch_size": 8})
    env = {**os.environ, "QSDCOMPRESS_QUIET": "1", "OMP_NUM_THREADS": "1"}
    script = tmp_path / "ddp_script.py"
    script.write_text(_DDP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), cfg.to_json(), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = torch.load(out / "rank0.pt", weights_only=True)
    s1 = torch.load(out / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    inp = q.load(converted).state_dict()
    assert any(not torch.equal(inp[k], s0[k]) for k in inp if inp[k].is_floating_point())
    res = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert res[0]["world_size"] == res[1]["world_size"] == 2 and res[0]["steps"] == 2
    assert res[0]["kept"] == res[1]["kept"] and res[0]["top1"] == res[1]["top1"]
    kept = torch.load(out / "kept0.pt", weights_only=True)
    saved = q.load(wd / "finetuned.qsd")  # written once, by rank 0: the kept model
    x = torch.randn(4, 3, 32, 32)
    ref = q.load(converted)
    ref.load_state_dict(kept)
    with torch.no_grad():
        assert torch.equal(saved.eval()(x), ref.eval()(x))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, converted, monkeypatch):
    import qsdcompress.train.loop as train

    calls = {"n": 0}
    real = train.kd_loss

    def poisoned(s, t, tau=1.0):
        calls["n"] += 1
        out = real(s, t, tau)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(train, "kd_loss", poisoned)
    wd = _workdir(tmp_path, "nan", converted)
    cfg = FinetuneConfig(workdir=str(wd), steps=4, save_every=1, lambda_fgd=0.0, **{**SMALL, "batch_size": 8})
    with pytest.raises(QsdError, match="non-finite loss at step 3"):
        train.run_finetune(cfg)
    ckpt = load_checkpoint(wd / "finetune" / "checkpoint.json")
    assert ckpt["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (wd / "finetuned.qsd").exists()


def test_quantizer_scales_and_ie_lif_get_their_own_learning_rate(converted):
    from qsdcompress.neurons import IELIF
    from qsdcompress.train import build_optimizer

    model = q.load(converted)
    cfg = FinetuneConfig(lr=1e-4, scale_lr=3e-3)
    opt = build_optimizer(model, cfg)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    scales = [p for n, p in model.named_parameters() if "scaling_impl" in n]
    ie = [p for m in model.modules() if isinstance(m, IELIF) for p in m.parameters()]
    assert scales and ie
    for p in scales + ie:
        assert by_id[id(p)]["lr"] == 3e-3 and by_id[id(p)]["weight_decay"] == 0.0
    head = model.head.weight
    assert by_id[id(head)]["lr"] == 1e-4 and by_id[id(head)]["weight_decay"] == cfg.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_rng_state_round_trip():
    import random

    import numpy as np

    from qsdcompress.train import rng_state, set_rng_state

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _same(a, b) -> bool:
    """Equal values of equal types: tensors bit for bit (dtype too), tuples stay tuples, NaN == NaN."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    if isinstance(a, dict):  # a state_dict's OrderedDict comes back as a dict, in the same order
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _trained_state(converted: Path) -> dict:
    """A finetune-shaped state after two optimizer steps: AdamW moments, a cosine schedule, EMA."""
    from timm.utils import ModelEmaV3

    from qsdcompress.train import build_optimizer, build_scheduler, rng_state

    model = q.load(converted)
    cfg = FinetuneConfig(lr=1e-3)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    ema = ModelEmaV3(model, decay=0.9)
    for step in range(2):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step_update(step + 1)
        ema.update(model)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": ema.state_dict(), "rng": rng_state(), "progress": {"step": 2, "epoch": 0, "batch": 2},
            "best": {"top1": -1.0, "loss": float("nan"), "source": "model"}, "history": [], "scaler": {},
            "config": json.loads(cfg.to_json())}


def test_checkpoint_is_safetensors_and_json_and_round_trips_exactly(tmp_path, converted):
    from safetensors import safe_open

    from qsdcompress.train import save_checkpoint

    state = _trained_state(converted)
    path = tmp_path / "run" / "checkpoint.json"
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.a.safetensors", "checkpoint.json"]
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert doc["state"]["progress"] == {"step": 2, "epoch": 0, "batch": 2}
    assert doc["state"]["optimizer"]["param_groups"][0]["betas"] == {"$tuple": [0.9, 0.999]}
    assert doc["state"]["rng"]["torch"] == {"$tensor": "rng/torch"}
    with safe_open(str(path.parent / doc["tensors"]), framework="pt") as f:
        assert f.get_tensor("rng/torch").dtype == torch.uint8
        assert any(k.startswith("optimizer/state/") and k.endswith("/exp_avg") for k in f.keys())
    assert _same(load_checkpoint(path), state)
    # the next write goes to the other tensor file and removes the first: a kill during it leaves this one
    state["progress"]["step"] = 3
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.b.safetensors", "checkpoint.json"]
    assert load_checkpoint(path)["progress"]["step"] == 3


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, converted, monkeypatch):
    import qsdcompress.train.checkpoint as ck

    state = _trained_state(converted)
    path = tmp_path / "checkpoint.json"
    ck.save_checkpoint(path, state)
    real = ck.atomic_path

    def dies_on_the_json(p):
        if Path(p).suffix == ".json":
            raise KeyboardInterrupt  # killed after the tensors were written, before the JSON
        return real(p)

    monkeypatch.setattr(ck, "atomic_path", dies_on_the_json)
    changed = {**state, "progress": {"step": 9, "epoch": 1, "batch": 0}}
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, changed)
    monkeypatch.setattr(ck, "atomic_path", real)
    names = ["checkpoint.a.safetensors", "checkpoint.b.safetensors", "checkpoint.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # b: the new tensors, not yet named
    assert _same(ck.load_checkpoint(path), state)
    ck.save_checkpoint(path, changed)  # the next write cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == names[1:]
    assert ck.load_checkpoint(path)["progress"]["step"] == 9


def test_earlier_pickle_checkpoints_are_read_with_weights_only(tmp_path):
    """A finetune checkpoint of an earlier version (``checkpoint.pt``) is still resumable, read
    with ``torch.load(weights_only=True)``: a pickle that asks to run code is refused."""
    import pickle

    from qsdcompress.train import checkpoint_options, checkpoint_path

    run = tmp_path / "finetune"
    run.mkdir()
    torch.save({"progress": {"step": 1}, "config": FinetuneConfig(lr=0.5).to_json()}, run / "checkpoint.pt")
    assert checkpoint_path("auto", tmp_path) == run / "checkpoint.pt"
    assert checkpoint_path(str(run), tmp_path) == run / "checkpoint.json"
    assert load_checkpoint(run / "checkpoint.pt")["progress"] == {"step": 1}
    assert checkpoint_options(run / "checkpoint.pt")["lr"] == 0.5

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (run / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(QsdError, match="cannot resume"):
        load_checkpoint(run / "evil.pt")


def test_config_yaml_json_round_trip_and_shipped_recipes():
    cfg = FinetuneConfig(teacher="vit_digits", fgd_layers=[0, 1, 2, 3], lambda_kd=0.5, ema=True, steps=7)
    assert FinetuneConfig.from_yaml(cfg.to_yaml()) == cfg
    assert FinetuneConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(QsdError, match="unknown finetune option"):
        FinetuneConfig.from_dict({"lamda_kd": 1})
    for name in ("digits-tiny-w4.yaml", "imagenet-qsd-8_512-w4.yaml"):
        rec = FinetuneConfig.from_dict(read_recipe(ROOT / "recipes" / name))
        assert rec.teacher == "ann" and rec.lambda_fgd > 0 and rec.lambda_kd > 0
    assert FinetuneConfig.from_dict(read_recipe(ROOT / "recipes" / "imagenet-qsd-8_512-w4.yaml")).amp == "bf16"


def test_cli_recipe_command_line_wins_and_json(tmp_path, converted):
    wd = _workdir(tmp_path, "cli", converted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\nlimit-train-batches: 1\nbatch_size: 8\nlr: 0.5\nlambda_fgd: 0.25\n"
                      "eval_max_batches: 1\nthreads: 1\n")
    res = CliRunner().invoke(main, ["finetune", "--workdir", str(wd), "--recipe", str(recipe), "--lr", "0.0002",
                                    "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout)
    assert out["output"] == str(wd / "finetuned.qsd") and out["epochs"] == 1 and 0 <= out["top1"] <= 1
    assert set(out["losses"]) == {"loss", "ce", "kd", "fgd"}
    import yaml

    resolved = yaml.safe_load((wd / "finetune" / "config.yaml").read_text())
    assert resolved["lr"] == 0.0002 and resolved["lambda_fgd"] == 0.25 and resolved["batch_size"] == 8
    assert "torch" in resolved["versions"]
    assert resolved["machine"]["cores"] == os.cpu_count() and resolved["machine"]["torch_threads"] == 1
    header = (wd / "finetune" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ce", "kd", "fgd", "val_top1", "images_per_s"} <= set(header)
    # spike statistics of each epoch: firing rate per stage, q/k/v entropy per block
    assert {"rate.block3", "rate.ConvBlock1_1", "entropy.block3.0.q", "entropy.block4.0.v", "entropy_qkv"} <= set(header)
    row = out["history"][0]
    m = q.load(wd / "finetuned.qsd")
    assert m.qsd_meta["kind"] == "finetuned" and m.qsd_meta.get("quant")
    # against a direct count on the same evaluation batch (the first 256 digits validation images),
    # with the weights the epoch ended with (the run's checkpoint)
    from qsdcompress.data import DataConfig, build_loader
    from qsdcompress.neurons import information_entropy

    trained = q.load(wd / "converted.qsd")
    trained.load_state_dict(load_checkpoint(wd / "finetune" / "checkpoint.json")["model"])
    x = next(iter(build_loader("digits", "val", DataConfig.from_model(trained), batch_size=256)))[0]
    seen = {}
    n = trained.block3[0].attn.q_lif
    h = n.register_forward_hook(lambda _m, _i, o: seen.setdefault("q", o.detach()))
    with torch.no_grad():
        trained.eval()(x)
    h.remove()
    counts = torch.bincount(torch.floor(seen["q"] / n.out_scale + 0.5).long().flatten(), minlength=n.levels + 1)
    assert row["entropy.block3.0.q"] == pytest.approx(information_entropy(counts), abs=1e-9)
    # --resume alone continues with the run's own options (here: already finished, nothing to do)
    res = CliRunner().invoke(main, ["finetune", "--workdir", str(wd), "--resume", "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    again = json.loads(res.stdout)
    assert again["epochs"] == 1 and again["steps"] == out["steps"] and again["top1"] == out["top1"]
    resolved = yaml.safe_load((wd / "finetune" / "config.yaml").read_text())
    assert resolved["lr"] == 0.0002 and resolved["batch_size"] == 8 and resolved["resume"] == "auto"


def test_cli_missing_converted_model_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["finetune", "--workdir", str(tmp_path / "empty"), "--json"])
    assert res.exit_code == 2
    assert "run `qsdcompress convert` first" in res.output


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, converted):
    wd = _workdir(tmp_path, "noresume", converted)
    from qsdcompress.train import run_finetune

    with pytest.raises(QsdError, match="no checkpoint to resume from"):
        run_finetune(FinetuneConfig(workdir=str(wd), resume="auto", steps=1, **SMALL))


def test_epochs_are_chosen_on_validation_and_never_worse_than_the_input(tmp_path, converted):
    """A step that wrecks the model (a huge learning rate) does not beat the input on validation,
    so the output is the input; the test split is measured once, on the kept model."""
    from qsdcompress.train import run_finetune

    wd = _workdir(tmp_path, "worse", converted)
    _, r = run_finetune(FinetuneConfig(workdir=str(wd), steps=1, lr=50.0, scale_lr=50.0, clip_grad=None,
                                       lambda_kd=0.0, lambda_fgd=0.0, **SMALL))
    assert r["kept"] == "input" and r["best_epoch"] == 0
    assert r["history"][0]["val_top1"] < r["val_top1"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q.load(wd / "finetuned.qsd")(x), q.load(wd / "converted.qsd")(x))
    # the input's validation top-1 is what `eval --split val` gives on the same batches
    from qsdcompress.pipeline import run_eval

    ref = run_eval(wd / "converted.qsd", split="val", batch_size=64, max_batches=1)
    assert r["val_top1"] == ref["top1"]
    test = run_eval(wd / "converted.qsd", split="test", batch_size=64, max_batches=1)
    assert r["top1"] == test["top1"]


def test_resume_given_a_model_file_means_that_model_and_its_run(tmp_path, converted):
    """``finetune --resume MODEL.qsd``: click gives MODEL.qsd to --resume; it is the model, and the
    run resumes from its run directory (none here: the checkpoint error, not a pickle error)."""
    wd = _workdir(tmp_path, "resmodel", converted)
    res = CliRunner().invoke(main, ["finetune", "--workdir", str(wd), "--resume", str(wd / "converted.qsd")])
    assert res.exit_code == 2 and "no checkpoint to resume from" in res.output
    assert str(wd / "finetune" / "checkpoint.json") in res.output
    with pytest.raises(QsdError, match="model file, not a finetune checkpoint"):
        FinetuneConfig(workdir=str(wd), resume=str(wd / "converted.qsd")).validate()


def test_cross_architecture_teacher_bundled_vit(tmp_path, converted):
    from qsdcompress.train import run_finetune

    wd = _workdir(tmp_path, "vit", converted)
    steps = []
    model, r = run_finetune(FinetuneConfig(workdir=str(wd), teacher="vit_digits", steps=2, **{**SMALL, "batch_size": 8}),
                            on_step=lambda s, parts: steps.append(parts))
    assert r["teacher"] == "vit_digits" and r["steps"] == 2 and len(steps) == 2
    assert all(p["fgd"] > 0 and p["kd"] > 0 for p in steps)
    for p in steps:  # the total is the documented weighted sum
        assert p["loss"] == pytest.approx(p["ce"] + p["kd"] + p["fgd"], rel=1e-5)
    import yaml

    resolved = yaml.safe_load((wd / "finetune" / "config.yaml").read_text())["resolved"]
    assert resolved["fgd_layer_map"] == [0, 1, 2, 3]


def test_ie_lif_warmup_ramps_the_blend_and_keeps_only_whole_ie_lif(tmp_path, converted, monkeypatch):
    """--ie-lif-warmup fades IE-LIF in over its steps; an epoch that ends inside the warm-up is
    measured but never kept, and the kept model is whole IE-LIF."""
    from qsdcompress.neurons import IELIF
    from qsdcompress.train import loop, run_finetune

    assert [loop.ie_lif_blend(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert loop.ie_lif_blend(0, 0) == 1.0
    seen: list[float] = []
    real_step = loop.compute_losses

    def spy(model, *a, **k):
        seen.append(next(m for m in model.modules() if isinstance(m, IELIF)).blend)
        return real_step(model, *a, **k)

    real_validate = loop.validate

    def flattering(run, epoch):  # an epoch inside the warm-up looks perfect: it must still not be kept
        ev = real_validate(run, epoch)
        return {**ev, "top1": 2.0} if ev["ie_lif_blend"] < 1 else ev  # beats anything real

    monkeypatch.setattr(loop, "compute_losses", spy)
    monkeypatch.setattr(loop, "validate", flattering)
    wd = _workdir(tmp_path, "warm", converted)
    student, r = run_finetune(FinetuneConfig(workdir=str(wd), steps=6, limit_train_batches=2, ie_lif_warmup=4,
                                             lambda_kd=0.0, lambda_fgd=0.0, **SMALL))
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [h["ie_lif_blend"] for h in r["history"]] == [0.5, 1.0, 1.0]
    assert r["history"][0]["val_top1"] == 2.0 and r["best_epoch"] != 1 and r["val_top1"] <= 1.0
    assert all(m.blend == 1.0 for m in student.modules() if isinstance(m, IELIF))


def test_ie_lif_warmup_without_ie_lif_is_a_clear_error(tmp_path):
    from qsdcompress.quant import QuantConfig, convert
    from qsdcompress.train import run_finetune

    model = convert(q.load(), QuantConfig(bits=4, calib_batches=1, ie_lif="none"))
    with pytest.raises(QsdError, match="no IE-LIF"):
        run_finetune(FinetuneConfig(workdir=str(tmp_path), steps=1, ie_lif_warmup=3, **SMALL), model)
    with pytest.raises(QsdError, match="ie-lif-warmup"):
        FinetuneConfig(ie_lif_warmup=-1).validate()


def test_an_epoch_beats_the_best_by_top1_then_by_lower_loss():
    from qsdcompress.train.loop import beats

    best = {"top1": 1.0, "loss": 0.05}
    assert beats({"top1": 1.0, "loss": 0.04}, best)       # a tie on top-1: the lower loss wins
    assert not beats({"top1": 1.0, "loss": 0.05}, best)   # an exact tie keeps what was kept
    assert not beats({"top1": 0.99, "loss": 0.001}, best)  # top-1 first
    assert beats({"top1": 0.5, "loss": 9.0}, {"top1": 0.4, "loss": 0.1})
