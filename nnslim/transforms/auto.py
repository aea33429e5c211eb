"""``Auto``: choose each layer's setting to meet a size budget with the least estimated loss.

The loop the library starts from, for weight bytes: every eligible Linear layer gets a list of
candidates (kept in float, int8, int4 with groups of 128, 64 or 32 inputs), each with its exact
cost in bytes and an estimate of what it costs the model's loss; a multiple-choice knapsack
(dynamic programming over the budget in 4096 steps, then the rounding's leftover filled
greedily) picks one candidate per layer so that the model fits the budget with the least total
estimate; the choice is
applied as one :class:`~nnslim.Quantize` per setting, in one atomic step.

The loss estimate of a candidate is the second-order change of the calibration loss when that
layer alone takes its rounding error ``dW``, with the K-FAC approximation of the Fisher
(Martens & Grosse 2015, the output factor's diagonal): with ``L`` the mean of ``B`` batch
losses, ``dL ~= 1/2 sum_o (S_o / B^2) * dW_o (X^T X) dW_o^T``, where ``S_o`` is the squared
gradient of the batch loss with respect to output ``o`` of the layer summed over rows and
batches, and ``X^T X`` the Gram matrix of its inputs summed the same way. One forward and backward pass over the calibration batches gives
every layer's statistics; each candidate then costs one rounding and one product. Why this
estimate: it weighs a layer's output error by how much the loss reacts to that output (a
plain output error treats a layer feeding the LM head like one feeding a residual that
normalises it away), it needs no forward pass per candidate (one per layer and candidate would
be hundreds of passes on an LLM), and the errors of different layers add up (the knapsack
needs that). It rounds to nearest for the estimate: GPTQ (``method="gptq"``) then applies the
chosen settings with less error than estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, final

import torch
import torch.nn.functional as F
from torch import nn

from ..base.modules import is_linear, linear_weight, unreplaceable
from ..base.validate import check_choice
from ..core.calibrate import collect
from ..core.report import Report
from ..core.target import Target
from ..core.transform import Compose, Context, Transform
from ..modules.quantized import (
    int4_group_size,
    padded_width,
    quantize_groupwise,
    quantize_per_channel,
)
from .quantize import METHODS, Quantize, _lm_heads

__all__ = ["CANDIDATES", "Auto"]

#: the built-in candidates: scheme and int4 group size
CANDIDATES: dict[str, tuple[str, int]] = {
    "int8": ("int8", 0),
    "int4-g128": ("int4", 128),
    "int4-g64": ("int4", 64),
    "int4-g32": ("int4", 32),
}


@final
@dataclass(frozen=True)
class Auto(Transform):
    """Mixed precision under a budget: each Linear layer kept in float, int8 or int4
    (group 128/64/32), chosen to meet ``target`` with the least estimated loss (see the
    module docstring for the estimate and the allocation). Needs calibration batches.

    Args:
        target: ``{"bytes": f}``: the whole model's parameter bytes at most ``f`` of today's.
        candidates: the settings layers may take besides staying as they are (names in
            :data:`CANDIDATES`).
        method: how the chosen settings are applied: ``"rtn"`` or ``"gptq"``.
        zero_point: int4's offsets (see :class:`~nnslim.Quantize`).
        select: layers the search may change (default: every Linear but the LM head).
        exclude: layers it leaves alone.

    The report notes the plan (layers per setting, predicted bytes and loss); each layer's
    change records its setting.

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
        >>> batches = [torch.randn(32, 64) for _ in range(2)]
        >>> report = nnslim.Auto(target={"bytes": 0.3}).apply(model, calibration=batches)
        >>> round(report.after.param_bytes / report.before.param_bytes, 2) <= 0.3
        True
    """

    target: Any = None
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    method: str = "rtn"
    zero_point: str = "float"
    select: Any = None
    exclude: Any = None

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        targets = Target.parse("Auto", self.target)
        if len(targets) != 1 or targets[0].metric != "param_bytes":
            raise ValueError(
                "Auto(target=...): give the budget as {'bytes': fraction} (the whole model's "
                "parameter bytes as a fraction of today's); MACs and latency budgets are not "
                "searched yet."
            )
        if isinstance(self.candidates, list):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise ValueError("Auto(candidates=...): give at least one setting.")
        for c in self.candidates:
            check_choice("Auto", "candidates", c, tuple(CANDIDATES))
        check_choice("Auto", "method", self.method, METHODS)
        Quantize(zero_point=self.zero_point)  # validates it

    @property
    def _fraction(self) -> float:
        return Target.parse("Auto", self.target)[0].fraction

    # ------------------------------------------------------------------------------------------
    def _run(
        self, model: nn.Module, ctx: Context, report: Report, state: dict[str, Any]
    ) -> list[Any]:
        plan = self.plan(model, ctx, report)
        parts = []
        for name in self.candidates:
            paths = [p for p, c in plan.items() if c == name]
            if not paths:
                continue
            scheme, gs = CANDIDATES[name]
            parts.append(
                Quantize(
                    scheme=scheme,  # type: ignore[arg-type]
                    group_size=gs or 128,
                    method=self.method,  # type: ignore[arg-type]
                    zero_point=self.zero_point,  # type: ignore[arg-type]
                    select=paths,
                )
            )
        if not parts:
            report.note("Auto: every layer stays as it is within the budget")
            return []
        return Compose(parts)._run(model, ctx, report, state)

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        self._run(model, ctx, report, {})

    def plan(self, model: nn.Module, ctx: Context, report: Report) -> dict[str, str]:
        """``{layer path: candidate name}`` for the layers that change (the rest stay)."""
        from ..profiling.profiler import profile

        batches = ctx.require_calibration("Auto", "to measure each layer's sensitivity")
        layers = self._layers(model, ctx, report)
        if not layers:
            raise ValueError("Auto: no Linear layer to choose a setting for after select/exclude.")
        stats = collect(model, batches, layers, gram=True, out_grads=True)
        options: dict[str, list[tuple[str, float, float]]] = {}
        for p, m in layers.items():
            st = stats[p]
            w = linear_weight(m).detach().float()
            keep_bytes = float(w.numel() * linear_weight(m).element_size())
            fisher = st.extra.get("out_grad_sq")
            if st.gram is None or fisher is None or st.rows == 0:
                raise ValueError(
                    f"Auto: module {p} saw no calibration input (or no gradient reached it); "
                    f"it is not on the path of the calibration batches: exclude it."
                )
            # the loss is a mean over each batch's rows: summed squared output gradients
            # over B batches, / B^2, weight the summed input Gram (see _kfac_loss)
            f = fisher / len(batches) ** 2
            opts = [("keep", keep_bytes, 0.0)]
            seen: set[tuple[str, int]] = set()
            for name in self.candidates:
                scheme, gs = CANDIDATES[name]
                if scheme == "int4":  # the size Quantize gives this width (it may pick less)
                    gs = int4_group_size(w.shape[1], gs)
                if (scheme, gs) in seen:
                    continue
                seen.add((scheme, gs))
                dq = _rounded(w, scheme, gs, self.zero_point)
                d = dq - w
                loss = 0.5 * float(((d @ st.gram) * d).sum(1) @ f)
                opts.append((name, _bytes(w, scheme, gs, self.zero_point), loss))
            options[p] = opts
            st.gram = None
        inputs = ctx.inputs if ctx.inputs is not None else batches[0]
        total = float(profile(model, inputs, memory=False).param_bytes)
        budget = self._fraction * total
        fixed = total - sum(o[0][1] for o in options.values())
        smallest = fixed + sum(min(b for _, b, _ in o) for o in options.values())
        if smallest > budget * (1 + 1e-9):
            raise ValueError(
                f"Auto(target={self.target!r}): the smallest reachable is "
                f"{smallest / total:.3f} of the model's bytes (every chosen layer at its "
                f"smallest setting, the rest as it is); ask for at least that, or add smaller "
                f"candidates."
            )
        choice = _allocate(options, budget - fixed)
        predicted = fixed + sum(options[p][i][1] for p, i in choice.items())
        loss = sum(options[p][i][2] for p, i in choice.items())
        plan = {p: options[p][i][0] for p, i in choice.items() if options[p][i][0] != "keep"}
        counts: dict[str, int] = {}
        for p, i in choice.items():
            counts[options[p][i][0]] = counts.get(options[p][i][0], 0) + 1
        report.note(
            f"Auto: {', '.join(f'{n} {k}' for k, n in counts.items())} of {len(choice)} layers; "
            f"predicted {predicted / total:.4f} of the bytes (budget {self._fraction:g}), "
            f"estimated loss increase {loss:.4g} (K-FAC second order, round to nearest)"
        )
        return plan

    def _layers(self, model: nn.Module, ctx: Context, report: Report) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        left = unreplaceable(model)
        eligible = [(p, m) for p, m in named.items() if p and p not in left and is_linear(m)]
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        heads = _lm_heads(model, ctx)
        for p in list(chosen):
            if p in heads and not (isinstance(self.select, (list, tuple)) and p in self.select):
                del chosen[p]
                report.skipped(p, "LM head stays in float (select it by name to include it)")
        return {p: named[p] for p in chosen}


def _rounded(w: torch.Tensor, scheme: str, gs: int, zero_point: str) -> torch.Tensor:
    """``w`` rounded to nearest on the candidate's grid, as the layer would hold it."""
    if scheme == "int8":
        q, s = quantize_per_channel(w)
        return q.float() * s[:, None]
    out, inp = w.shape
    width = padded_width(inp, gs)
    q, scale, mn = quantize_groupwise(F.pad(w, (0, width - inp)), gs, zero_point=zero_point)
    dq = q.reshape(out, -1, gs) * scale[..., None] + mn[..., None]
    return dq.reshape(out, width)[:, :inp]


