"""``Prune``: remove channels, heads and hidden units for real, or sparsify with masks."""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal, final, get_args

import torch
from torch import nn

from ..base.describe import shape_of
from ..base.inputs import Inputs, call_for_analysis, is_meta
from ..base.modules import (
    copy_model,
    is_conv2d,
    is_hf_conv1d,
    is_linear,
    layer_skip_reason,
    linear_weight,
    maps_each_channel,
    out_width,
    replace_module,
    shared_parameters,
)
from ..base.snapshot import Snapshot, preserve_modes, preserved_state
from ..base.validate import all_finite, check_choice, check_fraction, check_int, check_type
from ..core.calibrate import LayerStats, collect
from ..core.failure import failing_module, first_line
from ..core.report import Report
from ..core.select import normalize_selector, per_layer_values
from ..core.target import Target
from ..core.transform import Context, Transform
from ..graph.attention import AttentionSpec, find_attention
from ..graph.fused_mlp import ExpertBankSpec, find_expert_banks, find_fused_mlps
from ..graph.tp_compat import GroupTooLarge, Pruner, TraceError
from ..graph.trace import MAX_GROUP as MAX_GROUP_DEFAULT
from ..graph.trace import TIME_LIMIT_S, Graph, root_types, trace
from ..modules.masks import (
    MASK_NAME,
    cut_mask,
    masked_modules,
    not_recording_cuts,
    recording_cuts,
)
from ..modules.mha import back_to_torch, to_head_prunable
from ..modules.quantized import Int4Linear, int4_group_size
from .allocation import OWL, blocks_of, owl_ratios
from .importance import IMPORTANCE_NAMES, Importance, as_importance
from .refit import refit_readers, refittable, say_left, widths
from .scoring import GroupScorer
from .sparsity import nm_mask, parse_pattern, unstructured_masks

__all__ = ["Prune"]

#: how the ratio is shared: per layer, or ranked across the model
Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = get_args(Scope)
STRUCTURES = ("channels", "unstructured", "N:M (e.g. '2:4')")
ALLOCATIONS = ("uniform", "owl")


