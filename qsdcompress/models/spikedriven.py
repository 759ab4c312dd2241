"""The spike-driven Transformer family (QSD-Transformer / Spike-driven Transformer V2 topology).

Module and parameter names follow the reference implementations, so their checkpoints load with
strict key matching: QSD-Transformer (``spikformer_*_CAFormer``: integer multi-spike neurons,
layer scale, attention scale 0.25) and Spike-driven Transformer V2 (``metaspikformer_*``: LIF
neurons, no layer scale, attention scale 0.125, attention threshold 0.5).

Tensors flow as ``(T, B, C, H, W)``. Every "neuron -> layer" step goes through
:func:`qsdcompress.neurons.spike_layer`, which makes binary (spike-driven) inference possible
without the model knowing about it. Models know nothing of quantization or training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..neurons import apply_planes, make_neuron, spike_layer
from ._structure import AttentionSite, ModelStructure, RepConvSite, join


@dataclass
class SDTConfig:
    """Architecture arguments; serialisable, stored with every saved model."""

    embed_dim: Sequence[int] = (128, 256, 512, 640)
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int = 224
    T: int = 1
    D: int = 4
    neuron: str = "multispike"          # multispike | lif | relu
    attn_scale: float = 0.25
    layer_scale: float | None = 1e-6    # None: no layer scale (SDT-V2)
    strides: Sequence[int] = (2, 2, 2, 2, 1)  # downsample1_1, 1_2, 2, 3, 4
    split_blocks: Sequence[int] | None = None  # (block3, block4); default int(.75 d), int(.25 d)
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("embed_dim", "strides", "split_blocks", "mean", "std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


class BNAndPadLayer(nn.Module):
    """BatchNorm followed by padding with the BN's own output for a zero input (RepConv)."""

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps)
        self.pad_pixels = pad_pixels

    def pad_values(self) -> torch.Tensor:
        bn = self.bn
        return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p > 0:
            pad = self.pad_values().view(1, -1, 1, 1)
            # pad with zeros then add the border value where the pad is: export friendly
            out = F.pad(out, [p] * 4)
            border = torch.ones_like(out[:1, :1])
            border = border - F.pad(torch.ones_like(x[:1, :1]), [p] * 4)
            out = out + border * pad
        return out


