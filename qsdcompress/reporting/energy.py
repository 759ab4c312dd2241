"""The energy model: picojoules per operation, replaceable by the user (docs/method.md §8)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import QsdError, one_line

ENERGY_SOURCE = ("45 nm CMOS (Horowitz, ISSCC 2014) as used by the spike-driven Transformer papers: "
                 "32-bit float MAC 4.6 pJ, AC 0.9 pJ; low-bit AC scaled linearly with the weight bits "
                 "(QSD-Transformer convention)")


@dataclass
class EnergyTable:
    """Energy per operation in picojoules; replace with ``--energy-table FILE`` (JSON or YAML)."""

    e_mac_pj: float = 4.6
    e_ac32_pj: float = 0.9
    attention_bits: int = 32
    source: str = ENERGY_SOURCE

    def e_ac(self, bits: int) -> float:
        return self.e_ac32_pj * min(bits, 32) / 32.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["E_AC_pJ_by_bits"] = {b: round(self.e_ac(b), 6) for b in (1, 2, 4, 8, 32)}
        return d

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "EnergyTable":
        p = Path(path)
        if not p.is_file():
            raise QsdError(f"energy table not found: {p}")
        text = p.read_text()
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise QsdError(f"cannot parse energy table {p}: {one_line(e)}") from None
        if not isinstance(data, dict):
            raise QsdError(f"energy table {p} must be a mapping like {{\"e_mac_pj\": 4.6, \"e_ac32_pj\": 0.9}}")
        known = {"e_mac_pj", "e_ac32_pj", "attention_bits", "source"}
        unknown = sorted(set(data) - known - {"E_AC_pJ_by_bits"})
        if unknown:
            raise QsdError(f"energy table {p}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        kw = {k: data[k] for k in known if k in data}
        kw.setdefault("source", f"user table {p}")
        try:
            t = cls(**kw)
            t.e_mac_pj, t.e_ac32_pj, t.attention_bits = float(t.e_mac_pj), float(t.e_ac32_pj), int(t.attention_bits)
        except (TypeError, ValueError) as e:
            raise QsdError(f"energy table {p}: {e}") from None
        if t.e_mac_pj < 0 or t.e_ac32_pj < 0:
            raise QsdError(f"energy table {p}: energies must be non-negative")
        return t



__all__ = ["EnergyTable", "ENERGY_SOURCE"]
