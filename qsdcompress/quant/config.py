"""What ``convert`` does, as a small serialisable config (torchao style: the config says *what*,
calibration data is passed separately)."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping

from ..errors import QsdError

SCALE_INITS = ("mse", "lsq", "absmax")
IE_LIF_MODES = ("qkv", "attention", "all", "none")
IE_LIF_INITS = ("identity", "rectify")
FLOAT_BITS = 32
REFERENCE_LSQ_BITS = 4  # reference QSD-Transformer: Qn = -8, Qp = 7
REESTIMATE_BN_BITS = 4  # auto BatchNorm re-estimation below this width and at it (measured, docs/method.md §3)


def parse_bits(value: Any, what: str = "--bits") -> int:
    """A weight bit width in 1..8, or a one-line error naming the option."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        bits = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise QsdError(f"{what}: bit width must be an integer from 1 to 8, got {value!r}") from None
    if not 1 <= bits <= 8:
        raise QsdError(f"{what}: bit width must be from 1 to 8, got {bits}")
    return bits


def parse_layer_bits(items: Iterable[str]) -> dict[str, int]:
    """``['GLOB=BITS', ...]`` (CLI ``--layer-bits``) -> ordered ``{glob: bits}``."""
    out: dict[str, int] = {}
    for item in items:
        glob, sep, bits = str(item).rpartition("=")
        if not sep or not glob.strip():
            raise QsdError(f"--layer-bits {item!r}: expected GLOB=BITS, e.g. 'block3.*.attn.*=2'")
        out[glob.strip()] = parse_bits(bits, f"--layer-bits {item!r}")
    return out


@dataclass
class QuantConfig:
    """What ``convert`` does; serialised to JSON in every converted ``.qsd`` file.

    Bit width of a layer: ``skip`` globs keep it float, else the last matching ``layer_bits``
    glob, else ``first_last_bits`` for the first and last quantizable layers (stem conv and
    head), else ``bits``. Globs match module names (``fnmatch``), e.g. ``block3.*.attn.*``.
    """

    bits: int = 4
    layer_bits: dict[str, int] = field(default_factory=dict)
    first_last_bits: int | None = None
    skip: list[str] = field(default_factory=list)
    scale_init: str = "mse"
    ie_lif: str = "qkv"
    ie_lif_init: str = "identity"
    ie_lif_momentum: float = 0.1
    ie_lif_eps: float = 1e-5
    # calibration images (a data spec); None: the data the model records as its own, else none
    # (weight-only, float statistics kept: docs/method.md §3)
    calib_data: str | None = None
    calib_samples: int | None = None    # calibration images; None: calib_batches x calib_batch_size (256)
    calib_batches: int = 8
    calib_batch_size: int = 32
    # recompute BatchNorm statistics on the calibration images after quantizing; None (auto): when
    # some layer has REESTIMATE_BN_BITS bits or fewer (docs/method.md §3)
    reestimate_bn: bool | None = None
    mse_grid: int = 16          # coarse candidates of the mse search (then as many refined ones)

    def validate(self) -> "QuantConfig":
        self.bits = parse_bits(self.bits)
        self.layer_bits = {str(k): parse_bits(v, f"--layer-bits {k}") for k, v in dict(self.layer_bits).items()}
        if self.first_last_bits is not None:
            self.first_last_bits = parse_bits(self.first_last_bits, "--first-last-bits")
        self.skip = [str(s) for s in self.skip]
        for name, value, allowed in (("--scale-init", self.scale_init, SCALE_INITS),
                                     ("--ie-lif", self.ie_lif, IE_LIF_MODES),
                                     ("--ie-lif-init", self.ie_lif_init, IE_LIF_INITS)):
            if value not in allowed:
                raise QsdError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.calib_batches < 0:
            raise QsdError(f"--calib-batches must be >= 0, got {self.calib_batches}")
        if self.calib_samples is not None and self.calib_samples < 0:
            raise QsdError(f"--calib-samples must be >= 0, got {self.calib_samples}")
        if self.calib_batch_size < 1:
            raise QsdError(f"calibration batch size must be >= 1, got {self.calib_batch_size}")
        if self.mse_grid < 2:
            raise QsdError(f"mse_grid must be >= 2, got {self.mse_grid}")
        return self

    @property
    def num_calib_samples(self) -> int:
        """Calibration images: ``calib_samples``, else ``calib_batches x calib_batch_size``."""
        return self.calib_samples if self.calib_samples is not None else self.calib_batches * self.calib_batch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QsdError(f"unknown quantization option(s) {', '.join(unknown)}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items()})



__all__ = ["QuantConfig", "parse_bits", "parse_layer_bits", "SCALE_INITS", "IE_LIF_MODES", "IE_LIF_INITS",
           "FLOAT_BITS", "REFERENCE_LSQ_BITS", "REESTIMATE_BN_BITS"]
