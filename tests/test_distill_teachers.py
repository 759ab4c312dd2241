"""Teachers at any resolution, class count and depth: a timm checkpoint loads with the shape it was
saved with, runs at the image size it was trained at (or at a requested size, position embeddings
resampled as timm does), and FGD maps its token grids and blocks onto the student's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.config import FinetuneConfig
from qsdcompress.data import DataConfig
from qsdcompress.distill import checkpoint_model_args, layer_map, load_teacher

SMALL = dict(batch_size=8, eval_batch_size=64, eval_max_batches=1, threads=1, device="cpu")


def _save(model: torch.nn.Module, path: Path) -> Path:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def vit32(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A ViT-S saved at 32 px with 10 classes (random weights), as ``vit_small32.pth``."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, num_classes=10).eval()
    return vit, _save(vit, tmp_path_factory.mktemp("vit") / "vit_small32.pth")


@pytest.fixture(scope="module")
def deit2(tmp_path_factory) -> Path:
    """A DeiT-Ti with 2 blocks at 32 px, 10 classes."""
    torch.manual_seed(1)
    deit = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32, num_classes=10)
    return _save(deit, tmp_path_factory.mktemp("deit") / "deit2.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The bundled digits model converted to 4-bit weights (what `qsdcompress convert` writes)."""
    from qsdcompress.quant import QuantConfig, convert

    path = tmp_path_factory.mktemp("conv") / "converted.qsd"
    q.save(convert(q.load(), QuantConfig(bits=4, calib_batches=1, scale_init="lsq")), path, kind="converted")
    return path


def _workdir(tmp_path: Path, converted: Path) -> Path:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "converted.qsd").write_bytes(converted.read_bytes())
    return wd


def test_checkpoint_model_args_read_from_the_weights(vit32, deit2):
    from safetensors.torch import load_file

    assert checkpoint_model_args("vit_small_patch16_224", vit32[0].state_dict()) == dict(num_classes=10, img_size=32)
    assert checkpoint_model_args("deit_tiny_patch16_224", load_file(str(deit2))) == \
        dict(num_classes=10, img_size=32, depth=2)
    with torch.device("meta"):
        caf = timm.create_model("caformer_s18", num_classes=7)
    # no position embeddings: the size is not in the weights; the class count is (an MlpHead)
    assert checkpoint_model_args("caformer_s18", caf.state_dict()) == dict(num_classes=7)


def test_vit_teacher_runs_at_its_checkpoint_size(vit32):
    vit, path = vit32
    student = q.create_model("qsd_tiny")
    t = load_teacher("vit_small_patch16_224", student, path)
    assert t.data_config.input_size == (3, 32, 32) and t.num_classes == 10 and t.num_layers == 12
    assert t.model.pos_embed.shape == (1, 5, 384)
    x = torch.randn(2, 3, 32, 32)
    logits, layers, grids = t(x, DataConfig.from_model(student))
    with torch.no_grad():
        torch.testing.assert_close(logits, vit(x))  # the student's batch is already the teacher's size
    assert grids[0] == (2, 2) and layers[0]["q"].shape == (2, 4, 384)
    assert layer_map(len(student.attention_blocks), t.num_layers) == [2, 5, 8, 11]


def test_requested_size_resamples_position_embeddings_as_timm_does(vit32):
    from timm.layers import resample_abs_pos_embed

    vit, path = vit32
    t = load_teacher("vit_small", q.create_model("qsd_tiny"), path, img_size=64)
    assert t.data_config.input_size == (3, 64, 64)
    expect = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1,
                                    interpolation="bicubic", antialias=True)
    torch.testing.assert_close(t.model.pos_embed, expect)
    _, _, grids = t(torch.randn(1, 3, 32, 32), DataConfig.from_model(q.create_model("qsd_tiny")))
    assert grids[0] == (4, 4)


def test_caformer_teacher_with_its_own_classes(tmp_path):
    torch.manual_seed(2)
    caf = timm.create_model("caformer_s18", num_classes=10).eval()
    path = _save(caf, tmp_path / "caformer10.pth")
    student = q.create_model("qsd_tiny")
    t = load_teacher("caformer_s18", student, path, img_size=64)  # no position embeddings: size given
    assert t.num_classes == 10 and t.num_layers == 12 and t.data_config.input_size == (3, 64, 64)
    x = torch.randn(1, 3, 32, 32)
    logits, _, grids = t(x, DataConfig.from_model(student))
    assert grids[0] == (4, 4) and grids[-1] == (2, 2)
    from qsdcompress.data import resize_batch

    with torch.no_grad():
        torch.testing.assert_close(logits, caf(resize_batch(x, DataConfig.from_model(student), t.data_config)))


def test_finetune_cli_with_vit_small_saved_at_32px(tmp_path, converted, vit32):
    """The command that used to fail with `pos_embed (1, 5, 384) vs (1, 197, 384)`."""
    wd = _workdir(tmp_path, converted)
    res = CliRunner().invoke(main, ["finetune", "--workdir", str(wd), "--teacher", "vit_small_patch16_224",
                                    "--teacher-checkpoint", str(vit32[1]), "--steps", "3", "--batch-size", "8",
                                    "--eval-max-batches", "1", "--eval-batch-size", "64", "--threads", "1",
                                    "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout)
    assert out["steps"] == 3 and out["losses"]["fgd"] > 0 and out["losses"]["kd"] > 0
    resolved = yaml.safe_load((wd / "finetune" / "config.yaml").read_text())["resolved"]
    assert resolved["fgd_layer_map"] == [2, 5, 8, 11]


def test_finetune_with_a_two_block_deit_maps_blocks_to_its_depth(tmp_path, converted, deit2):
    from qsdcompress.train import run_finetune

    wd = _workdir(tmp_path, converted)
    parts = []
    _, r = run_finetune(FinetuneConfig(workdir=str(wd), teacher="deit_tiny", teacher_checkpoint=str(deit2),
                                       steps=3, **SMALL), on_step=lambda s, p: parts.append(p))
    assert r["steps"] == 3 and all(p["fgd"] > 0 and p["kd"] > 0 for p in parts)
    resolved = yaml.safe_load((wd / "finetune" / "config.yaml").read_text())["resolved"]
    assert resolved["fgd_layer_map"] == [0, 0, 1, 1]  # 4 student blocks onto 2 teacher blocks


def test_offline_cached_timm_weights_at_a_requested_size(tmp_path, monkeypatch):
    """timm's own pretrained weights from a local Hub cache (offline), built at 32 px: timm resamples."""
    from huggingface_hub import constants
    from timm.layers import resample_abs_pos_embed

    cache = tmp_path / "hub"
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("b" * 40)
    ref = timm.create_model("vit_tiny_patch16_224")
    _save(ref, snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    t = load_teacher("vit_tiny", q.create_model("qsd_tiny"), img_size=32)
    assert t.data_config.input_size == (3, 32, 32) and t.num_classes == 1000
    expect = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=(2, 2), num_prefix_tokens=1,
                                    interpolation="bicubic", antialias=True)
    torch.testing.assert_close(t.model.pos_embed, expect)
