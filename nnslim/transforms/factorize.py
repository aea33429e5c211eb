"""``Factorize``: low-rank layers that cut parameters and FLOPs, with ranks chosen from data."""

from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, final, get_args

import torch
from torch import nn

from ..base.blocks import block_of
from ..base.describe import shape_of
from ..base.inputs import Inputs
from ..base.modules import (
    copy_model,
    is_conv2d,
    is_linear,
    linear_weight,
    replace_module,
    unreplaceable,
)
from ..base.snapshot import preserved_state
from ..base.validate import all_finite, check_choice, check_fraction, check_int, check_type
from ..core.calibrate import LayerStats, batch_count, run_sequential, token_rows
from ..core.report import Report
from ..core.select import normalize_selector, per_layer_values
from ..core.target import Target
from ..core.transform import Context, Transform
from ..modules.factorized import FactorizedConv2d, FactorizedLinear
from .refit import FOLDS, conv_patches, cross_validated, say_left

__all__ = ["Factorize", "spatial_svd", "svd_factors", "tucker2"]

ConvKind = Literal["tucker", "spatial"]
CONV_KINDS: tuple[str, ...] = get_args(ConvKind)


def _weight(m: nn.Module) -> torch.Tensor:
    """``(out, in)`` weight of a Linear/Conv1D."""
    return linear_weight(m).detach().float()


def _dense_equivalent(m: nn.Module) -> tuple[nn.Module, tuple[int, ...]]:
    """A plain Linear/Conv2d computing what a factorized layer computes, and the layer's ranks.

    The chains hold no bias before their last layer and their 1x1 / k x 1 / 1 x k parts pad
    like the whole kernel would, so the product of the factors is the layer, exactly.
    """
    last = _factors(m)[-1]
    kw = {"device": last.weight.device, "dtype": last.weight.dtype}
    if isinstance(m, FactorizedLinear):
        dense: nn.Module = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
        ranks: tuple[int, ...] = (m.rank,)
    else:
        dense = nn.Conv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            **kw,
        )
        ranks = m.ranks
    with torch.no_grad():
        dense.weight.copy_(m.weight)
        if m.bias is not None:
            dense.bias.copy_(m.bias)
    return dense, ranks


def _factorized(m: nn.Module) -> bool:
    return isinstance(m, (FactorizedLinear, FactorizedConv2d))


def _factors(m: nn.Module) -> list[nn.Module]:
    """A factorized layer's factors, in order (the first one sees the layer's input)."""
    return [m.first, m.second] if isinstance(m, FactorizedLinear) else list(m.layers)