@final
@dataclass(frozen=True)
class Prune(Transform):
    """Pruning: remove whole channels and attention heads, or zero single weights with masks.

    With ``structure="channels"`` (the default) channels are removed for real: every layer
    coupled to a channel (the BatchNorm after a convolution, the next layer's inputs, residual
    partners, concatenations) shrinks with it, found by the dependency graph. Attention modules
    lose whole heads (with grouped-query attention, the same number inside every key/value
    group) and their head attributes and Hugging Face config fields are updated. The layers that
    produce the model output (classifier, LM head) are never pruned unless selected by name.

    With ``structure="unstructured"`` or ``"2:4"`` (any ``"N:M"``) the weights keep their shape:
    the least important entries are set to zero and a ``weight_mask`` buffer records them. With
    ``pack=True`` the sparsified Linear and Conv2d layers store only the kept weights and a
    bitmask (:class:`~nnslim.modules.sparse.SparseLinear`, :class:`~nnslim.modules.sparse.SparseConv2d`): at 50% an fp32 layer
    takes 0.53 of its bytes, in memory and on disk; it runs at dense speed less the unpacking.
    Layers packed before stay packed when they are sparsified again.

    Exactly one of ``ratio``, ``macs`` and ``params`` sets how much to remove (or per-module
    ratios in ``select``); N:M needs none.

    Args:
        ratio: fraction removed in ``[0, 1)``: of each group's channels and each attention's
            heads, or of each layer's weights (unstructured).
        macs: target MACs as a fraction of the original, in ``(0, 1]`` (channels only).
        params: target parameters as a fraction of the original, in ``(0, 1]`` (channels only).
        importance: ``"l2"``/``"l1"`` (magnitude), ``"taylor"`` (needs calibration),
            ``"wanda"`` (activation-aware, needs calibration), ``"random"``, or an
            :class:`~nnslim.Importance` of your own.
        scope: ``"local"`` (the same ratio everywhere) or ``"global"`` (rank across layers).
        structure: ``"channels"``, ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
        select: layers to prune: names, ``re:`` patterns, types, or a mapping to per-layer
            ratios. For attention, select the query projection (or GPT-2's ``c_attn``).
        exclude: layers never pruned.
        round_to: keep channel counts multiples of this (8 suits fast kernels).
        steps: prune channels in this many equal steps (iterative pruning).
        time_limit: seconds each tracing phase may take before a ``TraceError`` names the
            module it was at (``None``: no limit).
        allocation: unstructured sparsity per layer: ``"uniform"`` (``ratio`` everywhere) or
            ``"owl"`` / :class:`~nnslim.OWL` (outlier-weighted: blocks whose weights have more
            outliers of ``|w| * ||x||`` are pruned less, the mean over blocks is ``ratio``;
            needs calibration).
        pack: store the sparsified layers packed (unstructured and N:M only); layers that
            cannot be (a weight tied to another layer's, a convolution that pads with
            reflections, a layer type other than Linear/Conv2d) keep their mask, each said in
            the report.
        refit: channels only, needs calibration: after pruning, refit every Linear and
            Conv2d whose inputs lost channels (an MLP's down projection, an attention's output
            projection, the convolution after a pruned one) by least squares, so that on the
            calibration data it reproduces the unpruned model's output from the inputs it has
            left (the structured OBS update; a bias is refit with it), a ridge toward the cut
            weight whose strength two-fold cross-validation over the batches chooses per
            layer. Blocks are refit in order, each on the refit blocks' output. Each refit
            layer's change carries its held-out relative output error before and after
            (``refit_error``) and the strength (``refit_damp``). Holds a copy of the unpruned
            model meanwhile.

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(16, 8, 3))
        >>> report = nnslim.Prune(ratio=0.5).apply(model, torch.randn(1, 3, 16, 16))
        >>> model[0].out_channels, model[2].in_channels, model[2].out_channels
        (8, 8, 8)
    """

    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    importance: Any = "l2"
    scope: Scope = "local"
    structure: str = "channels"
    select: Any = None
    exclude: Any = None
    round_to: int | None = None
    steps: int = 1
    time_limit: float | None = TIME_LIMIT_S
    allocation: Any = "uniform"
    pack: bool = False
    refit: bool = False

    _copy_on_snapshot = False
    _forward_failure_hint = (
        "Channel counts written into the forward as constants (split sizes, reshape shapes) "
        "cannot follow pruning: exclude the layers that feed them (exclude=[...])."
    )

    def __post_init__(self) -> None:
        if self.time_limit is not None:
            check_fraction(
                "Prune", "time_limit", self.time_limit, high=float("inf"), low_inclusive=False
            )
        check_type("Prune", "structure", self.structure, str)
        nm = parse_pattern(self.structure)
        if self.structure not in ("channels", "unstructured") and nm is None:
            raise ValueError(
                f"Prune(structure=...): unknown value {self.structure!r}; supported: "
                f"{', '.join(STRUCTURES)}."
            )
        given = [n for n in ("ratio", "macs", "params") if getattr(self, n) is not None]
        sel = normalize_selector(self.select)
        per_module = sel is not None and all(v is not None for _, v in sel)
        if nm is not None:
            n, m = nm
            if not 0 < n < m:
                raise ValueError(f"Prune(structure={self.structure!r}): need 0 < N < M.")
            if given:
                raise ValueError(
                    f"Prune(structure={self.structure!r}) keeps {n} of every {m} weights; do not "
                    f"also give {given[0]}=."
                )
        elif len(given) > 1 or (not given and not per_module):
            raise ValueError(
                f"Prune: give exactly one of ratio=, macs=, params= (got {given or 'none'}), or "
                f"per-module ratios as select={{name: ratio}}; for example Prune(ratio=0.3) or "
                f"Prune(macs=0.5)."
            )
        check_type("Prune", "pack", self.pack, bool)
        check_type("Prune", "refit", self.refit, bool)
        if self.refit and self.structure != "channels":
            raise ValueError(
                "Prune(refit=True) refits the layers reading removed channels; with "
                f"structure={self.structure!r} no channel is removed. For sparsity with a weight "
                "update use importance='sparsegpt'."
            )
        if self.pack and self.structure == "channels":
            raise ValueError(
                "Prune(pack=True) stores sparse weights packed; channel pruning removes the "
                "channels themselves, nothing is left to pack. Use it with "
                "structure='unstructured' or 'N:M'."
            )
        if self.structure != "channels" and (self.macs is not None or self.params is not None):
            raise ValueError(
                "Prune: macs=/params= targets apply to structure='channels'; zeroed weights "
                "do not reduce MACs. Use ratio= for unstructured sparsity."
            )
        if self.ratio is not None:
            check_fraction("Prune", "ratio", self.ratio)
        Target.of("Prune", macs=self.macs, params=self.params)
        if isinstance(self.importance, str):
            check_choice("Prune", "importance", self.importance, IMPORTANCE_NAMES)
        elif not isinstance(self.importance, Importance):
            as_importance(self.importance)  # raises the TypeError
        check_choice("Prune", "scope", self.scope, SCOPES)
        if not isinstance(self.allocation, OWL):
            check_choice("Prune", "allocation", self.allocation, ALLOCATIONS)
        if self.allocation != "uniform":
            if self.structure != "unstructured" or self.ratio is None:
                raise ValueError(
                    "Prune(allocation='owl') spreads an unstructured ratio= over the layers; "
                    "use it with structure='unstructured' and ratio= (not N:M, channels or "
                    "per-layer ratios)."
                )
            if self.scope == "global":
                raise ValueError(
                    "Prune(allocation='owl') sets each block's ratio itself; do not also give "
                    "scope='global'."
                )
        if as_importance(self.importance).needs_hessian:
            if self.structure == "channels":
                raise ValueError(
                    "Prune(importance='sparsegpt') zeroes single weights and updates the rest; "
                    "use it with structure='unstructured' or 'N:M' (channels are ranked by "
                    "'l2', 'taylor' or 'wanda')."
                )
            if self.scope == "global":
                raise ValueError(
                    "Prune(importance='sparsegpt') prunes each layer to its own ratio; for "
                    "per-layer ratios from the model use allocation='owl', not scope='global'."
                )
        if self.round_to is not None:
            check_int("Prune", "round_to", self.round_to, low=1)
        check_int("Prune", "steps", self.steps, low=1, high=1000)
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    check_fraction("Prune", f"select[{key!r}]", v)
        normalize_selector(self.exclude, "exclude")

    # -- the compress loop ----------------------------------------------------------------------
    def split(self, steps: int) -> list[Transform]:
        """A ratio removes ``1 - (1 - r)^(1/steps)`` per step (the same fraction of what is
        left); a MACs/params target is ``t^(1/steps)`` of the current model per step;
        unstructured sparsity grows linearly; N:M is one step."""
        if steps <= 1 or ":" in self.structure or per_layer_values(self.select):
            return [self]
        if self.structure == "unstructured" and self.ratio is not None:
            return [replace(self, ratio=self.ratio * (k + 1) / steps) for k in range(steps)]
        if self.ratio is not None:
            return [replace(self, ratio=1 - (1 - self.ratio) ** (1 / steps))] * steps
        target = self._target
        if target is not None:
            return [replace(self, **target.per_step(steps).as_field())] * steps
        return [self]

    def gentler(self) -> Prune | None:
        """Half the pruning: half the channel ratio, a target halfway to the whole model."""
        if self.ratio is not None and self.structure == "channels":
            return replace(self, ratio=self.ratio / 2)
        target = self._target
        return None if target is None else replace(self, **target.gentler().as_field())

    @property
    def _target(self) -> Target | None:
        return Target.of("Prune", macs=self.macs, params=self.params)

    # ------------------------------------------------------------------------------------------
    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        imp = as_importance(self.importance)
        # packed sparse layers are pruned as dense layers with their masks, then packed again
        packed = _unpack(model)
        if self.structure != "channels":
            self._sparsify(model, ctx, report, imp, ctx.inputs)
        else:
            self._channels(model, ctx, report, imp)
            _check_masks(model)
        if self.pack or packed:
            self._pack(model, report, packed)

    def _channels(self, model: nn.Module, ctx: Context, report: Report, imp: Importance) -> None:
        inputs = ctx.require_inputs("Prune", "to trace the model")
        batches: list[Inputs] = []
        original: nn.Module | None = None
        if self.refit:
            batches = ctx.require_calibration(
                "Prune(refit=True)", "to refit the layers that read pruned channels"
            )
            original = copy.deepcopy(model)
        kept: dict[str, str] = {}
        snap = Snapshot(model)
        # the hidden width of attention models: pruned on its own, then in step with the heads
        # (attention that reshapes its output to its input's width), then kept
        residual: _Residual = "free"
        first_why = ""
        notes: list[str] = []
        attempt = 0
        narrowed: set[str] = set()  # module classes whose inner layers alone were kept
        fixed_splits = False  # splits by a list of sizes keep their groups (after a failure)
        while True:
            trial = Report(report.transform, report.config)
            widened: list[str] = []  # output projections pruned as the hidden width
            tie: _TieSplit | None = None
            group_failed: _GroupFailed | None = None
            try:
                with recording_cuts() as cuts:
                    self._prune_channels(
                        model, ctx, trial, inputs, kept, residual, widened, fixed_splits
                    )
                failed = failing_module(model, inputs)
            except _NotCoupled:  # no heads to prune in step with: keep the hidden width
                snap.restore()
                residual = "kept"
                notes.append(_hidden_kept(first_why))
                continue
            except _NothingToPrune:
                snap.restore()
                report.notes.extend(notes)
                report.skips.extend(trial.skips)
                return
            except _ForwardFailed as e:  # a trial of the target search
                failed = (e.where, e.error)
            except _TieSplit as e:  # a group reaches one of the modules sharing a weight
                failed, tie = None, e
            except _GroupFailed as e:  # torch-pruning could not shrink one group
                if widened:  # first keep the hidden width (below), then the group
                    failed = ("torch-pruning", e.error)
                else:
                    failed = None
                    group_failed = e
            except Exception as e:  # e.g. torch-pruning on a weight-normed convolution
                if not widened:
                    raise
                failed = ("torch-pruning", first_line(e))
            if group_failed is not None:
                gf = group_failed
                snap.restore()
                attempt += 1
                same = [q for r in gf.roots for q in _same_place(model, r) if q not in kept]
                if attempt > 2 * _RETRIES or not same:
                    raise RuntimeError(
                        f"Prune: torch-pruning failed on the channel group rooted at "
                        f"{', '.join(gf.roots) or 'an unnamed layer'} ({gf.error}). The model "
                        f"was restored. Exclude that module (exclude=[...]) or report the model."
                    ) from gf
                for p in same:  # the same layer in every block like it fails the same way
                    kept[p] = f"torch-pruning cannot shrink its channel group ({gf.error})"
                continue
            if failed is None and tie is None:
                break
            snap.restore()
            if widened:  # first keep the hidden width, then look for the module that failed
                why = str(tie) if tie is not None else f"{failed[0]}: {failed[1]}"
                if residual == "free":
                    residual, first_why = "heads", why
                    continue
                residual = "kept"
                notes.append(_hidden_kept(first_why, why if why != first_why else None))
                continue
            attempt += 1
            if tie is not None:
                roots = _group_roots(model, inputs, tie.paths, kept, self.time_limit)
                if attempt > _RETRIES or not roots:
                    raise tie
                for p in roots:
                    kept[p] = (
                        f"its channels reach some of the modules sharing one weight "
                        f"({', '.join(tie.paths)}) but not all: pruning it would split the tie"
                    )
                continue
            where, error = failed
            cls = type(model.get_submodule(where)).__name__ if where else ""
            layers = _layers_inside(model, where, kept)
            why = (
                f"the forward of {cls} ({where}) failed after pruning ({error}): it reads "
                f"channel counts as constants, so the layers of every {cls} keep their channels"
            )
            if layers and cls not in narrowed:
                # first keep what it computes inside: the layers writing its output (a Mamba
                # mixer's out_proj) still follow the width around it (the hidden width), which
                # no other layer may set
                writers = _output_writers(model, inputs, where)
                inner = [p for p in layers if p not in writers]
                if writers and inner:
                    attempt -= 1
                    narrowed.add(cls)
                    layers = inner
                    why = (
                        f"the forward of {cls} ({where}) failed after pruning ({error}): it "
                        f"reads channel counts as constants, so the layers inside every {cls} "
                        f"keep their channels (those writing its output follow the width "
                        f"around it)"
                    )
            if not layers and where:
                # a norm or an activation with no layers of its own, whose input width no longer
                # matches (the graph missed a link): the channel groups that reached it stay
                places = _same_place(model, where)
                # and what they hold (XLNet's attention: einsum over its own 3-D parameters,
                # whose only traced member is its LayerNorm)
                places += [
                    f"{q}.{c}"
                    for q in places
                    for c, _ in model.get_submodule(q).named_modules()
                    if c
                ]
                layers = _group_roots(model, inputs, places, kept, self.time_limit, False)
                why = (
                    f"its channel group reaches a {cls} at the place of {where} (the same in "
                    f"every {type(model.get_submodule(where.rpartition('.')[0])).__name__}), "
                    f"whose forward failed after pruning ({error}): the dependency graph "
                    f"misses a link to it"
                )
            if not layers and not fixed_splits:
                # nowhere to narrow it down (the model's own forward failed): a split by sizes
                # the forward writes as constants, torch.split(x, [4, 12]), is the usual cause
                fixed_splits = True
                attempt -= 1
                continue
            if attempt > _RETRIES or not layers:
                raise RuntimeError(
                    f"Prune left a model whose forward fails in {where or 'the model'}: "
                    f"{error}. The model was restored. {self._forward_failure_hint}"
                )
            for p in layers:
                kept[p] = why
        if original is not None:
            _refit(model, original, batches, trial, cuts)
        if residual == "heads":
            notes.append(
                f"the hidden width (the residual stream the attention output projections write) "
                f"was pruned in step with the attention heads, whole heads at a time (an "
                f"attention layer reshapes its output to its input's width): pruning it alone "
                f"broke the model ({first_why})"
            )
        report.notes.extend(notes)
        report.changes.extend(trial.changes)
        report.skips.extend(trial.skips)
        report.notes.extend(trial.notes)

    def _prune_channels(
        self,
        model: nn.Module,
        ctx: Context,
        report: Report,
        inputs: Inputs,
        kept: dict[str, str],
        residual: _Residual = "free",
        widened: list[str] | None = None,
        fixed_splits: bool = False,
    ) -> None:
        imp = as_importance(self.importance)
        # nn.MultiheadAttention ties its heads to the embedding width: work on a twin with
        # separate projections (the same function), turned back where no head was removed
        converted = to_head_prunable(model, inputs)
        graph = trace(model, inputs, time_limit=self.time_limit)
        plan = self._plan(model, graph, report, kept, residual, fixed_splits)
        _check_finite_weights(model, [*plan.channels, *plan.units, *plan.heads])
        hidden_before = _hidden_widths(model, plan.attention)
        if widened is not None:
            widened.extend(s.o for s in plan.attention if s.o in plan.channels)
            widened.extend(p for p in plan.writers if p in plan.channels)
        stats = self._stats(model, ctx, imp, plan.all_layers)
        before = {p: (shape_of(m), _shapes(m), _heads(plan, p)) for p, m in model.named_modules()}
        named = dict(model.named_modules())
        widths = {p: out_width(named[p]) for p in plan.channels}
        target = self._target
        if target is None:
            _prune_model(model, inputs, graph, plan, self, imp, stats, self.ratio or 0.0)
        else:
            self._prune_to_target(model, inputs, target, plan, imp, stats, report, graph)
        for p, m in model.named_modules():
            if p not in before:
                continue
            old_desc, old_shapes, old_heads = before[p]
            heads = _heads(plan, p)
            if old_shapes != _shapes(m) or old_heads != heads:
                details = (
                    {"heads": f"{old_heads}->{heads}"}
                    if heads is not None and old_heads != heads
                    else {}
                )
                report.changed(p, "pruned", old_desc, shape_of(m), **details)
        if target is None and self.select is not None:
            self._say_whole(model, plan, widths, report)
        for spec in plan.attention:
            if spec.path in plan.heads and before.get(spec.path, (0, 0, None))[2] == spec.heads:
                per = (
                    "" if spec.kv_heads == spec.heads else f" per key/value group of {spec.groups}"
                )
                report.skipped(
                    spec.path,
                    f"keeps its {spec.heads} heads: the ratio removes no whole head{per} "
                    f"(a larger ratio, or macs=/params= targets, can)",
                )
        for note in sync_hidden_sizes(model, plan.attention, hidden_before):
            report.note(note)
        for note in update_hf_config(model, plan.attention):
            report.note(note)
        back_to_torch(model, converted)

    def _say_whole(
        self, model: nn.Module, plan: _Plan, widths: dict[str, int | None], report: Report
    ) -> None:
        """A selected layer whose channels all stayed is said, with why (never a silent
        no-op): its ratio removes none, or its group reaches a layer left as it is."""
        named = dict(model.named_modules())
        said = {s.path for s in report.skips}
        for p, ratio in plan.channels.items():
            n = widths.get(p)
            if p in said or n is None or out_width(named[p]) != n:
                continue
            if not (self.ratio if ratio is None else ratio):
                continue
            why = (
                "its channels all stayed (its ratio and round_to remove none, or they reach a "
                "layer left as it is, which holds them whole)"
            )
            report.skipped(p, f"selected, but {why}")

    # -- planning -------------------------------------------------------------------------------
    def plan(self, model: nn.Module, example_inputs: Any) -> PrunePlan:
        """What ``apply`` would remove, without changing the model: a structural dry run.

        Works on models built on the ``meta`` device (no weights allocated), so a large model's
        pruning can be planned before it is loaded. Only ``structure="channels"`` with
        ``ratio=`` or per-module ratios can be planned (targets need real pruning to measure).

        Returns:
            A :class:`PrunePlan`: heads and channels before and after, per group, and the
            modules left alone with reasons.
        """
        if self.structure != "channels" or self.macs is not None or self.params is not None:
            raise ValueError(
                "Prune.plan: only structure='channels' with ratio= (or per-module ratios) can be "
                "planned without pruning."
            )
        from ..base.inputs import as_inputs

        inputs = as_inputs(example_inputs)
        if inputs is None:
            raise TypeError("Prune.plan: example_inputs is required.")
        snap = Snapshot(model, copy_tensors=False)  # the attention twins are put back after
        try:
            _unpack(model)  # packed sparse layers planned as the dense layers they stand for
            to_head_prunable(model, inputs)
            return self._plan_dry(model, inputs)
        finally:
            snap.restore()

    def _plan_dry(self, model: nn.Module, inputs: Any) -> PrunePlan:
        graph = trace(model, inputs, time_limit=self.time_limit)
        report = Report("Prune.plan")
        plan = self._plan(model, graph, report)
        named = dict(model.named_modules())
        groups = graph.groups(ignored=plan.frozen)
        ratio = self.ratio or 0.0
        channels = []
        for g in groups:
            if g.root not in plan.channels:
                continue
            r = plan.channels[g.root] if plan.channels[g.root] is not None else ratio
            keep = _kept(g.channels, r, self.round_to)
            channels.append((g.root, g.channels, keep, [p for p, _ in g.members]))
        for mlp in graph.fused_mlps:
            if mlp.fused in plan.units:
                value = plan.units[mlp.fused]
                keep = mlp.units - mlp.removable(
                    value if value is not None else ratio, self.round_to
                )
                members = [mlp.fused] if isinstance(mlp, ExpertBankSpec) else [mlp.fused, mlp.down]
                channels.append((mlp.fused, mlp.units, keep, members))
        heads = []
        for path, value in plan.heads.items():
            spec = next(s for s in plan.attention if s.path == path)
            r = value if value is not None else ratio
            heads.append((path, spec.heads, spec.heads - spec.removable(r), spec.kv_heads))
        del named
        return PrunePlan(channels, heads, [(s.path, s.reason) for s in report.skips], graph.seconds)

    def _plan(
        self,
        model: nn.Module,
        graph: Graph,
        report: Report,
        kept: dict[str, str] | None = None,
        residual: _Residual = "free",
        fixed_splits: bool = False,
    ) -> _Plan:
        named = dict(model.named_modules())
        outputs = set(graph.output_layers())
        kept = kept or {}
        attention = [s for s in graph.attention if not any(p in kept for p in s.projections)]
        mlps = [
            s
            for s in graph.fused_mlps
            if s.fused not in kept and (isinstance(s, ExpertBankSpec) or s.down not in kept)
        ]
        proj = {p for s in graph.attention for p in s.projections}
        if residual != "kept":
            # an output projection's channels are the hidden width (the residual stream), a
            # group like a ResNet's residual channels; its heads are pruned on the input side
            proj -= {s.o for s in attention}
        proj |= {s.fused for s in graph.fused_mlps}
        unknown_attention = graph.unknown_attention()
        writers: set[str] = set()
        if residual != "kept":
            # attention whose heads stay still writes the hidden width through its output
            # projection: that layer follows the width (its inputs, the heads, stay), like the
            # output projections of attention pruned by heads (kept with them if that breaks)
            writers = _attention_writers(model, graph.inputs, unknown_attention)
            for p in writers:
                unknown_attention.pop(p, None)
        unknown = {**unknown_attention, **graph.fused_mlp_skips, **kept}
        roots = root_types()
        layer_paths = [p for p in graph.layers() if isinstance(named[p], roots)]
        channel_roots = [p for p in layer_paths if p not in proj and p not in unknown]
        unknown = {**unknown, **graph.dynamic_split_roots(channel_roots, fixed_splits)}
        channel_roots = [p for p in channel_roots if p not in unknown]
        head_keys = {(s.q or s.qkv): s for s in attention}
        unit_keys = {s.fused: s for s in mlps}
        keys = set(channel_roots) | set(head_keys) | set(unit_keys)
        eligible = [(p, named[p]) for p in named if p in keys]
        explicit = set()
        sel = normalize_selector(self.select)
        if sel is not None:
            explicit = {k for k, _ in sel if isinstance(k, str) and not k.startswith("re:")}
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p in list(chosen):
            if p in outputs and p not in explicit:
                del chosen[p]
        tie_skipped: set[str] = set()
        ties: dict[Any, list[str]] = {}
        for key, spec in head_keys.items():
            if spec.extra.get("tie") is not None:
                ties.setdefault(spec.extra["tie"], []).append(key)
        for tied in ties.values():  # T5: one position bias indexes the heads of every layer
            if any(k in chosen for k in tied) and not all(k in chosen for k in tied):
                for k in tied:
                    if chosen.pop(k, "absent") != "absent":
                        tie_skipped.add(k)
                        report.skipped(
                            head_keys[k].path,
                            "its heads index one position bias with "
                            f"{len(tied) - 1} other attention layers, not all of them selected",
                        )
        followers, blocked = self._co_producers(
            model, graph, chosen, channel_roots, head_keys, unit_keys, outputs - explicit
        )
        if blocked and len(blocked) == len(chosen):
            p, partners = next(iter(blocked.items()))
            raise ValueError(
                f"Prune: {p} writes its channels together with {', '.join(partners[:3])} (not "
                f"selected, excluded, or in other modules: a residual stream); pruning it alone "
                f"would change nothing. Select every writer of those channels."
            )
        for p, partners in blocked.items():  # it would be a no-op: say so instead
            del chosen[p]
            more = f" and {len(partners) - 3} more" if len(partners) > 3 else ""
            report.skipped(
                p,
                f"its channels are written with {', '.join(partners[:3])}{more} (not selected, "
                f"or in other modules: a residual stream): select every writer to prune them",
            )
        for p in channel_roots:
            if p in blocked:
                continue
            if p in followers:
                continue
            if p in outputs and p not in chosen:
                report.skipped(p, "produces the model output (its channels are the output's)")
            elif p not in chosen:
                report.skipped(p, "not selected" if self.select is not None else "excluded")
        for p, reason in unknown.items():
            report.skipped(p, reason)
        for key, spec in head_keys.items():
            if key not in chosen and key not in tie_skipped:
                report.skipped(
                    spec.path, "attention not selected" if self.select is not None else "excluded"
                )
        for key in unit_keys:
            if key not in chosen:
                report.skipped(key, "not selected" if self.select is not None else "excluded")
        if not chosen and self.select is None and not self.exclude:
            raise _NothingToPrune  # every candidate is skipped with its reason: a no-op, said
        if not chosen:
            raise ValueError(
                "Prune: no layer left to prune after select/exclude; every candidate produces "
                "the model output, is excluded, or is an attention projection nnslim cannot "
                "prune by heads."
            )
        heads = {head_keys[p].path: chosen[p] for p in chosen if p in head_keys}
        units = {p: chosen[p] for p in chosen if p in unit_keys}
        banks = [p for p in units if isinstance(unit_keys[p], ExpertBankSpec)]
        if banks and self.importance != "l2":
            report.note(
                f"the units of {len(banks)} mixture-of-experts bank(s) are ranked by their L2 "
                f"weight magnitude, not by importance={self.importance!r} (nnslim collects no "
                f"per-expert statistics)"
            )
        channels = {p: v for p, v in chosen.items() if p not in head_keys and p not in unit_keys}
        frozen = [p for p in layer_paths if p not in channels and p not in followers] + [
            p for p, m in named.items() if isinstance(m, nn.MultiheadAttention)
        ]
        coupled: dict[str, int] = {}
        if residual == "heads":
            coupled = _coupled_streams(named, attention, heads)
            if not coupled:
                raise _NotCoupled
        return _Plan(attention, heads, channels, frozen, layer_paths, units, coupled, writers)

    def _co_producers(
        self,
        model: nn.Module,
        graph: Graph,
        chosen: dict[str, Any],
        channel_roots: list[str],
        head_keys: dict[str, Any],
        unit_keys: dict[str, Any],
        outputs: set[str] | frozenset[str] = frozenset(),
    ) -> tuple[set[str], dict[str, list[str]]]:
        """The layers that write a selected layer's channels with it, in the same module (an
        MLP's up projection beside its gate): they lose the same channels, so they follow
        the selection instead of freezing the group (which left it unpruned, a silent no-op).
        Writers elsewhere (a residual stream: every block's output projections) or excluded
        by name do not follow: the selected layer is returned with them, to be left and
        said (selecting a block's down projection does not prune the residual stream)."""
        roots = [p for p in chosen if p not in head_keys and p not in unit_keys]
        if self.select is None or not roots:
            return set(), {}
        named = dict(model.named_modules())
        eligible = set(channel_roots)
        if self.exclude is not None:
            eligible = {
                p
                for p, _ in self.resolve(
                    model, None, self.exclude, eligible=[(p, named[p]) for p in channel_roots]
                )
            }
        out: set[str] = set()
        blocked: dict[str, list[str]] = {}
        writers = set(channel_roots) | set(roots)
        for info in graph.groups():
            outs = [p for p, kind in info.members if kind == "out" and p in writers]
            mine = [p for p in outs if p in roots]
            if not mine:
                continue
            # a depthwise convolution in the group maps each channel to itself: it follows
            # the channels it reads wherever it sits (it does not co-write them)
            each = [
                p
                for p in outs
                if p not in chosen
                and p in eligible
                and p not in outputs  # the model's output keeps its width unless selected
                and maps_each_channel(named[p])
            ]
            out.update(each)
            partners = [p for p in outs if p not in chosen and p not in each]
            if not partners:
                continue
            if in_one_module(outs) and all(p in eligible and p not in outputs for p in partners):
                out.update(partners)
            else:
                for p in mine:
                    blocked[p] = partners
        return out, blocked

    def _stats(
        self, model: nn.Module, ctx: Context, imp: Importance, layers: list[str]
    ) -> dict[str, LayerStats]:
        if not (imp.needs_grad or imp.needs_activations):
            return {}
        batches = ctx.require_calibration(
            f"Prune(importance={self.importance!r})", "to measure gradients or activations"
        )
        named = dict(model.named_modules())
        watched = {p: named[p] for p in layers if hasattr(named[p], "weight")}
        return collect(model, batches, watched, norms=imp.needs_activations, grads=imp.needs_grad)

    def _prune_to_target(
        self,
        model: nn.Module,
        inputs: Inputs,
        target: Target,
        plan: _Plan,
        imp: Importance,
        stats: dict[str, LayerStats],
        report: Report,
        graph: Graph | None = None,
    ) -> None:
        from ..profiling.profiler import profile

        metric = target.metric
        base = target.measure(profile(model, inputs, memory=False))
        goal = target.goal(base)

        def at(ratio: float) -> float:
            trial = copy_model(model)
            with not_recording_cuts():  # a trial copy's cuts are not the model's
                _prune_model(trial, inputs, None, plan, self, imp, stats, ratio)
            try:
                return float(target.measure(profile(trial, inputs, memory=False)))
            except ValueError:
                failed = failing_module(trial, inputs)
                if failed is None:
                    raise
                raise _ForwardFailed(*failed) from None

        # the ratio whose pruned model meets the target within 1% of the original: a search
        # over the bracket [lo, hi] (lo misses the target, hi meets it) that interpolates
        # between its ends (regula falsi, Illinois variant) and halves it when interpolation
        # stalls; the first guess assumes a layer's cost scales as the product of its two
        # pruned widths
        lo, f_lo, hi, f_hi = 0.0, float(base), 0.99, None
        best, best_value = None, None
        mid = min(max(1.0 - math.sqrt(target.fraction), 0.01), 0.95)
        last_side, stale = 0, 0
        for _ in range(10):
            value = at(mid)
            if value <= goal:
                best, best_value, hi, f_hi = mid, value, mid, value
                # met within 1%, or no ratio in between changes a channel count
                if (goal - value) / base < 0.01 or hi - lo < 0.006:
                    break
                side = 1
            else:
                lo, f_lo = mid, value
                side = -1
                if f_hi is not None and hi - lo < 0.006:
                    break
            stale = stale + 1 if side == last_side else 0
            last_side = side
            if f_hi is None:  # nothing met yet: extrapolate from lo by the same product rule
                mid = min(max(1.0 - (1.0 - lo) * math.sqrt(goal / f_lo), lo + 0.005), 0.99)
            elif stale >= 2 or f_lo == f_hi:
                mid = (lo + hi) / 2
                stale = 0
            else:
                g_lo, g_hi = f_lo - goal, f_hi - goal
                if stale == 1:  # Illinois: the end kept twice counts half
                    g_lo, g_hi = (g_lo / 2, g_hi) if side == 1 else (g_lo, g_hi / 2)
                mid = lo + (hi - lo) * g_lo / (g_lo - g_hi)
                if not lo < mid < hi:
                    mid = (lo + hi) / 2
        if best is None:
            best = hi
            report.note(
                f"target {metric}={target.fraction} is not reachable with the selected layers; "
                f"pruned at "
                f"ratio {best:.3f}"
            )
        _prune_model(model, inputs, graph, plan, self, imp, stats, best)  # traced already
        if best_value is not None:
            report.note(
                f"ratio {best:.3f} gives {metric} {best_value / base:.3f} of the original "
                f"(target {target.fraction})"
            )

    # -- sparsity -------------------------------------------------------------------------------
    def _sparsify(
        self, model: nn.Module, ctx: Context, report: Report, imp: Importance, inputs: Inputs | None
    ) -> None:
        roots = root_types()
        named = dict(model.named_modules())
        if inputs is not None:
            outputs = set(output_layers_by_identity(model, inputs))
        else:
            outputs = set()
            report.note(
                "no example inputs: the layers producing the output were not detected; exclude "
                "the classifier or LM head explicitly if they must stay dense"
            )
        eligible = [(p, m) for p, m in named.items() if p and isinstance(m, roots)]
        sel = normalize_selector(self.select)
        explicit = (
            {k for k, _ in sel if isinstance(k, str) and not k.startswith("re:")} if sel else set()
        )
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p in list(chosen):
            if p in outputs and p not in explicit:
                del chosen[p]
                report.skipped(p, "produces the model output")
        for p, _ in eligible:
            if p not in chosen and p not in outputs:
                report.skipped(p, "not selected" if self.select is not None else "excluded")
        nm = parse_pattern(self.structure)
        if nm is not None:
            for p in list(chosen):
                w = named[p].weight
                row = w.shape[0] if is_hf_conv1d(named[p]) else w[0].numel()
                if row % nm[1]:
                    del chosen[p]
                    report.skipped(
                        p, f"input width {row} is not a multiple of {nm[1]} ({self.structure})"
                    )
        # a weight tied between layers is masked once, for all of them, or not at all
        owners: dict[str, list[str]] = {}
        for group in shared_parameters(model):
            paths = sorted({full.rpartition(".")[0] for _, n, full in group if n == "weight"})
            for q in paths:
                owners[q] = paths
        tied: list[str] = []
        for p in list(chosen):
            others = [q for q in owners.get(p, []) if q != p and q not in chosen]
            if others:
                del chosen[p]
                why = (
                    f"its weight is tied to {', '.join(others)}, which is not sparsified with it "
                    f"(select both, or neither)"
                )
                report.skipped(p, why)
                tied.append(f"{p}: {why}")
        if not chosen and self.select is None and not self.exclude:
            return  # every candidate is skipped with its reason: a no-op, said
        if not chosen:
            raise ValueError(
                "Prune: no layer left to sparsify after select/exclude"
                + (f" ({'; '.join(tied)})." if tied else ".")
            )
        _check_finite_weights(model, list(chosen))
        ratios = {p: (v if v is not None else self.ratio or 0.0) for p, v in chosen.items()}
        if self.allocation != "uniform":
            ratios = self._owl(model, ctx, report, list(chosen))
        if imp.needs_hessian:
            self._sparsegpt(model, ctx, report, imp, chosen, nm, ratios)
            return
        stats = self._stats(model, ctx, imp, list(chosen))
        layers = {p: named[p] for p in chosen}
        scores = {}
        for p, m in layers.items():
            st = stats.get(p)
            scores[p] = imp.score(
                m.weight,
                module=m,
                grad=st.grad if st else None,
                input_norm=st.input_norm if st else None,
            )
        if nm is not None:
            masks = {p: nm_mask(layers[p], s, *nm) for p, s in scores.items()}
        else:
            masks = unstructured_masks(
                layers, scores, ratios, imp, self.scope == "global", self.ratio or 0.0
            )
        first: dict[int, str] = {}  # tied layers take the mask of the first of them
        for p in masks:
            first.setdefault(id(layers[p].weight), p)
        new_weights: dict[int, nn.Parameter] = {}
        for p in list(masks):
            m = layers[p]
            keep = masks[first[id(m.weight)]]
            old = m._buffers.get(MASK_NAME)
            if old is not None:
                keep = keep & old.to(torch.bool)
            w = m.weight
            if id(w) not in new_weights:
                new_weights[id(w)] = nn.Parameter(
                    w.detach() * keep.to(w.dtype), requires_grad=w.requires_grad
                )
            m.weight = new_weights[id(w)]
            m.register_buffer(MASK_NAME, keep.to(torch.bool))
            zeros = 1.0 - float(keep.float().mean())
            report.changed(
                p,
                "sparsified",
                shape_of(m),
                f"{zeros:.1%} zeros",
                sparsity=round(zeros, 4),
                pattern=self.structure,
            )

    def _pack(self, model: nn.Module, report: Report, before: set[str]) -> None:
        """Pack the layers sparsified now (``pack=True``) and those packed ``before``."""
        from ..modules.sparse import SparseConv2d, SparseLinear

        changes = {c.path: c for c in report.changes}
        if self.pack:
            for c in report.changes:
                if "quantized" in c.action:
                    report.note(
                        f"{c.path}: int4 from SparseGPT's joint pass, its zeros stored as int4 "
                        f"codes, not packed (packing holds float weights)"
                    )
        shared = {
            full.rpartition(".")[0]
            for group in shared_parameters(model)
            for _, n, full in group
            if n == "weight"
        }
        named = dict(model.named_modules())
        for p, m in masked_modules(model):
            if p not in before and not (self.pack and p in changes):
                continue
            why = ""
            mask = m._buffers[MASK_NAME]
            w = m.weight
            kept = int(mask.sum())
            parent = named.get(p.rpartition(".")[0]) if "." in p else model
            if p in shared:
                why = "its weight is shared with another layer's"
            elif layer_skip_reason(m, parent) is not None:
                why = str(layer_skip_reason(m, parent))
            elif kept * w.element_size() + (mask.numel() + 7) // 8 >= w.numel() * w.element_size():
                why = "too few zeros: the kept weights and a bit per weight take no fewer bytes"
            elif is_linear(m):
                new: nn.Module = SparseLinear.from_dense(m, m._buffers[MASK_NAME])
            elif is_conv2d(m) and m.padding_mode == "zeros":
                new = SparseConv2d.from_dense(m, m._buffers[MASK_NAME])
            else:
                why = f"{type(m).__name__} is not a Linear or zero-padded Conv2d"
            if why:
                report.note(f"{p}: kept dense with its mask, not packed ({why})")
                continue
            replace_module(model, p, new)
            c = changes.get(p)
            if c is not None:
                c.after = f"{c.after}, packed" if c.after else "packed"
                c.details["packed"] = True

    def _owl(
        self, model: nn.Module, ctx: Context, report: Report, paths: list[str]
    ) -> dict[str, float]:
        """Per-layer ratios from OWL, measured on the model before any of it is pruned."""
        owl = self.allocation if isinstance(self.allocation, OWL) else OWL()
        batches = ctx.require_calibration(
            "Prune(allocation='owl')", "to measure the outliers of |w| * ||x||"
        )
        named = dict(model.named_modules())
        layers = {p: named[p] for p in paths}
        stats = collect(model, batches, layers, norms=True)
        norms = {p: (stats[p].input_norm if p in stats else None) for p in paths}
        blocks = blocks_of(paths, named)
        ratios, outliers = owl_ratios(layers, norms, blocks, self.ratio or 0.0, owl)
        per_block = {blocks[p]: r for p, r in ratios.items()}
        lo, hi = min(per_block.values()), max(per_block.values())
        report.note(
            f"OWL: {len(per_block)} blocks pruned {lo:.1%} to {hi:.1%} (mean "
            f"{sum(per_block.values()) / len(per_block):.1%}) by their outlier ratios "
            f"{min(outliers.values()):.2%} to {max(outliers.values()):.2%} (threshold "
            f"{owl.threshold:g} x mean)"
        )
        return ratios

    def _sparsegpt(
        self,
        model: nn.Module,
        ctx: Context,
        report: Report,
        imp: Any,
        chosen: dict[str, float | None],
        nm: tuple[int, int] | None,
        ratios: dict[str, float],
    ) -> None:
        """SparseGPT on the chosen Linear layers, block by block (:func:`run_sequential`):
        each block's Hessians are gathered on the outputs of the blocks already pruned."""
        from ..core.calibrate import run_sequential
        from .sparsegpt import sparsegpt

        named = dict(model.named_modules())
        layers: dict[str, nn.Module] = {}
        for p in chosen:
            if is_linear(named[p]):
                layers[p] = named[p]
            else:
                report.skipped(
                    p, "importance='sparsegpt' updates Linear layers (from their input Hessian)"
                )
        if not layers:
            raise ValueError(
                "Prune(importance='sparsegpt'): no Linear layer (or Hugging Face Conv1D) among "
                "the selected layers; use importance='wanda' for convolutions."
            )
        # a weight shared by two layers would take two updates from two Hessians
        seen: dict[int, str] = {}
        for p in list(layers):
            other = seen.setdefault(id(layers[p].weight), p)
            if other != p:
                del layers[p]
                report.skipped(p, f"its weight is tied to {other}'s: SparseGPT updates it once")
        batches = ctx.require_calibration(
            "Prune(importance='sparsegpt')", "to measure each layer's input Hessian"
        )

        few: list[str] = []

        def process(paths: list[str], stats: dict[str, LayerStats]) -> None:
            for p in paths:
                m, st = layers[p], stats.pop(p)
                if st.gram is None or st.rows == 0:
                    raise ValueError(
                        f"Prune(importance='sparsegpt'): module {p} ({shape_of(m)}) saw no "
                        f"calibration input; it is not on the path of the calibration batches."
                    )
                w = m.weight
                conv1d = is_hf_conv1d(m)
                rows = w.detach().t() if conv1d else w.detach()
                gs = None
                if imp.int4_group_size is not None:
                    gs = int4_group_size(rows.shape[1], imp.int4_group_size)
                    if rows.shape[1] % gs:  # none divides: Quantize would pad, SparseGPT cannot
                        raise ValueError(
                            f"Prune(importance=SparseGPT(int4_group_size=...)): module {p} "
                            f"({shape_of(m)}) is {rows.shape[1]} inputs wide, which no int4 "
                            f"group of 32, 64 or 128 divides; exclude it (exclude=[{p!r}])."
                        )
                prior = m._buffers.get(MASK_NAME)
                if prior is not None:
                    prior = prior.t() if conv1d else prior
                hessian, st.gram = st.gram, None
                if st.rows < hessian.shape[0]:
                    few.append(f"{p}: {st.rows} rows for {hessian.shape[0]} inputs")
                try:
                    new, keep, int4 = sparsegpt(
                        rows,
                        hessian,
                        sparsity=ratios[p],
                        nm=nm,
                        keep=prior,
                        block_size=imp.block_size,
                        damp=imp.damp,
                        group_size=gs,
                        consume=True,
                    )
                except ValueError as e:
                    raise ValueError(f"Prune(importance='sparsegpt'): module {p}: {e}") from None
                if int4 is not None and gs is not None:
                    q = Int4Linear.from_codes(m, *int4, gs, zero_point="integer")
                    q._take_float(w)
                    zeros = 1.0 - float(keep.float().mean())
                    report.changed(
                        p,
                        "sparsified and quantized (SparseGPT + int4)",
                        shape_of(m),
                        shape_of(q),
                        sparsity=round(zeros, 4),
                        pattern=self.structure,
                        bits=4,
                        group_size=gs,
                        zero_point="integer",
                        calibration_rows=st.rows,
                    )
                    replace_module(model, p, q)
                    continue
                if conv1d:
                    new, keep = new.t().contiguous(), keep.t().contiguous()
                m.weight = nn.Parameter(new.to(w.dtype), requires_grad=w.requires_grad)
                m.register_buffer(MASK_NAME, keep)
                zeros = 1.0 - float(keep.float().mean())
                report.changed(
                    p,
                    "sparsified (SparseGPT)",
                    shape_of(m),
                    f"{zeros:.1%} zeros",
                    sparsity=round(zeros, 4),
                    pattern=self.structure,
                    calibration_rows=st.rows,
                )

        run_sequential(
            model, batches, layers, process, gram=True, true_sequential=imp.true_sequential
        )
        if few:
            report.note(
                f"SparseGPT: {len(few)} layer(s) saw fewer calibration rows (tokens) than "
                f"inputs ({few[0]}): their Hessians are singular (damped), and the update can "
                f"fit the calibration batches more than the model; give more calibration data"
            )


