"""Loading and saving models: ``.qsd`` files, reference checkpoints, the bundled models.

The low layer every command stands on. A ``.qsd`` file carries its architecture and
quantization, so it is rebuilt exactly; a reference checkpoint (``.pth``/``.pt``/``.safetensors``)
needs ``arch`` or has it inferred from its keys and shapes; a reference LSQ checkpoint
(``alpha`` keys) comes back as a quantized model with the same integers and steps.

It also serves ``timm.create_model(NAME, pretrained=True, ...)``: :func:`load_pretrained` is
installed in :mod:`qsdcompress.models` at import, so the timm factory reads a checkpoint exactly
as :func:`load` does (see that package's docstring).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import QsdError, one_line
from .io import hub_unavailable, load_state_dict_checked, sha256_file, strip_quant_extras
from .qsdfile import pack_ints, read_checkpoint, read_header_metadata, save_qsd, unpack_ints
from .models import create_model, list_models, model_config, resolve_name, set_pretrained_loader
from .quant import import_reference_lsq, is_quant_layer, quant_bits, restore_quantized, weight_layers
from .data import metadata_data, same_data
from .zoo import ZooModel, default_for, lookup, of_file, unknown_name_hint


def bundled_model(ann: bool = False, data: str = "digits") -> nn.Module:
    """The default bundled model of a data set (``qsd_tiny_digits`` on digits,
    ``qsd_tiny_fmnist`` on ``fashion-mnist``); ``ann=True``: its counterpart ANN."""
    return load(default_for(data, ann).require())


def model_file(spec: str | os.PathLike) -> Path:
    """The file a MODEL argument names: a path, else a bundled model's name (``qsdcompress list``)."""
    path = Path(spec)
    if path.exists():
        return path
    entry = lookup(str(spec))
    if entry is not None:
        return entry.require()
    if path.suffix or len(path.parts) > 1:
        raise QsdError(f"file not found: {path}")
    raise QsdError(f"{spec} is neither a file nor a bundled model; {unknown_name_hint(str(spec))}")


def _infer_model_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if "head.weight" in sd:
        args["num_classes"] = int(sd["head.weight"].shape[0])
    if "downsample1_1.encode_conv.weight" in sd:
        args["in_chans"] = int(sd["downsample1_1.encode_conv.weight"].shape[1])
    return args


def guess_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """The registered architecture whose keys and shapes match a state_dict, if one does
    (aliases of one topology, ``qsd_*`` and ``metaspikformer_*``, resolve to the first name)."""
    sd, _ = strip_quant_extras(sd)
    args = _infer_model_args(sd)
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name, **args)
        own = m.state_dict()
        if set(own) == set(sd) and all(tuple(own[k].shape) == tuple(sd[k].shape) for k in own):
            return name
    return None


def has_reference_lsq(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".alpha") for k in sd)


def build_from_meta(meta: dict) -> nn.Module:
    """An empty model with the architecture (and quantization) a ``.qsd`` file describes."""
    model = create_model(meta["arch"], **meta.get("model_args", {}))
    if meta.get("quant"):
        model = restore_quantized(model, meta)
    return model


def load(path: str | os.PathLike | None = None, arch: str | None = None, prefer_ema: bool = False,
         **model_args: Any) -> nn.Module:
    """Return the model stored in any supported file.

    ``.qsd`` files carry their architecture; for reference checkpoints (``.pth``, ``.pt``,
    ``.safetensors``) pass ``arch`` (e.g. ``"spikformer_8_512_CAFormer"``) or let it be inferred
    from the keys and shapes. A reference LSQ checkpoint (``alpha`` keys) is imported as a
    quantized model. ``path=None`` loads the bundled digits model.
    """
    if path is None:
        return bundled_model()
    path = model_file(path)
    sd, meta = read_checkpoint(path, prefer_ema=prefer_ema)
    if meta.get("kind") == "timm_teacher":
        entry = of_file(path)
        if entry is None or entry.vit is None:
            raise QsdError(f"{path} holds a timm teacher of no bundled shape; use it as "
                           f"`finetune --teacher-checkpoint {path}`")
        return _built_vit(entry, sd, path)
    if meta.get("arch") and arch is None:
        model = build_from_meta(meta)
        ints = _unpacked(sd, model, meta, path) if meta.get("packed_weights") else {}
        load_state_dict_checked(model, sd, source=str(path))
        _set_quantized_weights(model, ints)
        model.qsd_meta = meta  # type: ignore[assignment]
        return model.eval()
    if arch is None:
        arch = guess_arch(sd)
        if arch is None:
            raise QsdError(f"cannot tell the architecture of {path}; pass --arch NAME "
                           f"(one of {', '.join(list_models())})")
    canonical = resolve_name(arch)
    args = {**_infer_model_args(sd), **model_args}
    if has_reference_lsq(sd):
        model = import_reference_lsq(create_model(arch, **args), sd)
    else:
        model = create_model(arch, **args)
        clean, _ = strip_quant_extras(sd)
        load_state_dict_checked(model, clean, source=str(path))
    model.qsd_meta = {  # type: ignore[assignment]
        "kind": "reference", "arch": canonical,
        "model_args": model_config(canonical, **args).to_dict(),
        "source": {"path": str(path), "sha256": sha256_file(path)},
    }
    return model.eval()