@final
@dataclass(frozen=True)
class Factorize(Transform):
    """Replace big matrices and convolutions with products of thinner ones.

    ``nn.Linear`` (and Hugging Face ``Conv1D``) becomes two Linear layers through a truncated
    SVD; ``nn.Conv2d`` a Tucker-2 chain (1x1, k x k core, 1x1) or, with ``conv="spatial"``, a
    ``k x 1`` then ``1 x k`` pair. With calibration data, Linear layers are factorized
    activation-aware (SVD-LLM): the weight is whitened with the Cholesky factor of the layer's
    input statistics before the SVD, so truncation minimises the output error, not the weight
    error. Layers are processed block by block, each seeing the already factorized ones.

    Exactly one way to choose ranks:

    Args:
        rank: a fixed rank for every selected layer (or per layer via ``select={name: rank}``).
        ratio: fraction of each layer's parameters kept, in ``(0, 1]``.
        energy: keep the smallest rank whose singular values hold this fraction of the squared
            total, in ``(0, 1]``.
        params: global budget: parameters of the whole model, as a fraction of the original;
            rank goes where the singular values say it matters most per parameter.
        macs: global budget in MACs (needs example inputs), like ``params``.
        conv: ``"tucker"`` or ``"spatial"`` for Conv2d layers.
        activation_aware: whiten with calibration statistics (default: whenever calibration
            data is given).
        refit: activation-aware only: after truncation, refit each layer's second factor in
            closed form (least squares) so that, on the inputs it now gets from the layers
            already factorized, it reproduces the original model's output for the same
            tokens (SVD-LLM's second stage, as an exact solve: an unfactorized copy of each
            block runs beside it). Inside a block, layer group after layer group in the order
            the block runs them (each fit on what the refit groups before it give).
        select: layers to factorize (default every Linear/Conv1D/Conv2d); a mapping gives
            per-layer ranks.
        exclude: layers to leave alone.

    A layer whose factorized form would cost as many FLOPs as the original (rank at or above
    ``m*n/(m+n)`` for a Linear) is skipped and listed in the report.

    A layer already factorized is truncated again as a whole (its product, to a lower rank):
    ``ratio`` is then a fraction of the parameters it holds now, and the global budget counts
    its current cost. Asking for its rank or more leaves it as it is, listed.

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> report = nnslim.Factorize(rank=8, select=["0"]).apply(model, torch.randn(2, 64))
        >>> model[0]
        FactorizedLinear(
          in_features=64, out_features=64, rank=8
          (first): Linear(in_features=64, out_features=8, bias=False)
          (second): Linear(in_features=8, out_features=64, bias=True)
        )
    """

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    params: float | None = None
    macs: float | None = None
    conv: ConvKind = "tucker"
    activation_aware: bool | None = None
    refit: bool = False
    select: Any = None
    exclude: Any = None

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        given = [
            n for n in ("rank", "ratio", "energy", "params", "macs") if getattr(self, n) is not None
        ]
        sel = normalize_selector(self.select)
        per_module = sel is not None and all(v is not None for _, v in sel)
        if len(given) > 1 or (not given and not per_module):
            raise ValueError(
                f"Factorize: give exactly one of rank=, ratio=, energy=, params=, macs= (got "
                f"{given or 'none'}), or per-layer ranks as select={{name: rank}}."
            )
        if self.rank is not None:
            check_int(
                "Factorize", "rank", self.rank, low=1, hint="A rank of 0 would remove the layer."
            )
        for name in ("ratio", "energy"):
            v = getattr(self, name)
            if v is not None:
                check_fraction("Factorize", name, v, low_inclusive=False, high_inclusive=True)
        Target.of("Factorize", params=self.params, macs=self.macs)
        check_choice("Factorize", "conv", self.conv, CONV_KINDS)
        if self.activation_aware is not None:
            check_type("Factorize", "activation_aware", self.activation_aware, bool)
        check_type("Factorize", "refit", self.refit, bool)
        if self.refit and self.activation_aware is False:
            raise ValueError(
                "Factorize(refit=True) fits on calibration activations; do not also give "
                "activation_aware=False."
            )
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    check_int("Factorize", f"select[{key!r}]", v, low=1)
        normalize_selector(self.exclude, "exclude")

    # ------------------------------------------------------------------------------------------
    # -- the compress loop ----------------------------------------------------------------------
    def split(self, steps: int) -> list[Transform]:
        """``ratio``/``params``/``macs`` keep ``x^(1/steps)`` per step (each step truncates the
        layers already factorized to a lower rank); a fixed rank or energy is one step."""
        if steps > 1 and not per_layer_values(self.select):
            if self.ratio is not None:
                return [replace(self, ratio=self.ratio ** (1 / steps))] * steps
            target = self._target
            if target is not None:
                return [replace(self, **target.per_step(steps).as_field())] * steps
        return [self]

    def gentler(self) -> Factorize | None:
        """Keep halfway to everything (twice a fixed rank)."""
        for name in ("ratio", "energy"):
            value = getattr(self, name)
            if isinstance(value, float):
                return replace(self, **{name: (1 + value) / 2})
        target = self._target
        if target is not None:
            return replace(self, **target.gentler().as_field())
        if isinstance(self.rank, int):
            return replace(self, rank=2 * self.rank)
        return None

    @property
    def _target(self) -> Target | None:
        return Target.of("Factorize", params=self.params, macs=self.macs)

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        named = dict(model.named_modules())
        # factorized layers are candidates as whole layers (their product is truncated to a
        # lower rank: how compress() factorizes in steps); their inner layers are not
        owners = [p for p, m in named.items() if _factorized(m)]
        left = unreplaceable(model)
        for p, why in left.items():
            report.skipped(p, why)
        eligible = [
            (p, m)
            for p, m in named.items()
            if p
            and p not in left
            and not any(p.startswith(o + ".") for o in owners)
            and (is_linear(m) or is_conv2d(m) or _factorized(m))
        ]
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p, _ in eligible:
            if p not in chosen:
                report.skipped(p, "not selected" if self.select is not None else "excluded")
        # dense stand-ins of the chosen factorized layers, and their current ranks
        dense: dict[str, nn.Module] = {}
        now: dict[str, tuple[int, ...]] = {}
        for p in list(chosen):
            m = named[p]
            if isinstance(m, FactorizedConv2d) and m.kind != self._kind(m):
                del chosen[p]
                report.skipped(
                    p, f"factorized as {m.kind!r}; Factorize(conv={self.conv!r}) leaves it so"
                )
                continue
            if _factorized(m):
                if any(type(f) not in (nn.Linear, nn.Conv2d) for f in _factors(m)):
                    del chosen[p]
                    report.skipped(
                        p, "factorized, and its factors are no longer plain Linear/Conv2d layers"
                    )
                    continue
                dense[p], now[p] = _dense_equivalent(m)
                m = dense[p]
            if is_conv2d(m) and m.groups != 1:
                del chosen[p]
                report.skipped(p, f"grouped convolution (groups={m.groups}) is already factorized")
            elif not all_finite(m.weight):
                raise ValueError(f"Factorize: module {p} ({shape_of(m)}) has NaN or Inf weights.")
        if not chosen:
            raise ValueError("Factorize: no layer left to factorize after select/exclude.")
        aware = (
            self.activation_aware if self.activation_aware is not None else bool(ctx.calibration)
        )
        if aware and not ctx.calibration:
            ctx.require_calibration(
                "Factorize(activation_aware=True)", "to whiten the layer inputs"
            )
        layer = {p: dense.get(p, named[p]) for p in chosen}
        spatial = _spatial_sizes(model, ctx.inputs, [p for p in chosen if is_conv2d(layer[p])])
        linears = {p: layer[p] for p in chosen if is_linear(layer[p])}
        convs = {p: layer[p] for p in chosen if is_conv2d(layer[p])}
        ranks: dict[str, Any] = {p: chosen[p] for p in chosen}
        target = self._target
        if target is not None:
            ranks = self._budget(model, ctx, target, linears, convs, spatial, aware, report, now)
        # with refit, convolutions are factorized block by block on calibration data too
        # (their last factor refit); otherwise from their weights alone, here
        unfit = {p: _not_refittable(c, self._kind(c)) for p, c in convs.items()}
        fitted = {p: c for p, c in convs.items() if aware and self.refit and unfit[p] is None}
        # the refit's reference: an unfactorized copy of each block as it runs, or, where a
        # refit layer sits outside every repeated block (a CNN's stages, a classifier), a copy
        # of the whole model taken now, before any layer changes
        reference: bool | nn.Module = self.refit
        outside = [p for p in [*linears, *fitted] if block_of(p, named) is None]
        if self.refit and aware and outside:
            reference = copy_model(model)
            report.note(
                f"Factorize(refit=True): {len(outside)} layer(s) outside the repeated blocks "
                f"({', '.join(outside[:4])}{' ...' if len(outside) > 4 else ''}) are refit against "
                f"a copy of the whole unfactorized model, held while it runs; exclude them to "
                f"hold one block's copy at a time"
            )
        if aware and self.refit and len(fitted) < len(convs):
            say_left(
                report,
                "Factorize(refit=True): convolutions factorized from their weights alone, "
                "without the refit",
                {p: why for p, why in unfit.items() if why is not None},
            )
        for p, conv in convs.items():
            if p not in fitted:
                self._factorize_conv(
                    model, report, p, conv, ranks.get(p), spatial.get(p), now.get(p), named[p]
                )
        if not linears and not fitted:
            return
        if aware:

            def process(paths: list[str], stats: dict[str, LayerStats]) -> None:
                for p in paths:
                    if p in fitted:
                        self._factorize_conv(
                            model,
                            report,
                            p,
                            fitted[p],
                            ranks.get(p),
                            spatial.get(p),
                            now.get(p),
                            named[p],
                            stats[p],
                        )
                        continue
                    self._factorize_linear(
                        model,
                        report,
                        p,
                        linears[p],
                        ranks.get(p),
                        stats[p].gram,
                        now.get(p),
                        named[p],
                        stats[p].extra.get("cross"),
                        stats[p].extra.get("ref_gram"),
                        stats[p].extra.get("folds"),
                    )

            with contextlib.ExitStack() as stack:
                if isinstance(reference, nn.Module):  # in eval mode, as the model runs
                    stack.enter_context(preserved_state(reference))
                run_sequential(
                    model,
                    ctx.calibration,
                    {p: named[p] for p in [*linears, *fitted]},
                    process,
                    gram=True,
                    reference=reference,
                    rows_of=_stat_rows,
                    # refit layer group by layer group in the order the block runs them (q/k/v,
                    # then o, then gate/up, then down): each group fit on the inputs the groups
                    # before it give once refit, not on those they gave before any changed
                    true_sequential=bool(self.refit),
                    # the refit's strength chosen on held-out batches, as Prune's refit does
                    folds=FOLDS if self.refit and batch_count(len(ctx.calibration)) >= FOLDS else 0,
                )
        else:
            for p, m in linears.items():
                self._factorize_linear(
                    model, report, p, m, ranks.get(p), None, now.get(p), named[p]
                )

    # -- rank choice ----------------------------------------------------------------------------
    def _named(self) -> set[str]:
        """Layers ``select`` names explicitly (a rank they cannot take is an error for them)."""
        sel = normalize_selector(self.select)
        if sel is None:
            return set()
        return {k for k, _ in sel if isinstance(k, str) and not k.startswith("re:")}

    def _rank_for(self, p: str, sv: torch.Tensor, m: int, n: int, fixed: Any) -> int:
        """The rank for a layer: ``fixed`` is a per-layer int rank, or a float fraction of
        parameters kept (from the global budget)."""
        full = min(m, n)
        if isinstance(fixed, int):
            r = fixed
        elif isinstance(fixed, float):
            r = max(1, int(fixed * m * n / (m + n) + 1e-6))
        elif self.rank is not None:
            r = self.rank
        elif self.ratio is not None:
            r = max(1, int(self.ratio * m * n / (m + n)))
        elif self.energy is not None:
            e = sv.pow(2)
            cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-30)
            r = int((cum < self.energy - 1e-7).sum()) + 1
        else:
            r = full
        if r > full and not isinstance(fixed, int) and p not in self._named():
            return r  # one rank= for every layer: the caller skips this one (beyond break-even)
        if r > full:
            raise ValueError(
                f"Factorize: rank {r} is larger than possible for {p} ({m}x{n}: at most {full}); "
                f"choose a rank <= {full}."
            )
        return r

    def _lower_rank(
        self, p: str, sv: torch.Tensor, m: int, n: int, fixed: Any, now: tuple[int, ...] | None
    ) -> int:
        """:meth:`_rank_for`, except that for a layer already factorized at rank ``now[0]``
        ``ratio`` is a fraction of that rank (of what the layer holds now)."""
        if now is not None and fixed is None and self.ratio is not None:
            return max(1, int(self.ratio * now[0]))
        return self._rank_for(p, sv, m, n, fixed)

    def _budget(
        self,
        model: nn.Module,
        ctx: Context,
        target: Target,
        linears: dict[str, nn.Module],
        convs: dict[str, nn.Module],
        spatial: dict[str, tuple[int, int, int, int]],
        aware: bool,
        report: Report,
        now: dict[str, tuple[int, ...]],
    ) -> dict[str, Any]:
        """Spend a global parameter/MAC budget greedily on the largest sigma^2 per unit cost.

        A layer already factorized (``now``: its ranks) costs what its ranks cost and can only
        go down in rank.
        """
        from ..profiling.profiler import profile

        metric, fraction = target.metric, target.fraction
        inputs = ctx.inputs
        if metric == "macs":
            inputs = ctx.require_inputs("Factorize(macs=...)", "to count MACs")
        prof = profile(model, inputs, memory=False) if inputs is not None else None
        total = (
            target.measure(prof) if prof is not None else sum(p.numel() for p in model.parameters())
        )
        if prof is not None and metric == "params":
            total = prof.params
        stats: dict[str, LayerStats] = {}
        if aware:  # sensitivities in one unit: each rank's share of the output error
            from ..core.calibrate import collect

            named = dict(model.named_modules())
            # a factorized layer's first factor sees its input (and is a plain Linear/Conv2d)
            layers = {
                p: _factors(named[p])[0] if p in now else named[p] for p in [*linears, *convs]
            }
            stats = collect(model, ctx.calibration, layers, gram=True)
        # per layer: singular values (sensitivity), the cost of going from rank r to r + 1,
        # the dense cost, and whether it is a convolution (given an integer rank)
        entries: list[_Entry] = []
        for p, m in linears.items():
            w = _weight(m)
            out, inp = w.shape
            per_row = now[p][0] * (out + inp) if p in now else out * inp
            rows = (
                (prof.modules[p].macs / per_row)
                if prof is not None and metric == "macs" and p in prof.modules
                else 1.0
            )
            sv = _whitened_singular_values(w, stats[p].gram if p in stats else None)
            if p in now:
                sv = sv[: now[p][0]]
            unit = (out + inp) * rows
            entries.append((p, sv, lambda r, u=unit: u, per_row * rows, False))
        for p, m in convs.items():
            gram = stats[p].gram if p in stats else None
            entries.append(
                _conv_entry(p, m, gram, spatial.get(p, (1, 1, 1, 1)), metric, self._kind(m), now)
            )
        selected_full = sum(e[3] for e in entries)
        budget = target.goal(total) - (total - selected_full)
        if budget <= 0:
            report.note(
                f"budget {metric}={fraction} is below what the unselected layers cost; every layer gets rank 1"
            )
        ranks = _allocate_ranks(entries, budget)
        # linear layers: the fraction of their cost kept (>= 1: stays dense); convolutions:
        # their rank, or 1.0 (stays dense) where that rank costs as much as the convolution
        out: dict[str, Any] = {}
        for (p, _, marginal, full, conv), r in zip(entries, ranks):
            cost = sum(marginal(k) for k in range(r))
            if p in now:  # already factorized: a lower rank, or as it is
                out[p] = r if r < now[p][-1] else 1.0  # a Tucker chain: its output rank
            elif conv:
                out[p] = r if cost < full else 1.0
            else:  # (a layer that costs nothing, such as one that never runs, stays)
                out[p] = cost / full if full > 0 else 1.0
        report.note(
            f"global {metric} budget {fraction}: kept (fraction of a linear layer's cost, or a "
            f"convolution's rank) { ({p: round(v, 3) for p, v in out.items()}) }"
        )
        return out

    # -- Linear ---------------------------------------------------------------------------------
    def _factorize_linear(
        self,
        model: nn.Module,
        report: Report,
        p: str,
        m: nn.Module,
        fixed: Any,
        gram: torch.Tensor | None,
        now: tuple[int, ...] | None = None,
        original: nn.Module | None = None,
        cross: torch.Tensor | None = None,
        ref_gram: torch.Tensor | None = None,
        folds: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Factorize ``m`` (at ``p``); ``now``: ``m`` stands in for a layer already factorized
        at that rank (``original``), which only a lower rank replaces. ``cross``: ``X^T X_ref``
        (with ``gram`` = ``X^T X``) to refit the second factor toward the original output;
        ``folds``: the same sums per fold of batches (the refit's strength cross-validated)."""
        w = _weight(m)
        out, inp = w.shape
        if isinstance(fixed, float) and fixed >= 1.0:
            why = "keeps its rank" if now else "keeps it dense (factorized would cost more)"
            report.skipped(p, f"the budget {why}")
            return
        sv = _whitened_singular_values(w, gram)
        r = self._lower_rank(p, sv, out, inp, fixed, now)
        if now is not None and r >= now[0]:
            report.skipped(p, f"already factorized at rank {now[0]} (asked {r})")
            return
        breakeven = out * inp / (out + inp)
        if r >= breakeven:
            report.skipped(
                p, f"rank {r} >= {breakeven:.1f}: the factorized form would cost more FLOPs"
            )
            return
        first, second = svd_factors(w, r, gram)
        refit = {}
        if cross is not None and ref_gram is not None and gram is not None and self.refit:
            second, refit = _refit_factor(w, first, second, gram, cross, ref_gram, folds)
        new = FactorizedLinear(inp, out, r, bias=m.bias is not None).to(m.weight.device)
        with torch.no_grad():
            new.first.weight.copy_(first)
            new.second.weight.copy_(second)
            if m.bias is not None:
                new.second.bias.copy_(m.bias.detach().float())
        new = new.to(m.weight.dtype)
        kept = r * (out + inp) / (out * inp)
        err = float((second @ first - w).norm() / w.norm().clamp_min(1e-30))
        extra = {"from_rank": now[0]} if now is not None else {}
        report.changed(
            p,
            "factorized",
            shape_of(original if original is not None else m),
            shape_of(new),
            **extra,
            rank=r,
            params_kept=round(kept, 4),
            weight_error=round(err, 4),
            whitened=gram is not None,
            **refit,
        )
        replace_module(model, p, new)

    # -- Conv2d ---------------------------------------------------------------------------------
    def _factorize_conv(
        self,
        model: nn.Module,
        report: Report,
        p: str,
        m: nn.Conv2d,
        fixed: Any,
        sizes: tuple[int, int, int, int] | None,
        now: tuple[int, ...] | None = None,
        original: nn.Module | None = None,
        stats: LayerStats | None = None,
    ) -> None:
        """Factorize ``m`` (at ``p``); ``now``: ``m`` stands in for a layer already factorized
        with those ranks (``original``), which only lower ranks replace. ``stats``: its
        patches' sums on the calibration data (``gram``, ``extra["cross"]``,
        ``extra["ref_gram"]``) to refit the last factor toward the unfactorized output."""
        if isinstance(fixed, float) and fixed >= 1.0:
            why = "keeps its ranks" if now else "keeps it dense (factorized would cost more)"
            report.skipped(p, f"the budget {why}")
            return
        w = m.weight.detach().float()
        o, i = w.shape[:2]
        kind = self._kind(m)
        split = (self._spatial if kind == "spatial" else self._tucker)(
            report, p, m, w, fixed, sizes, now
        )
        if split is None:
            return
        layers, ranks, approx = split
        refit = self._refit_last(layers, kind, w, stats) if stats is not None else {}
        new = FactorizedConv2d(layers, kind, i, o, ranks).to(
            device=m.weight.device, dtype=m.weight.dtype
        )
        if refit:
            approx = _conv_product(layers, kind)
        err = float((approx - w).norm() / w.norm().clamp_min(1e-30))
        kept = sum(c.weight.numel() for c in layers) / w.numel()
        extra = {"from_ranks": tuple(now)} if now is not None else {}
        report.changed(
            p,
            "factorized",
            shape_of(original if original is not None else m),
            shape_of(new),
            **extra,
            ranks=ranks,
            params_kept=round(kept, 4),
            weight_error=round(err, 4),
            **refit,
        )
        replace_module(model, p, new)

    @staticmethod
    def _refit_last(
        layers: nn.Sequential, kind: str, w: torch.Tensor, st: LayerStats
    ) -> dict[str, float]:
        """Refit the chain's last (1 x 1) factor in place by least squares, so that on the
        calibration patches it reproduces the unfactorized output (:func:`refit_second`,
        the layers before it composed into one map of the patches). Returns the report's
        ``output_error_truncated``/``output_error``, or nothing where the sums are missing."""
        cross, ref_gram = st.extra.get("cross"), st.extra.get("ref_gram")
        if st.gram is None or cross is None or ref_gram is None or st.extra.get("unpaired"):
            return {}
        o = w.shape[0]
        a = _patch_map(layers, kind).to(st.gram.device)  # (rank, in * kh * kw)
        if st.rows < a.shape[0]:  # fewer pixels than the factor has columns
            return {}
        last = layers[-1]
        b_now = last.weight.detach().reshape(o, -1).float()
        b, details = _refit_factor(
            w.reshape(o, -1), a, b_now, st.gram, cross, ref_gram, st.extra.get("folds")
        )
        with torch.no_grad():
            last.weight.copy_(b.reshape(last.weight.shape))
        return details

    def _kind(self, m: nn.Module) -> str:
        """How ``m`` (a convolution, or a factorized one) is split: ``self.conv``, except that
        a 1x1 convolution is a matrix over channels, whose best split at any rank is its SVD:
        two 1x1 convolutions, what the spatial split is for a 1x1 kernel (a Tucker-2 chain
        around it would add a third layer and save nothing)."""
        return "spatial" if tuple(m.kernel_size) == (1, 1) else self.conv

    def _spatial(
        self,
        report: Report,
        p: str,
        m: nn.Conv2d,
        w: torch.Tensor,
        fixed: Any,
        sizes: tuple[int, int, int, int] | None,
        now: tuple[int, ...] | None,
    ) -> tuple[nn.Sequential, tuple[int, ...], torch.Tensor] | None:
        """The k x 1 then 1 x k pair for ``m`` (its layers, rank and the weight they make), or
        ``None`` with the reason in ``report``."""
        o, i, kh, kw = w.shape
        _, win, hout, wout = sizes if sizes is not None else (1, 1, 1, 1)
        dense_macs = o * i * kh * kw * hout * wout
        sv = torch.linalg.svdvals(w.permute(1, 2, 0, 3).reshape(i * kh, o * kw))
        r = self._lower_rank(p, sv, i * kh, o * kw, fixed, now)
        if now is not None and r >= now[0]:
            report.skipped(p, f"already factorized at rank {now[0]} (asked {r})")
            return None
        # k x 1 conv at (hout, win) then 1 x k at (hout, wout); a 1x1 kernel's first factor
        # takes the whole stride and padding (the second then runs at the output's size)
        point = (kh, kw) == (1, 1)
        cost = r * i * kh * hout * (wout if point else win) + o * r * kw * hout * wout
        if (cost >= dense_macs and sizes is not None) or r * (i * kh + o * kw) >= o * i * kh * kw:
            report.skipped(p, f"rank {r}: the spatial split would cost as much as the convolution")
            return None
        v, h = spatial_svd(w, r)
        first = nn.Conv2d(
            i,
            r,
            (kh, 1),
            stride=m.stride if point else (m.stride[0], 1),
            padding=m.padding if point else (m.padding[0], 0),
            dilation=(m.dilation[0], 1),
            bias=False,
        )
        second = nn.Conv2d(
            r,
            o,
            (1, kw),
            stride=1 if point else (1, m.stride[1]),
            padding=0 if point else (0, m.padding[1]),
            dilation=(1, m.dilation[1]),
            bias=m.bias is not None,
        )
        with torch.no_grad():
            first.weight.copy_(v)
            second.weight.copy_(h)
            if m.bias is not None:
                second.bias.copy_(m.bias.detach())
        layers = nn.Sequential(first, second)
        ranks: tuple[int, ...] = (r,)
        approx = torch.einsum("rih,orw->oihw", v[..., 0], h[:, :, 0, :])
        return layers, ranks, approx

    def _tucker(
        self,
        report: Report,
        p: str,
        m: nn.Conv2d,
        w: torch.Tensor,
        fixed: Any,
        sizes: tuple[int, int, int, int] | None,
        now: tuple[int, ...] | None,
    ) -> tuple[nn.Sequential, tuple[int, ...], torch.Tensor] | None:
        """The Tucker-2 chain (1 x 1, k x k core, 1 x 1) for ``m`` (its layers, ranks and the
        weight they make), or ``None`` with the reason in ``report``."""
        o, i, kh, kw = w.shape
        hin, win, hout, wout = sizes if sizes is not None else (1, 1, 1, 1)
        dense_macs = o * i * kh * kw * hout * wout
        s0 = torch.linalg.svdvals(w.reshape(o, -1))
        s1 = torch.linalg.svdvals(w.transpose(0, 1).reshape(i, -1))
        if isinstance(fixed, float):
            r_out = r_in = _tucker_rank_for_params(o, i, kh * kw, fixed * o * i * kh * kw)
        elif fixed is not None:  # a budget's rank, or select={path: rank}
            r_out = r_in = int(fixed)
            if r_out > min(o, i * kh * kw):
                raise ValueError(
                    f"Factorize: rank {int(fixed)} is larger than possible for {p} ({shape_of(m)}); "
                    f"at most {min(o, i * kh * kw)}."
                )
        elif self.rank is not None:
            r_out = r_in = self.rank  # each side clamped below, as for a budget's rank
            most = min(o, i * kh * kw)
            if self.rank > most and p in self._named():
                raise ValueError(
                    f"Factorize: rank {self.rank} is larger than possible for {p} "
                    f"({shape_of(m)}): at most {most}."
                )
            if self.rank > most:  # one rank for every layer: this one is too small
                report.skipped(p, f"rank {self.rank} is more than this layer has (at most {most})")
                return None
        elif self.energy is not None:
            r_out = self._rank_for(p, s0, o, i * kh * kw, None)
            r_in = self._rank_for(p, s1, i, o * kh * kw, None)
        elif now is not None:  # a fraction of what the layer holds now
            held = now[0] * i + now[0] * now[1] * kh * kw + o * now[1]
            r_out = r_in = _tucker_rank_for_params(o, i, kh * kw, (self.ratio or 1.0) * held)
        else:
            target = (self.ratio or 1.0) * o * i * kh * kw
            r_out = r_in = _tucker_rank_for_params(o, i, kh * kw, target)
        r_out, r_in = min(r_out, o), min(r_in, i)
        if now is not None:
            r_in, r_out = min(r_in, now[0]), min(r_out, now[1])
            if (r_in, r_out) == tuple(now):
                report.skipped(p, f"already factorized at ranks {tuple(now)}")
                return None
        u_in, core, u_out = tucker2(w, r_in, r_out)
        cost_params = r_in * i + r_out * r_in * kh * kw + o * r_out
        cost = r_in * i * hin * win + r_out * r_in * kh * kw * hout * wout + o * r_out * hout * wout
        if cost_params >= o * i * kh * kw or (sizes is not None and cost >= dense_macs):
            report.skipped(
                p,
                f"ranks ({r_in}, {r_out}): the Tucker chain would cost as much as the convolution",
            )
            return None
        first = nn.Conv2d(i, r_in, 1, bias=False)
        mid = nn.Conv2d(
            r_in,
            r_out,
            (kh, kw),
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            bias=False,
            padding_mode=m.padding_mode,
        )
        last = nn.Conv2d(r_out, o, 1, bias=m.bias is not None)
        with torch.no_grad():
            first.weight.copy_(u_in.t()[:, :, None, None])
            mid.weight.copy_(core)
            last.weight.copy_(u_out[:, :, None, None])
            if m.bias is not None:
                last.bias.copy_(m.bias.detach())
        layers = nn.Sequential(first, mid, last)
        ranks = (r_in, r_out)
        approx = torch.einsum("rshw,or,is->oihw", core, u_out, u_in)
        return layers, ranks, approx


def _not_refittable(m: nn.Module, kind: str) -> str | None:
    """Why a convolution's factorized chain (split as ``kind``) cannot have its last factor
    refit, or ``None``: it needs zero padding (its patches are ``F.unfold``'s) and a Tucker
    chain or a 1 x 1 kernel (whose last factor reads one pixel of a map of the patches)."""
    if not isinstance(m, nn.Conv2d) or m.groups != 1:
        return "a grouped convolution"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return "padding other than explicit zeros"
    if kind != "tucker" and tuple(m.kernel_size) != (1, 1):
        return "a spatial split (its second factor reads the first's own patches)"
    return None


def _stat_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows of its statistics: a convolution's patches, read with the
    geometry of the dense convolution it is or stands for (a Tucker chain's core, a 1 x 1
    split's first factor, which carry its kernel, stride and padding); a Linear's tokens."""
    if isinstance(m, FactorizedConv2d):
        m = m.layers[1] if m.kind == "tucker" else m.layers[0]
    return conv_patches(m, x) if isinstance(m, nn.Conv2d) else token_rows(x)


def _patch_map(layers: nn.Sequential, kind: str) -> torch.Tensor:
    """The factors before the last as one matrix ``(rank, in * kh * kw)`` acting on the
    input's patches (a Tucker chain: the 1 x 1 input factor folded into the core; a 1 x 1
    kernel's split: its first factor)."""
    first = layers[0].weight.detach().float()
    if kind == "tucker":
        core = layers[1].weight.detach().float()  # (r_out, r_in, kh, kw)
        fused = torch.einsum("rshw,si->rihw", core, first[:, :, 0, 0])
        return fused.reshape(fused.shape[0], -1)
    return first.reshape(first.shape[0], -1)


def _conv_product(layers: nn.Sequential, kind: str) -> torch.Tensor:
    """The dense weight ``(o, i, kh, kw)`` a factorized chain computes (Tucker or 1 x 1)."""
    a = _patch_map(layers, kind)
    last = layers[-1].weight.detach().float()
    o = last.shape[0]
    i = layers[0].weight.shape[1]
    k = a.shape[1] // i
    kh = layers[1].kernel_size[0] if kind == "tucker" else 1
    return (last.reshape(o, -1) @ a).reshape(o, i, kh, k // kh)


def svd_factors(
    w: torch.Tensor, rank: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first (rank, in), second (out, rank))`` with ``second @ first ~= w``.

    With ``gram`` (``X^T X`` of the inputs) the truncation minimises ``||(w - second @ first) X||``
    (SVD-LLM whitening); at full rank the product equals ``w`` to float precision.
    """
    if gram is not None:
        s_chol, s_inv = _whitening(gram)
        u, sv, vh = torch.linalg.svd(w.double() @ s_chol.double(), full_matrices=False)
    else:
        u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
        s_inv = None
    sq = sv[:rank].sqrt()
    first = sq[:, None] * vh[:rank]
    if s_inv is not None:
        first = first @ s_inv.double()
    second = u[:, :rank] * sq[None, :]
    return first.float(), second.float()


def _refit_factor(
    w: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    ref_gram: torch.Tensor,
    folds: list[dict[str, torch.Tensor]] | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The refit second factor and the report's details. With two folds of calibration
    batches, Prune's refit (:func:`~nnslim.transforms.refit.choose_damp`): a ridge toward the
    truncated factor whose strength two-fold cross-validation chooses, the truncated factor
    kept where no refit reproduces the held-out batches better (errors on the held-out folds).
    With fewer batches, the plain least-squares :func:`refit_second` (errors on all of them).
    The refit is ``second``'s least squares for the inputs ``Z = X first^T``: ``Z^T Z =
    first G first^T``, ``Y^T Z = W C^T first^T``, ``||Y||^2 = tr(W R W^T)``."""
    a, wd = first.double(), w.double()

    def sums(g: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> dict[str, Any]:
        return {
            "gram": a @ g.double() @ a.t(),
            "yx": wd @ c.double().t() @ a.t(),
            "energy": float((wd @ r.double() * wd).sum()),
        }

    if folds and len(folds) == FOLDS and all(folds):
        b, before, after, chosen = cross_validated(
            second.double(),
            sums(gram, cross, ref_gram),
            [sums(f["gram"], f["cross"], f["ref_gram"]) for f in folds],
        )
        details = {"output_error_truncated": round(before, 4), "output_error": round(after, 4)}
        return b.float(), {**details, "refit_damp": chosen}
    b, before, after = refit_second(w, first, second, gram, cross, ref_gram)
    return b, {"output_error_truncated": round(before, 4), "output_error": round(after, 4)}


def refit_second(
    w: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    ref_gram: torch.Tensor,
) -> tuple[torch.Tensor, float, float]:
    """The second factor ``B`` minimising ``||X A^T B^T - X_ref W^T||`` for the first factor
    ``A``, given ``gram = X^T X``, ``cross = X^T X_ref`` and ``ref_gram = X_ref^T X_ref``:
    ``B = W C^T A^T (A G A^T)^-1``.

    Returns ``(B, before, after)``: the relative output error on the calibration tokens
    (against the original output ``X_ref W^T``) with the truncated and the refit factor. The
    refit is the least-squares optimum, so ``after <= before`` up to rounding; where it is not,
    ``B`` is the truncated factor.
    """
    a, g, c, wd = first.double(), gram.double(), cross.double(), w.double()
    m = a @ g @ a.t()
    m.diagonal().add_(1e-8 * m.diagonal().mean().clamp_min(1e-30))
    rhs = a @ c @ wd.t()  # (rank, out)
    b = torch.linalg.solve(m, rhs).t()
    energy = (wd @ ref_gram.double() * wd).sum().clamp_min(1e-30)

    def rel(bb: torch.Tensor) -> float:
        e = (bb @ m * bb).sum() - 2 * (bb * rhs.t()).sum() + energy
        return float((e.clamp_min(0) / energy).sqrt())

    before, after = rel(second.double()), rel(b)
    if not after <= before:
        return second, before, before
    return b.float(), before, after


def tucker2(
    w: torch.Tensor, r_in: int, r_out: int, iterations: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight ``(o, i, kh, kw)``: ``(u_in (i, r_in), core, u_out (o, r_out))``
    with ``w ~= core x_0 u_out x_1 u_in`` (HOSVD initialisation, HOOI refinement)."""
    o, i = w.shape[:2]
    w = w.double()
    u_out = torch.linalg.svd(w.reshape(o, -1), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(i, -1), full_matrices=False)[0][:, :r_in]
    for _ in range(iterations):
        t = torch.einsum("oihw,ir->orhw", w, u_in)
        u_out = torch.linalg.svd(t.reshape(o, -1), full_matrices=False)[0][:, :r_out]
        t = torch.einsum("oihw,or->rihw", w, u_out)
        u_in = torch.linalg.svd(t.transpose(0, 1).reshape(i, -1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_in.float(), core.float(), u_out.float()


def spatial_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial split of ``(o, i, kh, kw)``: ``(v (rank, i, kh, 1), h (o, rank, 1, kw))``."""
    o, i, kh, kw = w.shape
    mat = w.double().permute(1, 2, 0, 3).reshape(i * kh, o * kw)
    u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
    sq = sv[:rank].sqrt()
    v = (u[:, :rank] * sq).reshape(i, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    h = (sq[:, None] * vh[:rank]).reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2)
    return v.float(), h.float()


def _tucker_cost(o: int, i: int, k2: int, r: int) -> int:
    """Parameters of a Tucker-2 chain at rank ``r``: ranks ``(min(r, i), min(r, o))``."""
    r_in, r_out = min(r, i), min(r, o)
    return r_in * i + r_in * r_out * k2 + o * r_out


def _tucker_rank_for_params(o: int, i: int, k2: int, target: float) -> int:
    """Largest rank ``r`` (at least 1) whose chain (:func:`_tucker_cost`) fits in ``target``
    parameters. The ranks are clamped per side, so a convolution with few input channels (a
    network's stem) keeps its inputs whole and still spends the rest on its outputs."""
    best = 1
    for r in range(2, min(o, i * k2) + 1):
        if _tucker_cost(o, i, k2, r) > target:
            break
        best = r
    return best


def _whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor ``S`` of ``X^T X`` (damped) and its inverse."""
    g = gram.double()
    n = g.shape[0]
    damp = 1e-6 * torch.diagonal(g).mean().clamp_min(1e-12)
    for _ in range(6):
        try:
            s = torch.linalg.cholesky(g + damp * torch.eye(n, dtype=g.dtype, device=g.device))
            break
        except RuntimeError:
            damp = damp * 100
    else:  # pragma: no cover - pathological
        s = torch.eye(n, dtype=g.dtype, device=g.device)
    s_inv = torch.linalg.solve_triangular(
        s, torch.eye(n, dtype=g.dtype, device=g.device), upper=False
    )
    return s.float(), s_inv.float()


def _whitened_singular_values(w: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    if gram is None:
        return torch.linalg.svdvals(w)
    s, _ = _whitening(gram)
    return torch.linalg.svdvals(w @ s)


def _spatial_sizes(
    model: nn.Module, inputs: Inputs | None, paths: list[str]
) -> dict[str, tuple[int, int, int, int]]:
    """``(h_in, w_in, h_out, w_out)`` of convolutions, from one forward (empty without inputs)."""
    if inputs is None or not paths:
        return {}
    sizes: dict[str, tuple[int, int, int, int]] = {}
    handles = []
    named = dict(model.named_modules())
    for p in paths:

        def hook(_m: nn.Module, args: Any, out: Any, p: str = p) -> None:
            x = args[0]
            sizes[p] = (x.shape[-2], x.shape[-1], out.shape[-2], out.shape[-1])

        handles.append(named[p].register_forward_hook(hook))
    try:
        with preserved_state(model), torch.no_grad():
            inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    return sizes


#: a layer in the global budget: ``(path, singular values, cost of going from rank r to
#: r + 1, dense cost, whether it is a convolution)``
_Entry = tuple[str, torch.Tensor, Any, float, bool]


def _conv_entry(
    p: str,
    m: nn.Module,
    gram: torch.Tensor | None,
    spatial: tuple[int, int, int, int],
    metric: str,
    kind: str,
    now: dict[str, tuple[int, ...]],
) -> _Entry:
    """A convolution's budget entry: its singular values (whitened over input channels when
    ``gram`` is given), its marginal cost per rank (``kind``: ``"spatial"`` k x 1 then 1 x k,
    else Tucker-2 with equal ranks) and its cost now."""
    hin, win, hout, wout = spatial
    o, i, kh, kw = m.weight.shape
    a_in, a_out, a_mid = (hin * win, hout * wout, hout * win) if metric == "macs" else (1, 1, 1)
    if (kh, kw) == (1, 1):  # a pointwise layer's first factor strides to the output's size
        a_mid = a_out
    w = m.weight.detach().float()
    if gram is not None:  # whitened over input channels, like a Linear's input
        w = torch.einsum("oihw,ij->ojhw", w, _whitening(gram)[0].float())
    full = o * i * kh * kw * a_out
    if kind == "spatial":
        sv = torch.linalg.svdvals(w.permute(1, 2, 0, 3).reshape(i * kh, o * kw))
        step = i * kh * a_mid + o * kw * a_out  # k x 1 then 1 x k, linear in r

        def marginal(r: int, step: float = step) -> float:
            return step

        if p in now:
            sv = sv[: now[p][0]]
            full = now[p][0] * step
        return p, sv, marginal, full, True
    # Tucker-2 at rank r: ranks (min(r, i), min(r, o)), r up to the output unfolding's rank
    # (a stem convolution with one input channel still has up to k*k output directions)
    sv = torch.linalg.svdvals(w.reshape(o, -1))[: min(o, i * kh * kw)]

    # an already factorized chain only goes down: each side capped at its rank now
    cap_in, cap_out = now[p] if p in now else (i, o)

    def cost(r: int, k2: float = kh * kw * a_out) -> float:
        r_in, r_out = min(r, i, cap_in), min(r, o, cap_out)
        return r_in * i * a_in + r_in * r_out * k2 + o * r_out * a_out

    def tucker(r: int) -> float:  # from rank r to r + 1
        return cost(r + 1) - cost(r)

    if p in now:
        r_in, r_out = now[p]
        sv = sv[:r_out]  # the output side's directions (past them, nothing is bought)
        full = r_in * i * a_in + r_in * r_out * kh * kw * a_out + o * r_out * a_out
    return p, sv, tucker, full, True


def _allocate_ranks(entries: list[_Entry], budget: float) -> list[int]:
    """Ranks per entry: rank 1 everywhere, then rank by rank where the energy bought per unit
    of cost is largest (sigma^2 / marginal cost), while the budget lasts; each layer's ranks
    in order. A layer whose next rank would cost at least its dense form is offered whole
    instead: the rest of its energy for the rest of its dense cost (the rank then is
    ``len(sv)``: kept dense). Charging ranks past that point would count a layer at up to twice
    what it costs, and the model would come out far below its budget."""
    ranks = [1] * len(entries)
    spent_on = [e[2](0) for e in entries]  # rank 1 everywhere
    spent = sum(spent_on)
    energies = [e[1].double().pow(2).tolist() for e in entries]

    def offer(idx: int) -> tuple[float, float, int] | None:
        """The next purchase of layer ``idx``: ``(energy per cost, cost, new rank)``."""
        sv, r, full = energies[idx], ranks[idx], entries[idx][3]
        if r >= len(sv):
            return None
        unit = entries[idx][2](r)
        if spent_on[idx] + unit >= full:  # as dense or dearer: the layer whole
            rest = max(full - spent_on[idx], 0.0)
            energy = sum(sv[r:])
            return (energy / rest if rest > 0 else math.inf), rest, len(sv)
        return sv[r] / unit, unit, r + 1

    heap: list[tuple[float, int, float, int]] = []
    for idx in range(len(entries)):
        o = offer(idx)
        if o is not None:
            heapq.heappush(heap, (-o[0], idx, o[1], o[2]))
    while heap:
        _, idx, cost, rank = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer stops here (its ranks are bought in order)
        ranks[idx] = rank
        spent_on[idx] += cost
        spent += cost
        o = offer(idx)
        if o is not None:
            heapq.heappush(heap, (-o[0], idx, o[1], o[2]))
    return ranks
