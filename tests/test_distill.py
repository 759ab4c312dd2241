"""Distillation: FGD and KD against direct computations, layer map, q/k/v capture, teachers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qsdcompress as q
from qsdcompress.data import DataConfig
from qsdcompress.distill import (QKVCapture, Teacher, build_vit_digits, counterpart_ann, fgd_loss, kd_loss,
                                 layer_map, load_teacher, resize_tokens, resolve_teacher_name, similarity)
from qsdcompress.errors import QsdError


def _direct_fgd(student, teacher, mapping):
    """docs/method.md §5 written out with loops: per sample, per row normalisation."""
    total, count = 0.0, 0
    for l, sf in enumerate(student):
        tf = teacher[mapping[l]]
        for z in ("q", "k", "v"):
            s, t = sf[z].double(), tf[z].double()
            b, n, _ = s.shape
            per_sample = []
            for i in range(b):
                gs = s[i] @ s[i].T
                gt = t[i] @ t[i].T
                gs = torch.stack([r / max(float(r.norm()), 1e-12) for r in gs])
                gt = torch.stack([r / max(float(r.norm()), 1e-12) for r in gt])
                per_sample.append(float(((gs - gt) ** 2).sum()) / n)
            total += sum(per_sample) / b
            count += 1
    return total / count


def _feats(layers, b, n, c, gen):
    return [{z: torch.randn(b, n, c, generator=gen) for z in "qkv"} for _ in range(layers)]


def test_fgd_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    student = _feats(3, 2, 16, 8, g)
    teacher = _feats(6, 2, 16, 24, g)  # other channel width: similarity matrices do not care
    mapping = layer_map(3, 6)
    got = fgd_loss(student, teacher, mapping)
    assert got.item() == pytest.approx(_direct_fgd(student, teacher, mapping), rel=1e-5)
    assert got.item() > 0


def test_fgd_zero_for_identical_inputs_and_scale_invariant():
    g = torch.Generator().manual_seed(2)
    feats = _feats(2, 3, 9, 5, g)
    assert fgd_loss(feats, feats, [0, 1]).item() == pytest.approx(0.0, abs=1e-10)
    # positive scaling of X leaves the row-normalised similarity unchanged
    scaled = [{z: 3.0 * t for z, t in f.items()} for f in feats]
    assert fgd_loss(feats, scaled, [0, 1]).item() == pytest.approx(0.0, abs=1e-9)


def test_fgd_gradient_reaches_student_only():
    g = torch.Generator().manual_seed(3)
    s = [{z: torch.randn(2, 4, 3, generator=g, requires_grad=True) for z in "qkv"}]
    t = [{z: torch.randn(2, 4, 3, generator=g, requires_grad=True) for z in "qkv"}]
    fgd_loss(s, t, [0]).backward()
    assert all(s[0][z].grad is not None and s[0][z].grad.abs().sum() > 0 for z in "qkv")
    assert all(t[0][z].grad is None for z in "qkv")


def test_fgd_resizes_teacher_grid_bilinearly():
    g = torch.Generator().manual_seed(4)
    student = _feats(1, 2, 16, 4, g)          # 4x4 grid
    teacher = _feats(1, 2, 64, 6, g)          # 8x8 grid
    got = fgd_loss(student, teacher, [0], student_grid=(4, 4), teacher_grids=[(8, 8)])
    resized = []
    for f in teacher:
        d = {}
        for z, t in f.items():
            img = t.transpose(1, 2).reshape(2, 6, 8, 8)
            img = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False)
            d[z] = img.reshape(2, 6, 16).transpose(1, 2)
        resized.append(d)
    assert got.item() == pytest.approx(_direct_fgd(student, resized, [0]), rel=1e-5)


def test_similarity_rows_have_unit_norm():
    x = torch.randn(2, 5, 3)
    gm = similarity(x)
    assert gm.shape == (2, 5, 5)
    torch.testing.assert_close(gm.norm(dim=-1), torch.ones(2, 5))


def test_layer_map_uniform_and_override():
    # m(l) = round((l + 1) * L_A / L_S) - 1, computed here with exact fractions (ties round up)
    for ls, la in [(4, 12), (4, 4), (8, 12), (12, 4), (3, 7), (4, 1)]:
        expect = [min(max(math.floor((l + 1) * la / ls + 0.5) - 1, 0), la - 1) for l in range(ls)]
        assert layer_map(ls, la) == expect
    assert layer_map(4, 12) == [2, 5, 8, 11]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(8, 12) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert layer_map(2, 5, [4, 0]) == [4, 0]
    with pytest.raises(QsdError, match="entries"):
        layer_map(2, 5, [1])
    with pytest.raises(QsdError, match="0..4"):
        layer_map(2, 5, [1, 5])


def test_kd_loss_matches_direct_kl():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    for tau in (1.0, 2.0, 4.0):
        ps = torch.softmax(s.double() / tau, -1)
        pt = torch.softmax(t.double() / tau, -1)
        direct = float((pt * (pt.log() - ps.log())).sum(-1).mean()) * tau ** 2
        assert kd_loss(s, t, tau).item() == pytest.approx(direct, rel=1e-5)
    assert kd_loss(s, s, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_snn_capture_gives_neuron_outputs_as_tokens(tiny_model):
    blocks = tiny_model.attention_blocks
    seen = {}
    hooks = [blocks[1].attn.k_lif.register_forward_hook(lambda m, i, o: seen.setdefault("k", o.detach()))]
    cap = QKVCapture(tiny_model, "snn")
    x = torch.randn(2, 3, 32, 32)
    tiny_model(x)
    layers = cap.pop()
    for h in hooks:
        h.remove()
    assert cap.num_layers == len(blocks) == len(layers)
    ref = seen["k"]  # (T, B, C, H, W)
    t_, b, c, h, w = ref.shape
    expect = ref.mean(0).reshape(b, c, h * w).permute(0, 2, 1)
    torch.testing.assert_close(layers[1]["k"], expect)
    assert cap.grids[1] == (h, w)
    cap.remove()
    tiny_model(x)
    assert cap.pop() == []


def test_timm_capture_splits_qkv_and_drops_prefix_tokens():
    vit = build_vit_digits().eval()
    cap = QKVCapture(vit, "timm", prefix_tokens=vit.num_prefix_tokens)
    raw = {}
    vit.blocks[2].attn.qkv.register_forward_hook(lambda m, i, o: raw.setdefault("qkv", o.detach()))
    x = torch.randn(2, 3, 32, 32)
    vit(x)
    layers = cap.pop()
    assert len(layers) == len(vit.blocks) == 4
    b, n_all, _ = raw["qkv"].shape
    heads, hd = vit.blocks[2].attn.num_heads, vit.blocks[2].attn.head_dim
    # timm's own layout: (B, N, 3, heads, head_dim)
    qkv = raw["qkv"].reshape(b, n_all, 3, heads, hd)
    for j, z in enumerate("qkv"):
        expect = qkv[:, 1:, j].reshape(b, n_all - 1, heads * hd)
        torch.testing.assert_close(layers[2][z], expect)
    assert cap.grids[2] == (8, 8)


def test_resize_tokens_identity_on_same_grid():
    x = torch.randn(2, 16, 3)
    assert resize_tokens(x, (4, 4), (4, 4)) is x
    assert resize_tokens(x, (4, 4), (2, 2)).shape == (2, 4, 3)


def test_teacher_names_aliases_and_errors(monkeypatch):
    assert resolve_teacher_name("vit_base") == "vit_base_patch16_224"
    assert resolve_teacher_name("deit_small") == "deit_small_patch16_224"
    assert resolve_teacher_name("caformer_b36") == "caformer_b36"
    with pytest.raises(QsdError, match="unknown teacher"):
        resolve_teacher_name("vit_bsae_patch16_224x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    student = q.create_model("qsd_tiny")
    with pytest.raises(QsdError, match="--teacher-checkpoint"):
        load_teacher("vit_base", student)


def test_timm_teacher_from_checkpoint_resized_input(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    student = q.create_model("qsd_tiny")
    teacher = load_teacher("vit_tiny", student, path)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    teacher.train()
    assert not teacher.model.training  # stays frozen in eval mode
    torch.testing.assert_close(teacher.model.head.weight, ref.head.weight)
    assert teacher.data_config.input_size == (3, 224, 224)
    x = torch.randn(2, 3, 32, 32)
    scfg = DataConfig.from_model(student)
    logits, layers, grids = teacher(x, scfg)
    assert logits.shape == (2, 10) and len(layers) == 12 and grids[0] == (14, 14)
    assert layers[0]["q"].shape == (2, 196, 192)
    # the teacher saw the batch resized and re-normalised to its own input configuration
    from qsdcompress.data import resize_batch

    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(resize_batch(x, scfg, teacher.data_config)))


def test_counterpart_ann_from_checkpoint(tmp_path):
    student = q.create_model("qsd_tiny")
    ann = q.create_model("qsd_tiny", ann=True)
    path = tmp_path / "ann.qsd"
    q.save(ann, path)
    got = counterpart_ann(student, path)
    assert got.cfg.neuron == "relu"
    for (k, a), (_, b) in zip(ann.state_dict().items(), got.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    teacher = Teacher(got, "ann", "snn", DataConfig.from_model(got))
    logits, layers, _ = teacher(torch.randn(2, 3, 32, 32), DataConfig.from_model(student))
    assert len(layers) == len(student.attention_blocks) and logits.shape == (2, 10)


def test_counterpart_ann_needs_weights_for_other_archs():
    with torch.device("meta"):
        student = q.create_model("qsd_8_256")
    with pytest.raises(QsdError, match="--teacher-checkpoint"):
        counterpart_ann(student)


def test_bundled_teachers_are_trained():
    """The shipped teachers are real: they classify the digits test split well."""
    from qsdcompress.data import build_loader
    from qsdcompress.metrics import evaluate

    student = q.create_model("qsd_tiny")
    for name in ("ann", "vit_digits"):
        t = load_teacher(name, student)
        loader = build_loader("digits", "test", t.data_config, batch_size=180)
        assert evaluate(t.model, loader)["top1"] > 0.9, name


def test_fmnist_vit_matches_its_student_grid(tmp_path):
    """vit_fmnist takes the Fashion-MNIST student's input (1x28x28) and its q/k/v come on the
    student's 7x7 token grid; a missing weights file is one clear error naming the script."""
    from qsdcompress.distill import BUNDLED_VITS
    from qsdcompress.loading import bundled_vit

    vit = BUNDLED_VITS["vit_fmnist"].build().eval()
    student = q.create_model("qsd_tiny_fmnist").eval()
    assert DataConfig.from_model(vit).input_size == DataConfig.from_model(student).input_size == (1, 28, 28)
    cap = QKVCapture(vit, "timm", prefix_tokens=vit.num_prefix_tokens)
    vit(torch.randn(2, 1, 28, 28))
    assert cap.pop() and cap.grids[0] == (7, 7)
    with pytest.raises(QsdError, match="train_vit_teacher.py --data fashion-mnist"):
        bundled_vit("vit_fmnist", tmp_path / "missing.safetensors")