def bundled_vit(name: str, path: str | os.PathLike | None = None) -> nn.Module:
    """A bundled ViT teacher (``vit_digits``, ``vit_fmnist``: ``qsdcompress list``), built with the
    shape the zoo records for it, from its own file or ``path``."""
    entry = lookup(name)
    if entry is None or entry.vit is None:
        raise QsdError(f"{name!r} is no bundled ViT teacher; {unknown_name_hint(name)}")
    p = Path(path) if path is not None else entry.require()
    if not p.exists():
        raise QsdError(f"ViT teacher weights missing: {p} (train them with `{entry.trained_by}`)")
    sd, _ = read_checkpoint(p)
    return _built_vit(entry, sd, p)


def _built_vit(entry: ZooModel, sd: dict[str, torch.Tensor], path: Path) -> nn.Module:
    model = entry.build()
    load_state_dict_checked(model, sd, source=f"ViT teacher {path}")
    return model.eval()


#: the file names timm looks for in a Hugging Face repository or a local folder
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def _hf_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """The Hugging Face cache as the environment says now (huggingface_hub reads it once, at import)."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def hub_weights(repo_id: str, names: Sequence[str] = HF_WEIGHT_NAMES, cache_dir: str | os.PathLike | None = None
                ) -> tuple[Path | None, Exception | None]:
    """The first of ``names`` in the Hugging Face repository ``repo_id`` (``OWNER/NAME[@REV]``):
    from the local cache only when offline or the Hub cannot be reached (:func:`hub_unavailable`,
    a few seconds at most), else downloaded; ``(None, last error)`` if none."""
    from huggingface_hub import hf_hub_download

    repo, _, rev = repo_id.partition("@")
    offline, err = hub_unavailable() is not None, None
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=rev or None, cache_dir=_hf_cache_dir(cache_dir),
                                        local_files_only=offline)), None
        except Exception as e:  # not cached, no network, no such file
            err = e
    return None, err


def _hub_file(arch: str, source: dict, cache_dir: str | os.PathLike | None) -> Path:
    """The weights file a ``hf_hub_id``/``hf_hub_filename`` source names; a one-line error that
    says what to fetch otherwise."""
    names = [source["hf_hub_filename"]] if source.get("hf_hub_filename") else list(HF_WEIGHT_NAMES)
    path, err = hub_weights(source["hf_hub_id"], names, cache_dir)
    if path is not None:
        return path
    repo = source["hf_hub_id"].partition("@")[0]
    offline = hub_unavailable()
    what = source.get("description") or "the weights"
    why = f"{offline} and not in the local Hugging Face cache" if offline else f"not downloaded ({one_line(err, 120)})"
    name = f"{arch}.{source['tag']}" if source.get("tag") else arch
    raise QsdError(f"{name}: {' or '.join(names)} of hf-hub:{repo} {why}; fetch {what} from "
                   f"https://huggingface.co/{repo} and pass pretrained_cfg_overlay=dict(file=PATH) "
                   f"(or hf_hub_filename=NAME; CLI: qsdcompress eval PATH --arch {arch})")


def _weights_file(arch: str, source: dict, cache_dir: str | os.PathLike | None) -> Path:
    if source.get("file"):
        path = Path(source["file"])
        if path.is_dir():  # a timm ``local-dir:`` folder
            found = [path / n for n in HF_WEIGHT_NAMES if (path / n).exists()]
            if not found:
                raise QsdError(f"{path}: no {' or '.join(HF_WEIGHT_NAMES)} in this folder")
            path = found[0]
        return path
    if source.get("hf_hub_id"):
        return _hub_file(arch, source, cache_dir)
    raise QsdError(f"{arch}: weights at {source.get('url')} are not fetched here; download the file and pass "
                   f"pretrained_cfg_overlay=dict(file=PATH)")


def load_pretrained(arch: str, source: dict, model_args: dict, cache_dir: str | os.PathLike | None = None
                    ) -> nn.Module:
    """``create_model(arch, pretrained=True, ...)`` with a weights source (a local ``file`` or a
    Hugging Face ``hf_hub_id``/``hf_hub_filename``): the file is read exactly as :func:`load` reads
    it, so a reference LSQ checkpoint comes back quantized and a ``.qsd`` file as it was saved."""
    path = _weights_file(arch, source, cache_dir)
    if path.suffix.lower() == ".qsd":
        model = load(path)
        if resolve_name(getattr(model, "arch", arch)) != arch:
            raise QsdError(f"{path} holds a {model.arch} model, not {arch}")
    else:
        model = load(path, arch=arch, **model_args)
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    pcfg.update({k: v for k, v in source.items() if v}, file=str(path))
    model.pretrained_cfg = pcfg  # type: ignore[assignment]
    return model


set_pretrained_loader(load_pretrained)


def model_meta(model: nn.Module) -> dict:
    """The metadata that rebuilds ``model`` (architecture, arguments, quantization)."""
    meta = dict(getattr(model, "qsd_meta", {}) or {})
    meta["arch"] = getattr(model, "arch", meta.get("arch"))
    meta["model_args"] = model.cfg.to_dict() if hasattr(model, "cfg") else meta.get("model_args", {})
    meta.update(getattr(model, "qsd_quant_meta", None) or {})
    return meta


def _packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The state_dict with each quantized weight replaced by its integers, bit-packed (uint8);
    scales, BatchNorm and everything else stay float. Shapes and widths are in the metadata
    that rebuilds the model, so nothing else is stored."""
    sd = dict(model.state_dict())
    packed = False
    for name, m in weight_layers(model):
        if not is_quant_layer(m):
            continue
        bits = quant_bits(m)
        with torch.no_grad():
            ints = m.quant_weight().int().detach().cpu().to(torch.int64)
        key = f"{name}.weight"
        sd[key] = torch.frombuffer(bytearray(pack_ints(ints.numpy(), bits)), dtype=torch.uint8)
        packed = True
    return sd, packed