def _refit(
    model: nn.Module,
    original: nn.Module,
    batches: list[Inputs],
    report: Report,
    cuts: dict[int, tuple[nn.Module, torch.Tensor]],
) -> None:
    """Refit (:func:`~nnslim.transforms.refit.refit_readers`) every layer of the pruned
    ``model`` whose inputs lost channels against the same layer of ``original`` (its kept
    output rows, from ``cuts``); those that cannot be refit are named in a note with the
    reason."""
    named = dict(model.named_modules())
    before = dict(original.named_modules())
    shared: dict[int, int] = {}
    for m in model.modules():
        for t in m._parameters.values():
            if t is not None:
                shared[id(t)] = shared.get(id(t), 0) + 1
    paths: list[str] = []
    left: dict[str, str] = {}
    rows: dict[str, torch.Tensor] = {}
    for p, m in named.items():
        o = before.get(p)
        w, w0 = getattr(m, "weight", None), getattr(o, "weight", None)
        if isinstance(m, nn.Embedding):
            continue  # a table: its width is its output, it reads no channels
        if not isinstance(w, torch.Tensor) or not isinstance(w0, torch.Tensor) or w.dim() < 2:
            # a module of its own parameters (an expert bank's 3-D weights) that changed shape
            own = {k: t for k, t in m._parameters.items() if t is not None and t.dim() >= 2}
            was = {
                k: t for k, t in (o._parameters if o is not None else {}).items() if t is not None
            }
            if any(k not in was or was[k].shape != t.shape for k, t in own.items()):
                left[p] = f"a {type(m).__name__} (only Linear, Conv1D and Conv2d layers are refit)"
            continue
        (n_out, n_in), (n_out0, n_in0) = widths(m), widths(o)
        if n_in == n_in0:
            continue  # its inputs kept their channels
        why = refittable(m) or (
            "its weight is shared with another layer" if shared.get(id(w), 0) > 1 else None
        )
        if why is None and type(o) is not type(m):
            why = f"it was a {type(o).__name__} before"
        if why is None and n_out != n_out0:
            cut = cuts.get(id(m))
            if cut is None or cut[0] is not m or cut[1].numel() != n_out:
                why = "which of its outputs it keeps was not recorded"
            else:
                rows[p] = cut[1]
        if why is not None:
            left[p] = why
        else:
            paths.append(p)
    if left:
        say_left(report, "not refit after pruning", left)
    if not paths:
        return
    errors = refit_readers(model, original, paths, batches, report, rows=rows)
    for change in report.changes:
        if change.path in errors:
            before, after, damp = errors[change.path]
            change.details["refit_error"] = (round(before, 4), round(after, 4))
            change.details["refit_damp"] = damp


