"""``Quantize``: integer weights that are really smaller and run integer kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.describe import shape_of
from ..core.report import Report
from ..core.select import normalize_selector
from ..core.transform import Context, Transform
from ..core.validate import check_choice
from ..modules.quantized import Int8Conv2d, Int8Linear

__all__ = ["Quantize"]

SCHEMES = ("int8",)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@dataclass(frozen=True)
class Quantize(Transform):
    """Replace Linear and Conv2d layers with integer-weight modules.

    Args:
        scheme: ``"int8"`` (weight-only, per-output-channel). With ``select`` as a mapping,
            the values are per-layer schemes.
        select: layers to quantize (default: every Linear and Conv2d).
        exclude: layers to keep in float.

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = nnslim.Quantize(scheme="int8").apply(model)
        >>> type(model[0]).__name__
        'Int8Linear'
    """

    scheme: str = "int8"
    select: Any = None
    exclude: Any = None

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        check_choice("Quantize", "scheme", self.scheme, SCHEMES)
        sel = normalize_selector(self.select)
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    check_choice("Quantize", f"select[{key!r}]", v, SCHEMES)
        normalize_selector(self.exclude, "exclude")

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        eligible = [
            (p, m) for p, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and p
        ]
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p, _ in eligible:
            if p not in chosen:
                report.skipped(p, "not selected")
        for p, m in model.named_modules():
            if p and not isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(m, nn.Embedding):
                report.skipped(p, "embeddings stay in float")
        new: dict[str, nn.Module] = {}
        for path in chosen:
            m = model.get_submodule(path)
            w = m.weight
            if not torch.isfinite(w).all():
                raise ValueError(
                    f"Quantize: module {path} ({shape_of(m)}) has NaN or Inf weights; fix or "
                    f"exclude it (exclude=[{path!r}])."
                )
            q = Int8Linear.from_float(m) if isinstance(m, nn.Linear) else Int8Conv2d.from_float(m)
            new[path] = q
        for path, q in new.items():
            old = model.get_submodule(path)
            _set_module(model, path, q)
            report.changed(
                path, "quantized", shape_of(old), shape_of(q), bits=8, scheme=self.scheme
            )