def _unpacked(sd: dict[str, torch.Tensor], model: nn.Module, meta: dict, path: Path) -> dict[str, torch.Tensor]:
    """Replace the packed weights of ``sd`` (every quantized layer the metadata lists) by zero
    placeholders; return their integers by key."""
    ints = {}
    for name, bits in (meta.get("quant") or {}).get("layers", {}).items():
        key = f"{name}.weight"
        if key not in sd:
            raise QsdError(f"{path}: packed weight {key} is missing")
        shape = model.get_submodule(name).weight.shape
        ints[key] = torch.from_numpy(unpack_ints(sd[key].numpy().tobytes(), shape.numel(), int(bits))).reshape(shape)
        sd[key] = torch.zeros(shape)
    return ints


@torch.no_grad()
def _set_quantized_weights(model: nn.Module, ints: dict[str, torch.Tensor]) -> None:
    """Weights ``ints * step``: the quantizer gives back exactly these integers (and values)."""
    for key, v in ints.items():
        layer = model.get_submodule(key[: -len(".weight")])
        scale = layer.quant_weight().scale.detach()  # from the loaded scale parameter alone
        layer.weight.copy_(v.to(layer.weight.dtype) * scale)


def save(model: nn.Module, path: str | os.PathLike, kind: str | None = None, keep_float: bool = False,
         half: bool = False, **extra: Any) -> Path:
    """Write ``model`` as a ``.qsd`` file (atomic), recording how to rebuild it and provenance.

    Quantized weights are stored as bit-packed integers (the file follows the bits); their float
    latent weights, which only further finetuning needs, are kept with ``keep_float=True``.
    Loading gives the same quantized weights and logits either way. ``half`` stores float32
    tensors as float16 (half the bytes; the loaded model holds their float16 values, so measure
    accuracy on the loaded file).
    """
    meta = model_meta(model)
    meta.pop("packed_weights", None)
    if kind:
        meta["kind"] = kind
    meta["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    meta.update(extra)
    sd, packed = (model.state_dict(), False) if keep_float else _packed_state(model)
    if packed:
        meta["packed_weights"] = True
    if half:
        sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
        meta["stored_dtype"] = "float16"
    return save_qsd(path, sd, meta)


#: the kinds of ``.qsd`` file each command takes from a work directory (None: any)
TAKES: dict[str, tuple[str, ...] | None] = {
    "float": ("float",),          # convert, sensitivity
    "converted": ("converted",),  # finetune
    "any": None,                  # eval, export, report
}


def newest_qsd(workdir: str | os.PathLike, takes: str = "any", data: str | None = None) -> Path | None:
    """The most recently written ``.qsd`` of the work directory of a kind in ``TAKES[takes]``
    whose own data is ``data`` (when given; a file recording no data matches any)."""
    d = Path(workdir)
    kinds = TAKES[takes]
    for path in sorted(d.glob("*.qsd"), key=lambda p: p.stat().st_mtime, reverse=True) if d.is_dir() else []:
        meta = read_header_metadata(path)
        own = metadata_data(meta)
        if (kinds is None or meta.get("kind") in kinds) and (data is None or own is None or same_data(own, data)):
            return path
    return None


def locate_model(model: str | os.PathLike | None, workdir: str | os.PathLike | None = None,
                 data: str | None = None, takes: str = "any") -> Path:
    """The one rule every command resolves its MODEL by:

    1. MODEL itself: a file, or the name of a bundled model (``qsdcompress list``);
    2. else the newest ``.qsd`` in the work directory that the command takes (``takes``: a float
       model for convert and sensitivity, a converted one for finetune, any for eval, export and
       report) and whose own data is ``--data`` when given;
    3. else the default bundled model of ``--data`` (digits when not given); finetune, which needs
       a converted model, says to run convert instead.
    """
    if model is not None:
        return model_file(model)
    found = newest_qsd(workdir, takes, data) if workdir is not None else None
    if found is not None:
        return found
    if takes == "converted":
        where = f" of {data}" if data else ""
        raise QsdError(f"no converted model{where} in {workdir}: run `qsdcompress convert"
                       f"{' --data ' + data if data else ''}` first (or pass MODEL)")
    return default_for(data or "digits").require()


def resolve_model(model: nn.Module | str | os.PathLike | None, arch: str | None = None,
                  data: str | None = None, workdir: str | os.PathLike | None = None,
                  takes: str = "any") -> nn.Module:
    """A model given as a module, else loaded from what :func:`locate_model` finds."""
    return resolve_source(model, workdir, data, takes, arch)[0]


def resolve_source(model: nn.Module | str | os.PathLike | None, workdir: str | os.PathLike | None = None,
                   data: str | None = None, takes: str = "any", arch: str | None = None
                   ) -> tuple[nn.Module, str]:
    """The model and where it came from (a module as given, else :func:`locate_model`'s file)."""
    if isinstance(model, nn.Module):
        return model, getattr(model, "arch", "model")
    if model is None and arch is not None:
        resolve_name(arch)  # an unknown name fails here with suggestions
        raise QsdError(f"--arch {arch} needs the weights: pass --checkpoint PATH (or MODEL)")
    path = locate_model(model, workdir, data, takes)
    return load(path, arch=arch), str(model if model is not None and not Path(model).exists() else path)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present; ``cuda`` means this rank's GPU)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QsdError(f"--device {device}: CUDA is not available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QsdError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


__all__ = ["load", "save", "model_meta", "bundled_model", "bundled_vit", "guess_arch", "build_from_meta", "resolve_model",
           "resolve_source", "newest_qsd", "locate_model", "model_file", "TAKES", "pick_device", "has_reference_lsq", "load_pretrained"]