def _bytes(w: torch.Tensor, scheme: str, gs: int, zero_point: str) -> float:
    """The bytes the replaced layer's weight takes (its codes, scales and minima)."""
    out, inp = w.shape
    if scheme == "int8":
        return float(out * inp + 4 * out)
    groups = padded_width(inp, gs) // gs
    mins = 4 if zero_point == "integer" else 2
    return float(out * groups * gs // 2 + out * groups * (2 + mins))


def _allocate(
    options: dict[str, list[tuple[str, float, float]]], budget: float, buckets: int = 4096
) -> dict[str, int]:
    """One option index per layer with the least total loss whose bytes fit ``budget``: the
    multiple-choice knapsack solved by dynamic programming over the budget cut into
    ``buckets``, twice (each option's bytes rounded up, which always fits, and rounded to
    the nearest, then corrected with greedy downgrades where the exact bytes overshoot); each
    then spends what the rounding left on the upgrades that remove the most loss per byte, and
    the better plan is kept."""
    plans = []
    for rounding in ("up", "nearest"):
        plan = _knapsack(options, budget, buckets, rounding)
        if plan is not None:
            plans.append(_fit(options, budget, plan))
    plans = [p for p in plans if p is not None]
    if not plans:
        raise ValueError("Auto: no combination of the candidates fits the budget.")
    return min(plans, key=lambda c: sum(options[p][i][2] for p, i in c.items()))


def _knapsack(
    options: dict[str, list[tuple[str, float, float]]],
    budget: float,
    buckets: int,
    rounding: str,
) -> dict[str, int] | None:
    import math

    import numpy as np

    unit = budget / buckets if budget > 0 else 1.0

    def steps(size: float) -> int:
        return math.ceil(size / unit - 1e-9) if rounding == "up" else round(size / unit)

    paths = list(options)
    best = np.full(buckets + 1, np.inf)
    best[0] = 0.0
    picks = []
    for p in paths:
        new = np.full(buckets + 1, np.inf)
        arg = np.full(buckets + 1, -1, dtype=np.int64)
        for j, (_, size, loss) in enumerate(options[p]):
            k = steps(size)
            if k > buckets:
                continue
            cand = np.full(buckets + 1, np.inf)
            cand[k:] = best[: buckets + 1 - k] + loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
        picks.append(arg)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    choice: dict[str, int] = {}
    for p, arg in zip(reversed(paths), reversed(picks), strict=True):
        j = int(arg[end])
        choice[p] = j
        end -= steps(options[p][j][1])
    return choice


def _fit(
    options: dict[str, list[tuple[str, float, float]]], budget: float, choice: dict[str, int]
) -> dict[str, int] | None:
    """``choice`` made to fit the exact budget (downgrades costing the least loss per byte
    saved) and then to use what is left (upgrades removing the most loss per byte)."""
    choice = dict(choice)
    left = budget - sum(options[p][i][1] for p, i in choice.items())
    while left < 0:
        found = None
        for p, i in choice.items():
            for j, (_, b, loss) in enumerate(options[p]):
                saved = options[p][i][1] - b
                if saved > 0:
                    rate = (loss - options[p][i][2]) / saved
                    if found is None or rate < found[0]:
                        found = (rate, p, j, saved)
        if found is None:
            return None
        _, p, j, saved = found
        choice[p] = j
        left += saved
    while True:
        found = None
        for p, i in choice.items():
            for j, (_, b, loss) in enumerate(options[p]):
                extra = b - options[p][i][1]
                gain = options[p][i][2] - loss
                if gain > 0 and extra <= left:
                    rate = gain / max(extra, 1e-12)
                    if found is None or rate > found[0]:
                        found = (rate, p, j, extra)
        if found is None:
            return choice
        _, p, j, extra = found
        choice[p] = j
        left -= extra