class RepConv(nn.Module):
    """1x1 conv -> BN+pad -> depthwise 3x3 -> 1x1 conv -> BN (reference ``RepConv``)."""

    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        conv1x1 = nn.Conv2d(in_channel, in_channel, 1, 1, 0, bias=False)
        bn = BNAndPadLayer(pad_pixels=1, num_features=in_channel)
        conv3x3 = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 0, groups=in_channel, bias=False),
            nn.Conv2d(in_channel, out_channel, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.body = nn.Sequential(conv1x1, bn, conv3x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def after_first(self, y: torch.Tensor) -> torch.Tensor:
        """The rest of the body, given the first (1x1) conv's output."""
        return self.body[2](self.body[1](y))

    @staticmethod
    def site(seq: str) -> RepConvSite:
        """The folding site of ``Sequential(RepConv, BatchNorm)`` named ``seq``."""
        body = f"{seq}.0.body"
        return RepConvSite(conv1=f"{body}.0", pad_bn=f"{body}.1", depthwise=f"{body}.2.0",
                           pointwise=f"{body}.2.1", bn=f"{body}.2.2", outer_bn=f"{seq}.1")


class SepConv(nn.Module):
    """Inverted separable convolution (MobileNetV2 style) with spiking inputs."""

    def __init__(self, dim: int, neuron: str, levels: int, expansion_ratio: int = 2,
                 kernel_size: int = 7, padding: int = 3):
        super().__init__()
        med = int(expansion_ratio * dim)
        self.lif1 = make_neuron(neuron, levels)
        self.pwconv1 = nn.Conv2d(dim, med, kernel_size=1, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(med)
        self.lif2 = make_neuron(neuron, levels)
        self.dwconv = nn.Conv2d(med, med, kernel_size=kernel_size, padding=padding, groups=med, bias=False)
        self.pwconv2 = nn.Conv2d(med, dim, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.bn1(spike_layer(self.lif1, x, self.pwconv1)).reshape(T, B, -1, H, W)
        x = spike_layer(self.lif2, x, self.dwconv)
        return self.bn2(self.pwconv2(x)).reshape(T, B, -1, H, W)

    def local_structure(self, p: str) -> ModelStructure:
        # the depthwise and second pointwise conv are one linear map of lif2's spikes
        return ModelStructure(
            conv_bn=[(join(p, "pwconv1"), join(p, "bn1")), (join(p, "pwconv2"), join(p, "bn2"))],
            neuron_bn={join(p, "lif2"): join(p, "bn1")},
            layer_input={join(p, "pwconv1"): join(p, "lif1"), join(p, "dwconv"): join(p, "lif2"),
                         join(p, "pwconv2"): join(p, "lif2")})


class MS_ConvBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, neuron: str, levels: int):
        super().__init__()
        self.Conv = SepConv(dim, neuron, levels)
        self.lif1 = make_neuron(neuron, levels)
        self.conv1 = nn.Conv2d(dim, dim * mlp_ratio, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim * mlp_ratio)
        self.lif2 = make_neuron(neuron, levels)
        self.conv2 = nn.Conv2d(dim * mlp_ratio, dim, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.Conv(x) + x
        x_feat = x
        x = self.bn1(spike_layer(self.lif1, x, self.conv1)).reshape(T, B, -1, H, W)
        x = self.bn2(spike_layer(self.lif2, x, self.conv2)).reshape(T, B, C, H, W)
        return x_feat + x

    def local_structure(self, p: str) -> ModelStructure:
        return ModelStructure(
            conv_bn=[(join(p, "conv1"), join(p, "bn1")), (join(p, "conv2"), join(p, "bn2"))],
            neuron_bn={join(p, "lif2"): join(p, "bn1")},
            layer_input={join(p, "conv1"): join(p, "lif1"), join(p, "conv2"): join(p, "lif2")})


class MS_MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, neuron: str, levels: int):
        super().__init__()
        self.fc1_conv = nn.Conv1d(in_features, hidden_features, 1, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden_features)
        self.fc1_lif = make_neuron(neuron, levels)
        self.fc2_conv = nn.Conv1d(hidden_features, in_features, 1, 1)
        self.fc2_bn = nn.BatchNorm1d(in_features)
        self.fc2_lif = make_neuron(neuron, levels)
        self.c_hidden = hidden_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        N = H * W
        x = x.flatten(3)
        x = self.fc1_bn(spike_layer(self.fc1_lif, x, self.fc1_conv)).reshape(T, B, self.c_hidden, N)
        x = self.fc2_bn(spike_layer(self.fc2_lif, x, self.fc2_conv)).reshape(T, B, C, H, W)
        return x

    def local_structure(self, p: str) -> ModelStructure:
        return ModelStructure(
            conv_bn=[(join(p, "fc1_conv"), join(p, "fc1_bn")), (join(p, "fc2_conv"), join(p, "fc2_bn"))],
            neuron_bn={join(p, "fc2_lif"): join(p, "fc1_bn")},
            layer_input={join(p, "fc1_conv"): join(p, "fc1_lif"), join(p, "fc2_conv"): join(p, "fc2_lif")})


class MS_Attention_RepConv_qkv_id(nn.Module):
    """Spike-driven self-attention: ``q @ (k^T @ v) * scale``, linear in the token count."""

    def __init__(self, dim: int, num_heads: int, neuron: str, levels: int, scale: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = scale
        self.head_lif = make_neuron(neuron, levels)
        self.q_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.k_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.v_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.q_lif = make_neuron(neuron, levels)
        self.k_lif = make_neuron(neuron, levels)
        self.v_lif = make_neuron(neuron, levels)
        self.attn_lif = make_neuron(neuron, levels, attention=True)
        self.proj_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))

    def _heads(self, s: torch.Tensor) -> torch.Tensor:
        """(..., T, B, C, H, W) -> (..., T, B, heads, N, C/heads)"""
        *lead, C, H, W = s.shape
        s = s.flatten(-2).transpose(-1, -2)
        s = s.reshape(*lead, H * W, self.num_heads, C // self.num_heads)
        return s.transpose(-3, -2)

    def _branch(self, conv: nn.Sequential, x_in, binary: bool, T: int, B: int) -> torch.Tensor:
        rep, bn = conv[0], conv[1]
        if binary:
            y = apply_planes(x_in, rep.body[0], lambda t: t.flatten(0, 1))
        else:
            y = rep.body[0](x_in.flatten(0, 1))
        y = bn(rep.after_first(y))
        return y.reshape(T, B, *y.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        N = H * W
        head_binary = self.head_lif.spike_mode == "binary" and self.head_lif.spiking
        x_in = self.head_lif.binary(x) if head_binary else self.head_lif(x)
        q = self._branch(self.q_conv, x_in, head_binary, T, B)
        k = self._branch(self.k_conv, x_in, head_binary, T, B)
        v = self._branch(self.v_conv, x_in, head_binary, T, B)

        binary = self.q_lif.spike_mode == "binary" and self.q_lif.spiking and self.k_lif.spiking
        if binary:
            # q and k as binary planes; each product adds up rows selected by binary spikes.
            q_planes = self._heads(self.q_lif.binary(q))     # (Dq, T, B, h, N, c)
            k_planes = self._heads(self.k_lif.binary(k))
            v_s = self._heads(self.v_lif(v))
            kv = None
            for kp in k_planes:
                t = kp.transpose(-2, -1) @ v_s
                kv = t if kv is None else kv + t
            a = None
            for qp in q_planes:
                t = qp @ kv
                a = t if a is None else a + t
        else:
            q_s = self._heads(self.q_lif(q))
            k_s = self._heads(self.k_lif(k))
            v_s = self._heads(self.v_lif(v))
            a = q_s @ (k_s.transpose(-2, -1) @ v_s)
        a = a * self.scale
        a = a.transpose(3, 4).reshape(T, B, C, N).reshape(T, B, C, H, W)
        rep, bn = self.proj_conv[0], self.proj_conv[1]
        y = spike_layer(self.attn_lif, a, rep.body[0])
        y = bn(rep.after_first(y))
        return y.reshape(T, B, C, H, W)

    def local_structure(self, p: str) -> ModelStructure:
        s = ModelStructure(attention=[AttentionSite(
            name=p, head=join(p, "head_lif"), q=join(p, "q_lif"), k=join(p, "k_lif"), v=join(p, "v_lif"),
            attn=join(p, "attn_lif"), num_heads=self.num_heads)])
        for branch, src in (("q_conv", "head_lif"), ("k_conv", "head_lif"), ("v_conv", "head_lif"),
                            ("proj_conv", "attn_lif")):
            site = RepConv.site(join(p, branch))
            s.repconv.append(site)
            for conv in (site.conv1, site.depthwise, site.pointwise):
                s.layer_input[conv] = join(p, src)
            if branch != "proj_conv":
                s.neuron_bn[join(p, f"{branch[0]}_lif")] = site.outer_bn
        return s


class MS_Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, neuron: str, levels: int,
                 attn_scale: float, layer_scale: float | None):
        super().__init__()
        self.attn = MS_Attention_RepConv_qkv_id(dim, num_heads, neuron, levels, attn_scale)
        if layer_scale is not None:
            self.layer_scale1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.layer_scale2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.layer_scale1 = self.layer_scale2 = None
        self.mlp = MS_MLP(dim, int(dim * mlp_ratio), neuron, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x)
        if self.layer_scale1 is not None:
            a = a * self.layer_scale1.view(1, 1, -1, 1, 1)
        x = x + a
        m = self.mlp(x)
        if self.layer_scale2 is not None:
            m = m * self.layer_scale2.view(1, 1, -1, 1, 1)
        return x + m


class MS_DownSampling(nn.Module):
    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int, padding: int,
                 first_layer: bool, neuron: str, levels: int):
        super().__init__()
        self.encode_conv = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding)
        self.encode_bn = nn.BatchNorm2d(embed_dims)
        self.first_layer = first_layer
        if not first_layer:
            self.encode_lif = make_neuron(neuron, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        if self.first_layer:
            y = self.encode_conv(x.flatten(0, 1))
        else:
            y = spike_layer(self.encode_lif, x, self.encode_conv)
        y = self.encode_bn(y)
        return y.reshape(T, B, *y.shape[1:])

    def local_structure(self, p: str) -> ModelStructure:
        return ModelStructure(conv_bn=[(join(p, "encode_conv"), join(p, "encode_bn"))],
                              layer_input={join(p, "encode_conv"): None if self.first_layer else join(p, "encode_lif")})


class SpikeDrivenTransformer(nn.Module):
    """Conv stages (downsampling + MS_ConvBlocks), then spike-driven Transformer blocks, then a
    neuron and a linear head; logits are averaged over the T time steps."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.cfg = cfg
        ed = list(cfg.embed_dim)
        n, D = cfg.neuron, cfg.D
        s = list(cfg.strides)
        self.num_classes = cfg.num_classes
        self.T = cfg.T
        self.downsample1_1 = MS_DownSampling(cfg.in_chans, ed[0] // 2, 7, s[0], 3, True, n, D)
        self.ConvBlock1_1 = nn.ModuleList([MS_ConvBlock(ed[0] // 2, cfg.mlp_ratio, n, D)])
        self.downsample1_2 = MS_DownSampling(ed[0] // 2, ed[0], 3, s[1], 1, False, n, D)
        self.ConvBlock1_2 = nn.ModuleList([MS_ConvBlock(ed[0], cfg.mlp_ratio, n, D)])
        self.downsample2 = MS_DownSampling(ed[0], ed[1], 3, s[2], 1, False, n, D)
        self.ConvBlock2_1 = nn.ModuleList([MS_ConvBlock(ed[1], cfg.mlp_ratio, n, D)])
        self.ConvBlock2_2 = nn.ModuleList([MS_ConvBlock(ed[1], cfg.mlp_ratio, n, D)])
        self.downsample3 = MS_DownSampling(ed[1], ed[2], 3, s[3], 1, False, n, D)
        n3, n4 = cfg.split_blocks or (int(cfg.depth * 0.75), int(cfg.depth * 0.25))
        blk = dict(num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, neuron=n, levels=D,
                   attn_scale=cfg.attn_scale, layer_scale=cfg.layer_scale)
        self.block3 = nn.ModuleList([MS_Block(ed[2], **blk) for _ in range(n3)])
        self.downsample4 = MS_DownSampling(ed[2], ed[3], 3, s[4], 1, False, n, D)
        self.block4 = nn.ModuleList([MS_Block(ed[3], **blk) for _ in range(n4)])
        self.lif = make_neuron(n, D)
        self.head = nn.Linear(ed[3], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "num_classes": cfg.num_classes, "interpolation": "bicubic", "crop_pct": 0.875,
            "first_conv": "downsample1_1.encode_conv", "classifier": "head",
        }
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def attention_blocks(self) -> list[MS_Block]:
        return [*self.block3, *self.block4]

    def structure(self) -> ModelStructure:
        """How the layers connect, for the tools (see ``models/_structure.py``): every block
        describes its own part; the head is fed by the last neuron."""
        s = ModelStructure()
        for name, m in self.named_modules():
            part = getattr(m, "local_structure", None)
            if part is not None and m is not self:
                s.merge(part(name))
        s.layer_input["head"] = "lif"
        return s

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample1_1(x)
        for b in self.ConvBlock1_1:
            x = b(x)
        x = self.downsample1_2(x)
        for b in self.ConvBlock1_2:
            x = b(x)
        x = self.downsample2(x)
        for b in self.ConvBlock2_1:
            x = b(x)
        for b in self.ConvBlock2_2:
            x = b(x)
        x = self.downsample3(x)
        for b in self.block3:
            x = b(x)
        x = self.downsample4(x)
        for b in self.block4:
            x = b(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        x = self.forward_features(x)
        x = x.flatten(3).mean(3)
        if isinstance(self.head, nn.Identity):
            return self.lif(x).mean(0)
        return spike_layer(self.lif, x, self.head, merge_time=False).mean(0)