def _check_finite_weights(model: nn.Module, paths: list[str]) -> None:
    """NaN or Inf weights would rank channels and weights at random: refuse them, by module."""
    for p in paths:
        m = model.get_submodule(p)
        for name, t in m.named_parameters():
            if not all_finite(t):
                raise ValueError(
                    f"Prune: module {p} ({shape_of(m)}) has NaN or Inf in {name}; fix or exclude "
                    f"it (exclude=[{p!r}])."
                )


def _kept(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels kept by torch-pruning's local rule (including its rounding)."""
    keep = int(channels * (1 - ratio))
    if round_to and keep % round_to:
        keep += round_to - keep % round_to
    return min(max(keep, 1), channels)


@dataclass
class PrunePlan:
    """The result of :meth:`Prune.plan`.

    Attributes:
        channels: ``(root, channels, kept, coupled layers)`` per group to prune.
        heads: ``(attention, heads, kept heads, key/value heads)`` per attention module.
        skips: ``(module, reason)`` for every candidate left alone.
        trace_seconds: time spent tracing.
    """

    channels: list[tuple[str, int, int, list[str]]]
    heads: list[tuple[str, int, int, int]]
    skips: list[tuple[str, str]]
    trace_seconds: float

    def table(self, max_rows: int = 20) -> str:
        from ..base.table import format_table

        parts = []
        if self.heads:
            rows = [[p, h, k, kv] for p, h, k, kv in self.heads[:max_rows]]
            parts.append(format_table(["attention", "heads", "kept", "kv heads"], rows))
        if self.channels:
            rows = [[r, c, k, len(m)] for r, c, k, m in self.channels[:max_rows]]
            parts.append(format_table(["group root", "channels", "kept", "coupled"], rows))
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Plan:
    attention: list[AttentionSpec]
    heads: dict[str, Any]  # attention path -> per-module ratio (or None)
    channels: dict[str, Any]  # root layer path -> per-module ratio (or None)
    frozen: list[str]  # layers torch-pruning must not prune
    all_layers: list[str]
    units: dict[str, Any] = field(default_factory=dict)  # fused gate/up layer -> ratio (or None)
    # attention path -> hidden width, where that width follows the heads (whole heads at a time)
    coupled: dict[str, int] = field(default_factory=dict)
    # output projections of attention whose heads stay, pruned as the hidden width
    writers: set[str] = field(default_factory=set)


#: the hidden width of attention models: pruned on its own ("free"), in step with the heads
#: ("heads": attention that reshapes its output to its input's width), or left alone ("kept")
_Residual = Literal["free", "heads", "kept"]


def _hidden_kept(why: str, with_heads: str | None = None) -> str:
    """The note for a hidden width left whole: why pruning it broke the model (and, where
    that was tried, why pruning it in step with the heads did too)."""
    note = (
        f"the hidden width (the residual stream the attention output projections write) keeps "
        f"its channels: pruning it broke the model ({why})"
    )
    if with_heads is not None:
        note += f", and so did pruning it in step with the attention heads ({with_heads})"
    return note


class _NotCoupled(Exception):
    """No attention layer's heads can set the hidden width: keep it instead."""


def _coupled_streams(
    named: dict[str, nn.Module], attention: list[AttentionSpec], heads: dict[str, Any]
) -> dict[str, int]:
    """Attention layers whose heads can set the hidden width, with that width: multi-head (no
    GQA) layers selected for head pruning whose heads span exactly the width their output
    projection writes. Layers writing one width (one residual stream) share a head size."""
    out: dict[str, int] = {}
    for s in attention:
        width = out_width(named[s.o])
        if s.path in heads and s.kv_heads == s.heads and width == s.heads * s.head_dim:
            out[s.path] = width
    by_width: dict[int, set[int]] = {}
    for s in attention:
        if s.path in out:
            by_width.setdefault(out[s.path], set()).add(s.head_dim)
    return {p: w for p, w in out.items() if len(by_width[w]) == 1}


#: how many times Prune keeps the layers of a module whose forward failed, and tries again
_RETRIES = 3


class _NothingToPrune(Exception):
    """The plan left every candidate alone (each skip carries its reason)."""


class _GroupFailed(Exception):
    """torch-pruning raised while scoring or pruning the group rooted at ``roots``."""

    def __init__(self, roots: list[str], error: str) -> None:
        super().__init__(f"{', '.join(roots)}: {error}")
        self.roots, self.error = roots, error


def _too_large_is_a_group_failure(paths: dict[int, str]) -> Any:
    """Wrap a call so that a group torch-pruning builds without bound from a root the plan
    reached only through another group (timm's ReXNet) is a :class:`_GroupFailed` of that
    root, which Prune keeps, instead of a failure of the model. ``paths``: module id -> path."""

    def wrap(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except GroupTooLarge as e:
                if id(e.root) not in paths:
                    raise
                raise _GroupFailed(
                    [paths[id(e.root)]], f"its group grows past {MAX_GROUP_DEFAULT} layers"
                ) from e

        return call

    return wrap


def _step(
    pruner: Any, scorer: GroupScorer, paths: dict[int, str], guarded: Any, recording: bool = False
) -> None:
    """One pruning step, group by group; an error from inside torch-pruning (a layer its
    pruning function cannot shrink, a grouped layer whose importance does not divide)
    becomes :class:`_GroupFailed` naming the group's root, so Prune keeps that group and
    retries instead of failing the model. ``guarded``: :func:`_too_large_is_a_group_failure`
    over ``paths``."""

    def roots(group: Any) -> list[str]:
        if group is None or not len(group):
            return []
        m = group[0].dep.target.module
        return [paths[id(m)]] if id(m) in paths else []

    def failed(group: Any, e: Exception) -> _GroupFailed:
        return _GroupFailed(roots(group), first_line(e))

    groups = guarded(pruner.step)(interactive=True)
    take = guarded(next)
    while True:
        try:
            group = take(groups)
        except StopIteration:
            return
        except TraceError:
            raise
        except Exception as e:
            raise failed(scorer.last_group, e) from e
        try:
            masked = _masks_in(group, recording=recording)
            group.prune()
            _follow_masks(masked)
        except TraceError:
            raise
        except Exception as e:
            raise failed(group, e) from e


def in_one_module(writers: Any) -> bool:
    """Whether the layers writing a channel group's channels sit in one module (an MLP's gate
    and up projections): then they are pruned together, whichever is selected. Writers in
    several modules (every block writing a residual stream) are a stream Prune takes whole or
    not at all; Auto leaves such groups for the same reason."""
    return len({p.rpartition(".")[0] for p in writers}) <= 1


def _complement(n: int, gone: list[int]) -> torch.Tensor:
    """The indices of ``range(n)`` not in ``gone``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().flatten()


def _masks_in(group: Any, recording: bool = False) -> list[tuple[nn.Module, str, list[int]]]:
    """``(module, "out" | "in", removed indices)`` for each layer of a torch-pruning group that
    holds a sparsity mask (unstructured or N:M pruning before): its mask must lose the same
    rows or columns as its weight (:func:`~nnslim.modules.masks.cut_mask`). With
    ``recording``, every layer of the group (whose cuts are being recorded)."""
    from torch_pruning import _helpers

    out = []
    for dep, idxs in group._group:
        m = dep.target.module
        if not isinstance(m, nn.Module) or not (
            isinstance(m._buffers.get(MASK_NAME), torch.Tensor) or recording
        ):
            continue
        if len(idxs) and isinstance(idxs[0], _helpers._HybridIndex):
            idxs = _helpers.to_plain_idxs(idxs)
        name = getattr(dep.handler, "__name__", "")
        if "out_channels" in name or "in_channels" in name:
            side = "out" if "out_channels" in name else "in"
            out.append((m, side, sorted({int(i) for i in idxs})))
    return out


def _follow_masks(masked: list[tuple[nn.Module, str, list[int]]]) -> None:
    """Cut each mask like its weight (after the group was pruned)."""
    for m, side, gone in masked:
        cut_mask(m, side, gone)


def _check_masks(model: nn.Module) -> None:
    """Every sparsity mask still has its weight's shape after channel pruning."""
    for p, m in masked_modules(model):
        if tuple(m._buffers[MASK_NAME].shape) != tuple(m.weight.shape):
            raise ValueError(
                f"Prune: module {p} ({type(m).__name__}): its sparsity mask "
                f"{tuple(m._buffers[MASK_NAME].shape)} no longer matches its pruned weight "
                f"{tuple(m.weight.shape)}; prune its channels before sparsifying it."
            )


def __init__(self, where: str, error: str) -> None:
    super().__init__(f"{where}: {error}")
    self.where, self.error = where, error


class _ForwardFailed(Exception):
    """A pruned trial copy whose forward failed inside ``where``."""

    def __init__(self, where: str, error: str) -> None:
        super().__init__(f"{where}: {error}")
        self.where, self.error = where, error


def _layers_inside(model: nn.Module, where: str, kept: dict[str, str]) -> list[str]:
    """Prunable layers inside ``where`` (or its parent, when ``where`` is a layer itself) not
    already kept."""
    target = model.get_submodule(where) if where else model
    if isinstance(target, root_types()) and where:
        where = where.rpartition(".")[0]
        target = model.get_submodule(where) if where else model
    if target is model:
        return []  # the whole model: keeping everything is not a fix
    # every module of the same class runs the same forward, so reads the same constants
    out: list[str] = []
    for path, m in model.named_modules():
        if type(m) is not type(target) or not path:
            continue
        for p, layer in m.named_modules():
            full = f"{path}.{p}" if p else path
            if isinstance(layer, root_types()) and full not in kept:
                out.append(full)
    return out


def _attention_writers(model: nn.Module, inputs: Inputs, projections: dict[str, str]) -> set[str]:
    """Of ``projections`` (inside attention modules whose heads stay), those writing their
    module's output (its output projection), per module class."""
    if is_meta(model):
        return set()
    by_class: dict[type, str] = {}
    for p in projections:
        parent = p.rpartition(".")[0]
        if parent:
            by_class.setdefault(type(model.get_submodule(parent)), parent)
    out: set[str] = set()
    for where in by_class.values():
        out |= _output_writers(model, inputs, where)
    return {p for p in out if p in projections}


def _output_writers(model: nn.Module, inputs: Inputs, where: str) -> set[str]:
    """Layers inside every module of ``where``'s class whose output tensor is (a view of)
    that module's output, found with forward hooks on one forward."""
    target = model.get_submodule(where)
    if isinstance(target, root_types()):
        return set()
    modules = {path: m for path, m in model.named_modules() if type(m) is type(target) and path}
    layers = {
        f"{path}.{p}": layer
        for path, m in modules.items()
        for p, layer in m.named_modules()
        if p and isinstance(layer, root_types())
    }
    calls: list[tuple[str, Any, list[torch.Tensor]]] = []
    try:
        produced, returned, _ = _storages_of(model, inputs, layers, modules, calls)
    except Exception:
        return set()
    found = {produced[q] for q in returned if q in produced}
    return found | _last_writers(calls, modules, found)


def _last_writers(
    calls: list[tuple[str, Any, list[torch.Tensor]]],
    modules: dict[str, nn.Module],
    found: set[str],
) -> set[str]:
    """For modules whose output is no layer's output because they add their own residual
    (Bloom's ``dropout_add(dense(x), residual)``): the last layer run inside each, when the
    module's output is that layer's output plus one of the module's inputs. ``calls`` holds
    ``(path, output, inputs)`` of each layer and module as its forward ended, in order."""
    out: set[str] = set()
    done = 0
    for i, (path, result, args) in enumerate(calls):
        if path not in modules:
            continue
        inner = [c for c in calls[done:i] if c[0].startswith(path + ".") and c[0] not in modules]
        done = i + 1
        if not inner or any(c[0] in found for c in inner) or result is None:
            continue
        last, written, _ = inner[-1]
        if written is None or written.shape != result.shape:
            continue
        scale = float(result.detach().abs().max()) or 1.0
        for a in args:
            if a.shape == result.shape and torch.allclose(
                written + a, result, rtol=1e-4, atol=1e-5 * scale
            ):
                out.add(last)
                break
    return out


def _storages_of(
    model: nn.Module,
    inputs: Inputs,
    layers: dict[str, nn.Module],
    modules: dict[str, nn.Module] | None = None,
    calls: list[tuple[str, Any, list[torch.Tensor]]] | None = None,
) -> tuple[dict[int, str], set[int], Any]:
    """One forward with hooks: ``(storage of each layer's output -> its path, storages of the
    outputs of modules, the model's output)``. A tuple output counts by its first tensor.
    Every output is held until the forward ends, so no storage is freed and reused by another
    tensor meanwhile (a reused address would match the wrong layer). ``calls``, if given,
    receives ``(path, output, tensor inputs)`` of each layer (no inputs) and module as its
    forward ends."""
    produced: dict[int, str] = {}
    returned: set[int] = set()
    alive: list[torch.Tensor] = []

    def first(out: Any) -> torch.Tensor | None:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        return out if isinstance(out, torch.Tensor) else None

    def ptr(out: Any) -> int | None:
        t = first(out)
        if t is None:
            return None
        alive.append(t)
        return t.untyped_storage().data_ptr()

    def layer_hook(_m: nn.Module, _a: Any, out: Any, path: str) -> None:
        q = ptr(out)
        if q is not None:
            produced[q] = path
        if calls is not None:
            calls.append((path, first(out), []))

    def module_hook(_m: nn.Module, args: Any, kwargs: Any, out: Any, path: str) -> None:
        q = ptr(out)
        if q is not None:
            returned.add(q)
        if calls is not None:
            given = [*args, *kwargs.values()]
            calls.append((path, first(out), [a for a in given if isinstance(a, torch.Tensor)]))

    handles = [
        m.register_forward_hook(functools.partial(layer_hook, path=p)) for p, m in layers.items()
    ]
    handles += [
        m.register_forward_hook(functools.partial(module_hook, path=p), with_kwargs=True)
        for p, m in (modules or {}).items()
    ]
    try:
        with preserved_state(model), torch.no_grad():
            out = call_for_analysis(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return produced, returned, out


def _same_place(model: nn.Module, where: str) -> list[str]:
    """``where`` and the modules at the same name under every module of its parent's class
    (they run the same forward: SegFormer's sequence-reduction norm in every stage)."""
    parent, _, leaf = where.rpartition(".")
    if not parent:
        return [where]
    cls = type(model.get_submodule(parent))
    named = dict(model.named_modules())
    return [f"{p}.{leaf}" for p, m in named.items() if type(m) is cls and f"{p}.{leaf}" in named]


def _heads(plan: _Plan, path: str) -> int | None:
    for s in plan.attention:
        if s.path == path:
            return s.heads
    return None


def _prune_model(
    model: nn.Module,
    inputs: Inputs,
    graph: Graph | None,
    plan: _Plan,
    cfg: Prune,
    imp: Importance,
    stats: dict[str, LayerStats],
    ratio: float,
) -> None:
    """Prune ``model`` (the original or a copy) at ``ratio``: channels, then attention heads."""
    named = dict(model.named_modules())
    by_id = {id(named[p]): st for p, st in stats.items() if p in named}
    ties = _ties(model)
    sizes = _vector_sizes(model)
    coupled = _heads_for_width(plan, ratio)
    if plan.channels:
        if graph is None or graph.model is not model:
            graph = trace(model, inputs, time_limit=cfg.time_limit)
        scorer = GroupScorer(imp, by_id, graph.dg)
        ignored = [named[p] for p in plan.frozen if p in named]
        per_layer = {named[p]: v for p, v in plan.channels.items() if v is not None and p in named}
        for spec in plan.attention:
            if spec.path in coupled:  # the hidden width loses exactly the removed heads' width
                width = plan.coupled[spec.path]
                n = coupled[spec.path] * spec.head_dim
                per_layer[named[spec.o]] = (n - 0.5) / width if n else 0.0
        with (
            preserve_modes(model),
            torch.enable_grad(),
            warnings.catch_warnings(),
            graph.dg.limit(graph.time_limit, "pruning channels"),
        ):
            warnings.simplefilter("ignore")
            paths = {id(m): p for p, m in named.items()}
            guarded = _too_large_is_a_group_failure(paths)
            pruner = guarded(Pruner)(
                graph.dg,
                importance=scorer,
                global_pruning=cfg.scope == "global",
                pruning_ratio=ratio,
                pruning_ratio_dict=per_layer or None,
                iterative_steps=cfg.steps,
                ignored_layers=ignored,
                round_to=cfg.round_to,
                root_module_types=list(root_types()),
            )
            for _ in range(cfg.steps):
                scorer.reset()
                _step(pruner, scorer, paths, guarded, cfg.refit)
    ran = {id(m) for m in graph.dg.module2node} if plan.channels and graph is not None else None
    _retie(model, ties, ran)
    _sync_shape_attrs(model, sizes)
    if plan.channels:
        _follow_input_widths(model, inputs, sizes)
    if plan.heads:
        sizes = _vector_sizes(model)
        specs = {s.path: s for s in find_attention(model)}
        done: set[str] = set()
        for path, value in plan.heads.items():
            spec = specs.get(path)
            if spec is None or path in done:
                continue
            # heads tied across layers (T5's shared position bias) are chosen once, together
            tie = spec.extra.get("tie")
            members = [s for s in specs.values() if tie is not None and s.extra.get("tie") == tie]
            members = members or [spec]
            done.update(s.path for s in members)
            r = value if value is not None else ratio
            n = coupled[path] if path in coupled else spec.removable(r)
            if n <= 0:
                continue
            scorer_ = GroupScorer(imp, by_id, None)
            scores = sum(s.head_scores(model, scorer_.element_scores) for s in members)
            remove = spec.choose(scores, n)
            for member in members:
                member.prune_heads(model, remove)
                for s in plan.attention:
                    if s.path == member.path:
                        s.heads, s.kv_heads = member.heads, member.kv_heads
        _sync_config_heads(list(specs.values()))
        _sync_shape_attrs(model, sizes)  # norms over the concatenated heads
    if plan.units:
        mlps: dict[str, Any] = {s.fused: s for s in find_fused_mlps(model, check=False)[0]}
        mlps.update({s.fused: s for s in find_expert_banks(model, check=False)[0]})
        for path, value in plan.units.items():
            mlp = mlps.get(path)
            if mlp is None:
                continue
            n = mlp.removable(value if value is not None else ratio, cfg.round_to)
            if n <= 0:
                continue
            if isinstance(mlp, ExpertBankSpec):  # each expert its own least important units
                mlp.prune_units(n)
                continue
            scores = mlp.unit_scores(model, GroupScorer(imp, by_id, None).element_scores)
            mlp.prune_units(model, sorted(scores.argsort()[:n].tolist()))


def _heads_for_width(plan: _Plan, ratio: float) -> dict[str, int]:
    """Heads each coupled attention layer removes at ``ratio``: the fewest any layer of its
    residual stream would remove, so every layer writing that width keeps the same number."""
    fewest: dict[int, int] = {}
    for s in plan.attention:
        if s.path in plan.coupled:
            value = plan.heads.get(s.path)
            n = max(s.removable(value if value is not None else ratio), 0)
            w = plan.coupled[s.path]
            fewest[w] = min(fewest.get(w, n), n)
    return {p: fewest[w] for p, w in plan.coupled.items()}


def _config_refuses(cfg: Any) -> str | None:
    """The config's own validation error (transformers' strict configs), else ``None``."""
    check = getattr(cfg, "validate_architecture", None)
    if not callable(check):
        return None
    try:
        check()
    except Exception as e:
        return (str(e).splitlines() or [type(e).__name__])[0][:160]
    return None


def _set_head_dim(cfg: Any, hd: int) -> None:
    """``config.head_dim = hd`` where it is a field (Falcon derives it: a read-only property)."""
    if isinstance(getattr(type(cfg), "head_dim", None), property):
        return
    cfg.head_dim = hd


def _sync_config_heads(specs: list[AttentionSpec]) -> None:
    """Attention whose forward reads ``config.num_attention_heads`` (Phi-3) needs the shared
    config to say the pruned count at once, so every layer sharing it must keep one count."""
    by_cfg: dict[int, list[AttentionSpec]] = {}
    for s in specs:
        cfg = s.module.__dict__.get("config")
        if s.extra.get("config_heads") and cfg is not None:
            by_cfg.setdefault(id(cfg), []).append(s)
    for group in by_cfg.values():
        counts = {(s.heads, s.kv_heads, s.head_dim) for s in group}
        if len(counts) > 1:
            kept = ", ".join(f"{s.path}: {s.heads}" for s in group)
            raise ValueError(
                f"Prune: {type(group[0].module).__name__}.forward reads "
                f"config.num_attention_heads, which every layer shares, so all of them must "
                f"keep the same number of heads (they would keep {kept}); give the attention "
                f"layers one ratio, or exclude them all"
            )
        heads, kv, hd = counts.pop()
        cfg = group[0].module.config
        cfg.num_attention_heads = heads
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = kv
        _set_head_dim(cfg, hd)


def _vector_sizes(model: nn.Module) -> dict[int, tuple[nn.Module, dict[str, int]]]:
    """Lengths of every module's own 1-D parameters (per-channel scales such as layer scale)."""
    return {
        id(m): (
            m,
            {n: p.shape[0] for n, p in m._parameters.items() if p is not None and p.dim() == 1},
        )
        for m in model.modules()
    }


def _sync_shape_attrs(model: nn.Module, sizes: dict[int, tuple[nn.Module, dict[str, int]]]) -> None:
    """A module that reshapes its own per-channel parameter with a stored shape (timm's
    MetaFormer ``Scale``: ``self.scale.view(self.shape)``, ``shape = (dim, 1, 1)``) gets the
    pruned length written into that shape; ints named like the width follow too."""
    for m, old in sizes.values():
        changed = {
            old[n]: p.shape[0]
            for n, p in m._parameters.items()
            if n in old and p is not None and p.dim() == 1 and p.shape[0] != old[n]
        }
        if len(changed) != 1:
            continue
        ((was, now),) = changed.items()
        for name, value in list(m.__dict__.items()):
            if name.startswith("_"):
                continue
            if (
                isinstance(value, (tuple, list, torch.Size))
                and value
                and all(isinstance(v, int) for v in value)
                and math.prod(value) == was
                and was in value
            ):
                i = list(value).index(was)
                new = [*value[:i], now, *value[i + 1 :]]
                m.__dict__[name] = (
                    type(value)(new) if not isinstance(value, torch.Size) else torch.Size(new)
                )
            elif name in ("dim", "num_features", "channels") and value == was:
                m.__dict__[name] = now


def _follow_input_widths(
    model: nn.Module, inputs: Inputs, sizes: dict[int, tuple[nn.Module, dict[str, int]]]
) -> None:
    """A norm without parameters (``nn.LayerNorm(elementwise_affine=False)``, OLMo's LayerNorm)
    stores the width it normalizes over but has no vector that pruning shortens: one forward
    writes the trailing shape of its input into its ``normalized_shape`` where they differ."""
    norms = [
        m
        for m, vec in sizes.values()
        if not vec
        and not any(p is not None for p in m._parameters.values())
        and isinstance(m.__dict__.get("normalized_shape"), (tuple, list, torch.Size, int))
    ]
    blurs = [m for m, vec in sizes.values() if not vec and _replicated_filter(m) is not None]
    if not norms and not blurs:
        return

    def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if "normalized_shape" not in m.__dict__:
            if x is not None and x.dim() >= 2:
                widths[m] = int(x.shape[1])  # set after the forward: its state is restored
            return
        ns = m.__dict__["normalized_shape"]
        shape = (ns,) if isinstance(ns, int) else tuple(ns)
        if x is None or x.dim() < len(shape) or tuple(x.shape[-len(shape) :]) == shape:
            return
        got = tuple(int(d) for d in x.shape[-len(shape) :])
        if len(shape) == 1 or got[:-1] == shape[:-1]:  # only the channel (last) size moved
            if isinstance(ns, int):
                m.__dict__["normalized_shape"] = got[-1]
            elif isinstance(ns, torch.Size):
                m.__dict__["normalized_shape"] = torch.Size(got)
            else:
                m.__dict__["normalized_shape"] = type(ns)(got)

    widths: dict[nn.Module, int] = {}
    handles = [m.register_forward_pre_hook(pre) for m in [*norms, *blurs]]
    try:
        for _ in range(1 + len(blurs)):  # a filter left wide stops the forward at itself
            try:
                with torch.no_grad(), preserved_state(model):
                    call_for_analysis(model, inputs)
            except Exception:
                pass  # the forward check after pruning names what still fails
            moved = {m: c for m, c in widths.items() if _narrow_replicated_filter(m, c)}
            widths.clear()
            if not moved:
                break
    finally:
        for h in handles:
            h.remove()


def _replicated_filter(m: nn.Module) -> str | None:
    """The buffer of a parameter-free depthwise filter module: one fixed ``[C, 1, k, k]``
    kernel repeated for each of ``C`` channels, with ``C`` stored in an int attribute (timm's
    ``BlurPool2d`` anti-aliasing in TResNet and the ``aa`` ResNets)."""
    if any(p is not None for p in m._parameters.values()) or len(m._buffers) != 1:
        return None
    ((name, buf),) = m._buffers.items()
    if not isinstance(buf, torch.Tensor) or buf.dim() < 3 or buf.shape[1] != 1 or buf.shape[0] < 2:
        return None
    c = int(buf.shape[0])
    if not any(
        v == c and not isinstance(v, bool) for v in m.__dict__.values() if isinstance(v, int)
    ):
        return None
    if not bool((buf == buf[:1]).all()):
        return None
    return name


def _narrow_replicated_filter(m: nn.Module, channels: int) -> bool:
    """Give a replicated depthwise filter (see :func:`_replicated_filter`) the width its input
    now has: the kernel is the same for every channel, so the result is exact. ``True`` when
    it changed."""
    name = _replicated_filter(m)
    if name is None:
        return False
    buf = m._buffers[name]
    was = int(buf.shape[0])
    if channels == was or channels < 1:
        return False
    m._buffers[name] = buf[:1].expand(channels, *buf.shape[1:]).clone()  # nnslim.save keeps it
    for attr, v in list(m.__dict__.items()):
        if isinstance(v, int) and not isinstance(v, bool) and v == was and not attr.startswith("_"):
            m.__dict__[attr] = channels
    return True


def _ties(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Parameters shared by several modules: ``[[(module, name, module path), ...], ...]``."""
    return [
        [(m, n, full.rpartition(".")[0]) for m, n, full in group]
        for group in shared_parameters(model)
    ]


class _TieSplit(RuntimeError):
    """Pruning gave the modules sharing one parameter different shapes."""

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


def _retie(
    model: nn.Module,
    ties: list[list[tuple[nn.Module, str, str]]],
    ran: set[int] | None = None,
) -> None:
    """Share tied parameters again after pruning replaced them with separate copies.

    ``ran``: ids of the modules the traced forward ran. A module that shares the parameter but
    never ran (Pegasus's ``model.shared``, an alias of the embeddings the encoder and decoder
    call) was not in the graph: it takes the pruned copy of those that ran."""
    for owners in ties:
        original = owners[0][0]._parameters[owners[0][1]]
        if ran is not None:
            moved = [m._parameters[n] for m, n, _ in owners if id(m) in ran]
            moved = [q for q in moved if q is not original]
            if moved:
                for m, n, _ in owners:
                    if id(m) not in ran and m._parameters[n] is original:
                        m._parameters[n] = moved[0]
                        _sync_layer_widths(m)
        first_m, first_n, _ = owners[0]
        p = first_m._parameters[first_n]
        for m, n, _ in owners[1:]:
            q = m._parameters[n]
            if q is p:
                continue
            if q is None or p is None or q.shape != p.shape or not torch.equal(q, p):
                how = (
                    f"kept different channels in its {tuple(p.shape)} copies"
                    if q is not None and p is not None and q.shape == p.shape
                    else f"unevenly ({tuple(p.shape)} vs {tuple(q.shape)})"
                )
                raise _TieSplit(
                    f"pruning split the tied parameter {type(first_m).__name__}.{first_n} "
                    f"{how}; exclude one of the layers that share it",
                    sorted({path for _, _, path in owners}),
                )
            m._parameters[n] = p


def _sync_layer_widths(m: nn.Module) -> None:
    """A Linear's or an Embedding's width attributes from its (replaced) weight."""
    w = m._parameters.get("weight")
    if w is None or w.dim() != 2:
        return
    if isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = w.shape
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape


def _group_roots(
    model: nn.Module,
    inputs: Inputs,
    owners: list[str],
    kept: dict[str, str],
    time_limit: float | None = None,
    split_only: bool = True,
) -> list[str]:
    """Roots of the channel groups that reach some of ``owners``: with ``split_only``, only
    those that do not reach all of them (modules sharing a parameter: pruning such a group
    splits the tie). Attention projections (left to head pruning), output layers (never
    pruned) and roots already kept are not listed."""
    graph = trace(model, inputs, time_limit=time_limit)
    proj = {p for s in graph.attention for p in s.projections} | set(graph.output_layers())
    want = set(owners)
    roots = []
    for g in graph.groups():
        members = {p for p, _ in g.members}
        if not members & want or (split_only and want <= members):
            continue
        if g.root not in proj and g.root not in kept:
            roots.append(g.root)
    return roots


def output_layers_by_identity(model: nn.Module, inputs: Inputs) -> list[str]:
    """Layers whose output tensor is (a view of) a model output, found with forward hooks."""
    from ..base.inputs import task_tensors

    layers = {p: m for p, m in model.named_modules() if isinstance(m, root_types())}
    produced, _, out = _storages_of(model, inputs, layers)
    found = []
    for t in task_tensors(out):
        p = produced.get(t.untyped_storage().data_ptr())
        if p is not None:
            found.append(p)
    return found


# -- Hugging Face configs -----------------------------------------------------------------------
_WIDTH_FIELDS = [
    ("moe_intermediate_size", re.compile(r"(.*\.)?mlp\.experts\.\d+\.up_proj$")),
    (
        "intermediate_size",
        re.compile(r"(.*\.)?(mlp\.(up_proj|gate_proj|fc1|dense_h_to_4h)|intermediate\.dense)$"),
    ),
    ("n_inner", re.compile(r"(.*\.)?mlp\.c_fc$")),
    ("ffn_hidden_size", re.compile(r"(.*\.)?mlp\.dense_h_to_4h$")),  # Falcon
    ("encoder_ffn_dim", re.compile(r"(.*\.)?encoder\.layers\.\d+\.fc1$")),
    ("decoder_ffn_dim", re.compile(r"(.*\.)?decoder\.layers\.\d+\.fc1$")),
]


def _hidden_widths(model: nn.Module, attention: list[AttentionSpec]) -> dict[str, int | None]:
    """Output width of every attention output projection (the hidden width it writes)."""
    named = dict(model.named_modules())
    return {s.o: out_width(named[s.o]) for s in attention if s.o in named}


def sync_hidden_sizes(
    model: nn.Module, attention: list[AttentionSpec], before: dict[str, int | None]
) -> list[str]:
    """Each Hugging Face config (the model's, a vision or text tower's) whose ``hidden_size`` was
    the width its attention output projections wrote follows their pruned width."""
    named = dict(model.named_modules())
    by_cfg: dict[int, tuple[Any, list[AttentionSpec]]] = {}
    top = getattr(model, "config", None)
    for spec in attention:
        cfg = _owning_config(named, spec.path, top)
        if cfg is not None and hasattr(cfg, "to_dict") and spec.o in named:
            by_cfg.setdefault(id(cfg), (cfg, []))[1].append(spec)
    notes = []
    for cfg, specs in by_cfg.values():
        old = {before.get(s.o) for s in specs}
        new = {out_width(named[s.o]) for s in specs}
        if len(old) != 1 or len(new) != 1 or old == new:
            continue
        (old_w,), (new_w,) = old, new
        if new_w is None or getattr(cfg, "hidden_size", None) != old_w:
            continue
        note = _sync_hidden_size(cfg, new_w, specs)
        if note:
            notes.append(note)
    _sync_cross_attention_width(model)
    return notes


def _sync_cross_attention_width(model: nn.Module) -> None:
    """Hugging Face's ``EncoderDecoderModel`` (and its vision and speech kin) projects the
    encoder's states with an ``enc_to_dec_proj`` it builds only when the two hidden sizes
    differ, unless the decoder config names ``cross_attention_hidden_size``. Pruning one
    side's width (the encoder's is kept when its states are an output) makes them differ; the
    decoder's cross-attention already reads the encoder's width, so the config says so."""
    enc, dec = model._modules.get("encoder"), model._modules.get("decoder")
    if enc is None or dec is None or "enc_to_dec_proj" in model._modules:
        return
    e_cfg, d_cfg = enc.__dict__.get("config"), dec.__dict__.get("config")
    if not all(hasattr(c, "to_dict") for c in (e_cfg, d_cfg)):
        return
    e_w, d_w = getattr(e_cfg, "hidden_size", None), getattr(d_cfg, "hidden_size", None)
    if e_w is None or d_w is None or getattr(d_cfg, "cross_attention_hidden_size", None):
        return
    if e_w != d_w:
        d_cfg.cross_attention_hidden_size = e_w


def _owning_config(named: dict[str, nn.Module], path: str, top: Any) -> Any:
    """The config of the nearest module at or above ``path`` that holds one (an
    encoder-decoder's encoder and decoder each have their own), else ``top``."""
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        m = named.get(".".join(parts[:i]))
        cfg = m.__dict__.get("config") if m is not None else None
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return top


def _sync_hidden_size(cfg: Any, width: int, attention: list[AttentionSpec]) -> str | None:
    """``config.hidden_size = width`` (with ``head_dim`` pinned, which the hidden size no longer
    divides into); a note where the config's own validation refuses it (then left as it was)."""
    saved = dict(cfg.__dict__)
    cfg.hidden_size = width
    dims = {s.head_dim for s in attention}
    if len(dims) == 1 and hasattr(cfg, "head_dim"):
        _set_head_dim(cfg, dims.pop())
    why = _config_refuses(cfg)
    if why:
        cfg.__dict__.clear()
        cfg.__dict__.update(saved)
        return (
            f"config.hidden_size stays {getattr(cfg, 'hidden_size', '?')}: the config refuses "
            f"{width} ({why}); save with nnslim.hf.save_pretrained and reload with "
            f"nnslim.hf.from_pretrained (or nnslim.save / nnslim.load)"
        )
    return None


def update_hf_config(model: nn.Module, attention: list[AttentionSpec]) -> list[str]:
    """Bring a Hugging Face config in line with the pruned widths; notes on what it cannot say."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return []
    notes: list[str] = []
    named = _described_by(model, cfg)
    attention = [s for s in attention if s.path in named]
    for key, pattern in _WIDTH_FIELDS:
        if not hasattr(cfg, key):
            continue
        widths = {
            (m.out_features if isinstance(m, nn.Linear) else getattr(m, "nf", None))
            for p, m in named.items()
            if pattern.fullmatch(p)
        }
        if key == "intermediate_size":  # fused gate/up (Phi-3, ModernBERT): their units
            widths |= {s.units for s in find_fused_mlps(model, check=False)[0] if s.fused in named}
        if key == (
            "moe_intermediate_size"
            if hasattr(cfg, "moe_intermediate_size")
            else "intermediate_size"
        ):  # expert banks (Qwen3-MoE; Mixtral's own field)
            widths |= {s.units for s in find_expert_banks(model, check=False)[0] if s.path in named}
        widths.discard(None)
        if len(widths) == 1:
            w = widths.pop()
            if getattr(cfg, key) != w:
                setattr(cfg, key, w)
        elif len(widths) > 1:
            notes.append(
                f"config.{key} cannot describe per-layer widths {sorted(widths)}; reload the "
                f"model with nnslim.load, not from_pretrained"
            )
    changed: list[tuple[str, list[AttentionSpec], int, int]] = []
    if attention:
        for prefix, field in (
            ("encoder", "encoder_attention_heads"),
            ("decoder", "decoder_attention_heads"),
            ("", "num_attention_heads"),
        ):
            specs = [s for s in attention if not prefix or f"{prefix}." in f"{s.path}."]
            if not specs or not hasattr(cfg, field):
                continue
            heads = {s.heads for s in specs}
            kv = {s.kv_heads for s in specs}
            dims = {s.head_dim for s in specs}
            if len(heads) > 1 or len(kv) > 1 or len(dims) > 1:
                notes.append(
                    f"attention modules kept different head counts; config.{field} cannot say "
                    f"so: reload with nnslim.load"
                )
                continue
            h, k, d = heads.pop(), kv.pop(), dims.pop()
            if getattr(cfg, field) == h:
                continue
            if isinstance(getattr(cfg, field), (list, tuple)):  # SegFormer: heads per stage
                notes.append(
                    f"config.{field} lists heads per stage ({getattr(cfg, field)}), which the "
                    f"pruned stages no longer match; reload with nnslim.load (or "
                    f"nnslim.hf.from_pretrained)"
                )
                continue
            saved = {
                n: cfg.__dict__[n]
                for n in (field, "num_key_value_heads", "head_dim")
                if n in cfg.__dict__
            }
            try:
                setattr(cfg, field, h)
                if not prefix and getattr(cfg, "num_key_value_heads", None) is not None:
                    cfg.num_key_value_heads = k
                _set_head_dim(cfg, d)
                why = _config_refuses(cfg)
            except Exception as e:  # a validating config (huggingface_hub strict dataclasses)
                why = first_line(e, 100)
            if why:
                for n in ("head_dim",):
                    if n not in saved:
                        cfg.__dict__.pop(n, None)
                cfg.__dict__.update(saved)
                notes.append(
                    f"config.{field} stays {getattr(cfg, field)}: the config refuses {h} heads "
                    f"of size {d} ({why}); save with nnslim.hf.save_pretrained and reload with "
                    f"nnslim.hf.from_pretrained (or nnslim.save / nnslim.load)"
                )
                continue
            changed.append((field, specs, h, d))
    for field, specs, h, d in changed:
        # what from_pretrained builds from the config now (a head size some classes derive
        # from the hidden size, others read from config.head_dim)
        why = _rebuilt_differs(model, specs[0].path)
        if why is not None:
            notes.append(
                f"{type(specs[0].module).__name__} is not rebuilt from config.{field} with {h} "
                f"heads of size {d} ({why}), so from_pretrained cannot rebuild it; reload with "
                f"nnslim.load (or nnslim.hf.from_pretrained)"
            )
    return notes


def _rebuilt_differs(model: nn.Module, path: str) -> str | None:
    """How the parameters under ``path`` of the model its class builds from its config (on
    the meta device, as ``from_pretrained`` would) differ from the model's; ``None``: they
    do not."""
    import copy

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as e:
        return f"the config no longer builds the model: {type(e).__name__}"
    theirs = {k: tuple(v.shape) for k, v in fresh.named_parameters()}
    for k, v in model.named_parameters():
        if k.startswith(path + "."):
            if k not in theirs:
                return f"{k} is not built"
            if theirs[k] != tuple(v.shape):
                return f"{k} would be {list(theirs[k])}, it is {list(v.shape)}"
    return None


def _described_by(model: nn.Module, cfg: Any) -> dict[str, nn.Module]:
    """The modules ``cfg`` describes: those whose nearest config (:func:`_owning_config`) is
    of its class (a multimodal model's vision or audio tower holds another: its widths and
    heads are not the text config's; T5 hands each stack a deep copy of the same class)."""
    named = dict(model.named_modules())
    return {p: m for p, m in named.items() if type(_owning_config(named, p, cfg)) is type(cfg)}


def _shapes(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in m._parameters.values() if t is not None)


def _unpack(model: nn.Module) -> set[str]:
    """Turn the packed sparse layers back into dense ones with their masks (what sparsifying
    works on); returns their paths, packed again afterwards."""
    from ..modules.sparse import SparseConv2d, SparseLinear

    paths = set()
    for p, m in list(model.named_modules()):
        if isinstance(m, (SparseLinear, SparseConv2d)):
            replace_module(model, p, m.to_dense())
            paths.add(p)
    return paths


def sparsify_layer(layer: nn.Module, t: Prune, gram: torch.Tensor) -> nn.Module:
    """``layer`` sparsified as ``t`` would sparsify it in a model, with ``gram`` (the Gram of
    its inputs, ``X^T X``; of the input channels for a convolution) standing in for the
    calibration data: Wanda's input norms are its diagonal's square roots, SparseGPT's Hessian
    is ``gram``. Returns the packed layer with ``t.pack``, else ``layer`` with its mask. How
    :class:`~nnslim.Auto` measures a sparsity candidate on one layer.

    Raises:
        ValueError: where ``t`` would leave the layer (a width N:M does not divide, SparseGPT
            on a convolution, an importance that needs gradients).
    """
    from ..modules.sparse import SparseConv2d, SparseLinear
    from .sparsegpt import sparsegpt

    imp = as_importance(t.importance)
    nm = parse_pattern(t.structure)
    conv1d = is_hf_conv1d(layer)
    w = layer.weight
    width = w.shape[0] if conv1d else w[0].numel()
    if nm is not None and width % nm[1]:
        raise ValueError(f"input width {width} is not a multiple of {nm[1]} ({t.structure})")
    ratio = t.ratio or 0.0
    if imp.needs_hessian:
        if not is_linear(layer):
            raise ValueError("importance='sparsegpt' updates Linear layers")
        new, keep, _ = sparsegpt(
            linear_weight(layer),
            gram.clone(),
            sparsity=ratio,
            nm=nm,
            block_size=imp.block_size,
            damp=imp.damp,
            consume=True,
        )
        if conv1d:
            new, keep = new.t().contiguous(), keep.t().contiguous()
    else:
        if imp.needs_grad:
            raise ValueError(f"importance={t.importance!r} needs gradients, not a Gram")
        norm = gram.diagonal().clamp(min=0).sqrt() if imp.needs_activations else None
        score = imp.score(w, module=layer, grad=None, input_norm=norm)
        if nm is not None:
            keep = nm_mask(layer, score, *nm)
        else:
            keep = unstructured_masks({"": layer}, {"": score}, {"": ratio}, imp, False, ratio)[""]
        new = w.detach() * keep.to(w.dtype)
    layer.weight = nn.Parameter(new.to(w.dtype), requires_grad=w.requires_grad)
    layer.register_buffer(MASK_NAME, keep.to(torch.bool))
    if not t.pack:
        return layer
    if is_linear(layer):
        return SparseLinear.from_dense(layer, layer._buffers[MASK_NAME])
    return SparseConv2d.from_dense(layer, layer._buffers[MASK_NAME])
