"""``Auto``: choose each layer's setting to meet a size, MACs or latency budget with the least
estimated loss.

The loop the library starts from, automatic: every eligible Linear layer (dense Conv2d too:
grouped and depthwise convolutions are reported as left; and ``nn.Embedding`` tables, with an
output layer tied to one chosen with it, except under a latency budget) gets a list of
candidates (kept as it is; int8; int4 with groups of 128, 64 or 32 inputs; palettized to 256,
64, 16 or 8 shared values; low rank keeping half or a quarter of its parameters; or any
:class:`~nnslim.Transform` of the user's that replaces a layer chosen by ``select``), each with
its exact cost and an estimate of what it costs the model's loss; a multiple-choice knapsack
(dynamic programming over the budget in 4096 steps, then the rounding's leftover filled
greedily) picks one candidate per layer so that the model fits the budget with the least
total estimate; the choice is applied as one transform per setting, in one atomic step.

A candidate is measured by applying it to a copy of the one layer (a candidate that does not
apply to a layer, or leaves it unchanged, is not offered for it): its cost is the profiler's
figure for the new layer (weight bytes; MACs scaled to the calls the layer makes in the
model) or, for a latency budget, the new layer's median time in eager torch on as many input
rows as the layer sees in one forward of the example inputs (the rest of the model's time is
measured once and held fixed), and the weight it leaves is read back by running the new layer
on the identity matrix (so it is the weight the layer computes with, whatever the transform
stores; a convolution from one impulse per input channel and kernel offset). This is the whole
protocol for a transform of your own: a :class:`~nnslim.Transform` with a ``select`` field that
replaces (or changes) the Linear layers it selects joins the search unchanged.

The loss estimate of a candidate is the second-order change of the calibration loss when that
layer alone takes its weight change ``dW``, with the K-FAC approximation of the Fisher
(Martens & Grosse 2015, the output factor's diagonal): with ``L`` the mean of ``B`` batch
losses, ``dL ~= 1/2 sum_o (S_o / B^2) * dW_o (X^T X) dW_o^T``, where ``S_o`` is the squared
gradient of the batch loss with respect to output ``o`` of the layer summed over rows and
batches, and ``X^T X`` the Gram matrix of its inputs summed the same way (for a convolution:
rows are positions, ``X^T X`` the input channels' Gram, and each kernel offset's slice of
``dW`` is weighed by it alone, the offsets' cross terms left out; for an embedding, a Linear on
one-hot inputs: ``X^T X`` is the diagonal of token counts, and an output layer tied to it adds
its own term for the same change of rows). One forward and
backward pass over the calibration batches gives every layer's statistics (the batch loss is
:func:`~nnslim.core.calibrate.calibration_loss`'s: the model's own loss, or a cross-entropy
against its own predictions; for an encoder whose output is a hidden state, a squared error to a
Gaussian target drawn around it, so ``S_o`` is the Gauss-Newton diagonal); each candidate then
costs one application to a copy of the layer and one product. Why this estimate: it weighs a
layer's output error by how much the loss reacts to that output (a plain output error treats
a layer feeding the LM head like one feeding a residual that normalises it away), it needs no
forward pass of the model per candidate (one per layer and candidate would be hundreds of
passes on an LLM), and the errors of different layers add up (the knapsack needs that). With
``method="gptq"`` a Linear's quantization candidates are measured by GPTQ on the layer's input
Gram (the float model's inputs; the applied plan calibrates block after block), so the
estimate sees what GPTQ gains over rounding, which it does not for palettes and low rank;
the other candidates are measured without calibration (round to nearest, plain SVD), and
activation-aware factorization then applies them with less error than estimated.

Channel candidates (``"channels-0.25"``, ``"channels-0.5"``, or a ``Prune(ratio=r)`` of the
user's) remove a share of a coupled channel group's channels, under any budget (under a
latency budget each group's layers are timed pruned, on inputs narrowed to the channels left).
A group (found by the dependency graph, as ``Prune`` finds it) whose layers are all searched
Linears or dense convolutions, or map each channel to itself (BatchNorms, depthwise
convolutions), is one knapsack item: its options combine a
channel setting with its layers' own candidates, measured on the pruned copies, the
combinations beaten on both cost and loss dropped. The channels removed are the ones
``Prune`` removes (its importance's lowest scores, as torch-pruning ranks them), and the
removal is priced where it acts: removing a channel is exactly zeroing it at the layers reading
it, and its estimate is the empirical Fisher of that change (Fisher pruning, Theis et al.
2018: per sample, ``x * dL/dx`` summed over the removed channels at the reader, squared,
``1/2 * N / B^2`` times its sum over the ``N`` samples of ``B`` batches), not K-FAC's
factored form, whose diagonal output factor prices a removal's output changes as if they were
independent (they move together: on a trained classifier the factored form came out 3x below
the measured loss where this is within 1.5x, tested). An attention module's heads are a group
too (rooted at the query projection: its rows, the key/value rows without GQA, the output
projection's columns; the heads ``Prune`` removes). Groups linked by a layer that reads one
group's channels and writes the next's (a plain CNN's convolutions, an inverted residual's
expansion and projection) form a chain, one knapsack item: the shared layer is measured at
every pair of its two groups' settings, and the chain's options come from dynamic programming
along it (per setting of the group reached, the cost/loss front of everything before it), so
every group of a chain is searched. A group through a LayerNorm/RMSNorm or an embedding (a
transformer's hidden width), attention with a fused projection, and a group that would share
a layer otherwise (a branch: one group's channels read by two groups' roots; a layer read by
two groups) are left with their reason (the smaller groups are taken first).

Sparsity candidates (``"sparse-0.5"``, ``"sparse-2:4"``, or a ``Prune(structure=...,
pack=True)`` of the user's) zero single weights of a layer and store it packed (the kept
weights and a bitmask: :class:`~nnslim.modules.sparse.SparseLinear`), under a bytes budget
only (a packed layer runs its dense kernel). Each is measured as it is applied: SparseGPT's
update from the layer's input Gram (Wanda's norms from its diagonal), priced by K-FAC like the
others.

:meth:`Auto.table` gives the per-layer table (cached on the model's weights, so a second
budget reuses it); :meth:`AutoTable.front` the predicted loss over a range of budgets.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import nn

from ..base.inputs import as_inputs, calibration_batches, first_tensor
from ..base.modules import (
    is_conv2d,
    is_linear,
    linear_weight,
    maps_each_channel,
    unreplaceable,
)
from ..base.snapshot import preserved_state
from ..base.validate import check_choice
from ..core.calibrate import LayerStats, batch_count, collect
from ..core.report import Report
from ..core.target import Target
from ..core.transform import Compose, Context, Transform
from ..graph.attention import AttentionSpec
from ..profiling.latency import RUNTIMES
from .factorize import Factorize
from .prune import Prune, _complement, in_one_module, sparsify_layer
from .quantize import METHODS, Quantize, _lm_heads, plain_embedding, tied_heads
from .share import ShareWeights

__all__ = ["CANDIDATES", "Auto", "AutoTable", "ChannelGroup"]

#: the built-in candidates, by name
CANDIDATES: dict[str, Transform] = {
    "int8": Quantize(scheme="int8"),
    # activations rounded too: the fastest setting in eager CPU torch; the loss estimate sees
    # only its weight rounding (the activations' is per row at run time)
    "int8-dynamic": Quantize(scheme="int8-dynamic"),
    "int4-g128": Quantize(scheme="int4", group_size=128),
    "int4-g64": Quantize(scheme="int4", group_size=64),
    "int4-g32": Quantize(scheme="int4", group_size=32),
    "palette-256": ShareWeights(clusters=256),
    "palette-64": ShareWeights(clusters=64),
    "palette-16": ShareWeights(clusters=16),
    "palette-8": ShareWeights(clusters=8),
    "rank-0.5": Factorize(ratio=0.5),
    "rank-0.25": Factorize(ratio=0.25),
    # a coupled channel group (an MLP's hidden units, a convolution's output channels with
    # the BatchNorm after it and the layers reading them) loses this share of its channels
    "channels-0.25": Prune(ratio=0.25, importance="wanda"),
    "channels-0.5": Prune(ratio=0.5, importance="wanda"),
    # sparsity, stored packed (the kept weights and a bitmask: 0.53 of an fp32 layer's bytes
    # at 50%), SparseGPT on Linear layers; bytes budgets only (the layers run dense)
    "sparse-0.5": Prune(ratio=0.5, structure="unstructured", importance="sparsegpt", pack=True),
    "sparse-2:4": Prune(structure="2:4", importance="sparsegpt", pack=True),
}
#: what Auto searches unless told otherwise
DEFAULT_CANDIDATES = ("int8", "int4-g128", "int4-g64", "int4-g32", "palette-16", "rank-0.5")
#: budgets Auto searches: the target's metric -> the profiler's per-module figure
_COSTS = {"param_bytes": "param_bytes", "macs": "macs", "latency_ms": "latency_ms"}
_METRIC_NAMES = {"param_bytes": "bytes", "macs": "MACs", "latency_ms": "latency"}

Option = tuple[str, float, float]  # (candidate name, cost, estimated loss)


@final
@dataclass(frozen=True)
class Auto(Transform):
    """Per-layer settings under a budget: each Linear, dense Conv2d and embedding kept as it
    is or given one of the
    ``candidates``, chosen to meet ``target`` with the least estimated loss (see the module
    docstring for the estimate, the allocation and how a transform of your own joins).
    Needs calibration batches.

    Args:
        target: ``{"bytes": f}`` (the whole model's weight bytes at most ``f`` of today's),
            ``{"macs": f}`` (its MACs on the example inputs) or ``{"latency": f}`` (its eager
            forward time on the example inputs, measured on this machine: the layers' times
            add up to the model's within the timing noise, so check the result with
            :func:`nnslim.profile` or let :func:`nnslim.compress` measure it).
        candidates: the settings layers may take besides staying as they are: names in
            :data:`CANDIDATES` and/or transforms with a ``select`` field. Channel candidates
            (``"channels-0.25"``, ``"channels-0.5"``, ``Prune(ratio=r, importance=...)``)
            choose per coupled channel group (any budget); sparsity candidates
            (``"sparse-0.5"``, ``"sparse-2:4"``, ``Prune(structure=..., pack=True)``) per layer
            (bytes budgets); see the module docstring.
        method: how the built-in quantization candidates are applied: ``"rtn"`` or
            ``"gptq"``.
        zero_point: the built-in int4 candidates' offsets (see :class:`~nnslim.Quantize`).
        plan: ``{layer path: candidate name}``: apply this plan instead of searching (what
            :meth:`table` and :meth:`AutoTable.allocate` return; the names as
            :meth:`AutoTable.names` gives them). A channel group's root carries its channel
            setting, alone or before its own option: ``"channels-0.5+int8"``.
        select: layers the search may change (default: every Linear, dense Conv2d and
            embedding but the LM head; a head tied to an embedding takes the embedding's
            setting).
        exclude: layers it leaves alone.
        runtime: where a latency budget is timed: ``"eager"`` (torch) or ``"onnxruntime"``
            (the model, each layer's candidates, and a group's BatchNorms and attention
            modules each exported with :func:`nnslim.export` and timed in ONNX Runtime: the
            budget is the exported model's time; ``nnslim.compress`` measures it there too).

    The report notes the plan (layers per setting, predicted cost and loss); each layer's
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
    candidates: tuple[Any, ...] = DEFAULT_CANDIDATES
    method: str = "rtn"
    zero_point: str = "float"
    plan: Any = None
    select: Any = None
    exclude: Any = None
    runtime: str = "eager"

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        if self.plan is None or self.target is not None:
            targets = Target.parse("Auto", self.target)
            if len(targets) != 1 or targets[0].metric not in _COSTS:
                raise ValueError(
                    "Auto(target=...): give one budget, {'bytes': fraction} (the whole "
                    "model's weight bytes as a fraction of today's), {'macs': fraction} or "
                    "{'latency': fraction}."
                )
        if isinstance(self.candidates, list):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        sparse = [_name(c) for c in self.candidates if is_sparsity_candidate(c)]
        if sparse and self.target is not None and self._target.metric != "param_bytes":
            raise ValueError(
                f"Auto(candidates=...): {sparse} save bytes only (a packed sparse layer runs "
                f"its dense kernel: the same MACs, a little more time); use them under a "
                f"bytes budget, or leave them out of a MACs or latency search."
            )
        if isinstance(self.plan, dict):
            object.__setattr__(self, "plan", dict(self.plan))
        if not self.candidates:
            raise ValueError("Auto(candidates=...): give at least one setting.")
        names = [_name(c) for c in self.candidates]
        for c in self.candidates:
            if isinstance(c, str):
                check_choice("Auto", "candidates", c, tuple(CANDIDATES))
            elif isinstance(c, Prune) and c.structure != "channels":
                if (
                    not c.pack
                    or c.select is not None
                    or c.exclude is not None
                    or c.scope != "local"
                    or c.steps != 1
                    or c.allocation != "uniform"
                ):
                    raise ValueError(
                        f"Auto(candidates=...): {c!r}: a sparsity candidate is "
                        f"Prune(structure='unstructured' (with ratio=) or 'N:M', pack=True) "
                        f"with its importance: packed, so that its zeros save bytes; select, "
                        f"exclude, scope, steps and allocation stay at their defaults."
                    )
            elif isinstance(c, Prune):
                if (
                    c.ratio is None
                    or c.select is not None
                    or c.exclude is not None
                    or c.scope != "local"
                    or c.steps != 1
                ):
                    raise ValueError(
                        f"Auto(candidates=...): {c!r}: a channel candidate is "
                        f"Prune(ratio=r) with its importance and round_to (each coupled group "
                        f"searched loses that share of its channels); structure, select, "
                        f"exclude, scope and steps stay at their defaults."
                    )
            elif not isinstance(c, Transform) or "select" not in {
                f.name for f in dataclasses.fields(c)
            }:
                raise ValueError(
                    f"Auto(candidates=...): {c!r} is neither a built-in name "
                    f"({', '.join(CANDIDATES)}) nor a transform with a `select` field (Auto "
                    f"applies a candidate to the layers that take it through `select`)."
                )
        if len(set(names)) != len(names):
            raise ValueError(f"Auto(candidates=...): a setting is given twice: {names}.")
        if self.plan is not None:
            structured = [_name(c) for c in self.candidates if is_channel_candidate(c)]
            used = {n for v in self.plan.values() for n in split_setting(v, structured)}
            unknown = sorted(used - set(names) - {"keep"})
            if unknown:
                raise ValueError(f"Auto(plan=...): {unknown} are not among the candidates {names}.")
        check_choice("Auto", "method", self.method, METHODS)
        check_choice("Auto", "runtime", self.runtime, RUNTIMES)
        if (
            self.runtime != "eager"
            and self.target is not None
            and self._target.metric != "latency_ms"
        ):
            raise ValueError(
                f"Auto(runtime={self.runtime!r}): the runtime is where a latency budget is "
                f"timed; give target={{'latency': f}}, or leave runtime at 'eager'."
            )
        Quantize(zero_point=self.zero_point)  # validates it

    @property
    def _target(self) -> Target:
        return Target.parse("Auto", self.target)[0]

    # ------------------------------------------------------------------------------------------
    def _run(
        self, model: nn.Module, ctx: Context, report: Report, state: dict[str, Any]
    ) -> list[Any]:
        plan = self.plan if self.plan is not None else self._search(model, ctx, report)
        structured = [_name(c) for c in self.candidates if is_channel_candidate(c)]
        split = {p: split_setting(n, structured) for p, n in plan.items()}
        parts = []
        for c in self.candidates:  # channels first: the layers' own settings then apply to them
            t = self._transform(c)
            if isinstance(t, Prune):
                roots = {p: t.ratio for p, (s, _) in split.items() if s == _name(c)}
                if roots:
                    parts.append(dataclasses.replace(t, ratio=None, select=roots))
        for c in self.candidates:
            paths = [p for p, (_, n) in split.items() if n == _name(c)]
            if paths:
                parts.append(dataclasses.replace(self._transform(c), select=paths))
        if not parts:
            report.note("Auto: every layer stays as it is within the budget")
            return []
        return Compose(parts)._run(model, ctx, report, state)

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        self._run(model, ctx, report, {})

    def _transform(self, c: Any) -> Transform:
        """The candidate as applied: built-in quantization with this Auto's method and zero
        point."""
        if not isinstance(c, str):
            return c
        t = CANDIDATES[c]
        if isinstance(t, Quantize):
            t = dataclasses.replace(t, method=self.method, zero_point=self.zero_point)
        return t

    def _search(self, model: nn.Module, ctx: Context, report: Report) -> dict[str, str]:
        table = self.table(model, ctx=ctx, report=report)
        choice = table.allocate(self._target.fraction)
        report.note(plan_note(self, table, choice))
        return choice

    def table(
        self,
        model: nn.Module,
        calibration: Any = None,
        example_inputs: Any = None,
        *,
        ctx: Context | None = None,
        report: Report | None = None,
    ) -> AutoTable:
        """Every eligible layer's candidates with their cost and estimated loss, for this
        Auto's target metric. Cached on the model (its weights' identities and versions, the
        candidates and the calibration batches' identity): a second budget reuses it."""
        if ctx is None:
            batches = calibration_batches(model, calibration)
            ctx = Context(as_inputs(example_inputs) or (batches[0] if batches else None), batches)
        report = report if report is not None else Report(transform="Auto")
        batches = ctx.require_calibration("Auto", "to measure each layer's sensitivity")
        metric = self._target.metric if self.target is not None else "param_bytes"
        key = (
            metric,
            tuple(_name(c) for c in self.candidates),
            self.method,
            self.zero_point,
            self.runtime,
            repr(self.select),
            repr(self.exclude),
            tuple(id(first_tensor((b.args, dict(b.kwargs)))) for b in batches),
            tuple((id(t), t._version) for t in model.parameters()),
        )
        cached = _TABLES.get(model)
        if cached is not None and cached[0] == key:
            table = cached[1]
        else:
            left = Report(transform="Auto")
            layers = self._layers(model, ctx, left)
            if not layers:
                raise ValueError(
                    "Auto: no Linear, Conv2d or Embedding layer to choose a setting for after "
                    "select/exclude."
                )
            # the forwards that time the layers run in eval mode and leave no trace (BatchNorm
            # statistics of a model in train mode)
            with preserved_state(model):
                table = measure_table(self, model, ctx, batches, layers, metric)
            table.left = {s.path: s.reason for s in left.skips}
            _TABLES[model] = (key, table)
        for path, why in table.left.items():
            report.skipped(path, why)
        return table

    def _layers(self, model: nn.Module, ctx: Context, report: Report) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        left = unreplaceable(model)
        eligible = [
            (p, m)
            for p, m in named.items()
            if p and p not in left and (is_linear(m) or is_conv2d(m) or plain_embedding(m))
        ]
        for p, m in named.items():
            if isinstance(m, nn.Embedding) and not plain_embedding(m):
                report.skipped(p, f"{type(m).__name__} has a forward of its own (a scale...)")
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p in list(chosen):
            if is_conv2d(named[p]) and not _conv(named[p]):
                del chosen[p]
                report.skipped(p, "grouped convolution: Auto chooses for dense ones only")
            elif isinstance(named[p], nn.Embedding) and self._target.metric == "latency_ms":
                del chosen[p]
                report.skipped(
                    p, "embedding: a lookup's time is not searched under a latency budget"
                )
        heads = _lm_heads(model, ctx)
        ties = tied_heads(
            model, {p: named[p] for p in chosen if isinstance(named[p], nn.Embedding)}
        )
        for p in list(chosen):
            if p in ties.values():
                del chosen[p]
                emb = next(e for e, h in ties.items() if h == p)
                report.skipped(p, f"tied to embedding {emb} (one weight): chosen with it")
            elif p in heads and not (isinstance(self.select, (list, tuple)) and p in self.select):
                del chosen[p]
                report.skipped(p, "LM head stays in float (select it by name to include it)")
        return {p: named[p] for p in chosen}


def plan_note(auto: Auto, table: AutoTable, choice: dict[str, str]) -> str:
    """The report's line for a plan: layers per setting, predicted cost and loss."""
    fraction = auto._target.fraction
    counts: dict[str, int] = {}
    for name in choice.values():
        counts[name] = counts.get(name, 0) + 1
    kept = len(table.layers) - len(choice)
    sparse = any(is_sparsity_candidate(c) for c in auto.candidates)
    if kept:
        counts = {"keep": kept, **counts}
    return (
        f"Auto: {', '.join(f'{n} {k}' for k, n in counts.items())} of "
        f"{len(table.layers)} layers; predicted {table.cost_of(choice) / table.total:.4f} of "
        f"the {table.metric_name} (budget {fraction:g}), estimated loss increase "
        f"{table.loss_of(choice):.4g} (K-FAC second order"
        f"{'; channel removals by their empirical Fisher' if table.groups else ''}"
        f"{'; sparsity candidates pruned on each layer input Gram' if sparse else ''}; "
        f"quantization candidates measured "
        f"{'by GPTQ' if auto.method == 'gptq' else 'by rounding to nearest'})"
    )


_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, AutoTable]] = weakref.WeakKeyDictionary()


@dataclass
class ChannelGroup:
    """A coupled channel group in an :class:`AutoTable`: the searched layers whose channels go
    together (the root, whose output channels they are, first) and, per setting (``"keep"``
    or a channel candidate's name), ``(cost of its members without options, such as
    BatchNorms; estimated loss of removing the channels; {member: its options, measured on
    its pruned copy}})``. The knapsack takes the group as one item whose options are every
    combination of a setting and its members' options (the ones no other beats on both cost
    and loss). ``removed``: per channel setting, the root's output channels it removes (for
    attention, rooted at its query projection: the query heads), the ones ``Prune`` with that
    candidate's importance removes.

    ``before``: the root of the group upstream in a chain (its channels are the inputs of
    ``shared``, members here whose outputs are this group's channels: a convolution between
    two pruned groups), or None. A shared member's options then depend on both settings:
    ``joint[upstream setting][setting][member]`` for an upstream channel setting, the
    ``settings`` entry when the upstream group keeps its channels."""

    root: str
    members: list[str]
    settings: dict[str, tuple[float, float, dict[str, list[Option]]]]
    removed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    before: str | None = None
    shared: list[str] = dataclasses.field(default_factory=list)
    joint: dict[str, dict[str, dict[str, list[Option]]]] = dataclasses.field(default_factory=dict)

    def _options(self, setting: str, up: str) -> dict[str, list[Option]]:
        """The members' options at ``setting`` with the upstream group at ``up``."""
        opts = self.settings[setting][2]
        if up == "keep" or not self.shared:
            return opts
        if up not in self.joint:
            raise ValueError(
                f"Auto(plan=...): the channel group of {self.before} has no setting {up!r}."
            )
        return {**opts, **self.joint[up][setting]}

    def front_at(
        self, setting: str, up: str = "keep", scale: dict[str, float] | None = None
    ) -> list[tuple[tuple[str, ...], float, float]]:
        """``((setting, member options...), cost, loss)`` on the cost/loss front at one
        setting, the upstream group at ``up`` (losses multiplied by ``scale[path]`` where
        given: the removal's by the root's)."""
        scale = scale or {}
        rest, loss, _ = self.settings[setting]
        opts = self._options(setting, up)
        combos: list[tuple[tuple[str, ...], float, float]] = [
            ((setting,), rest, loss * scale.get(self.root, 1.0))
        ]
        for q in self.members:
            k = scale.get(q, 1.0)
            combos = _front(
                [((*n, o[0]), c + o[1], v + o[2] * k) for n, c, v in combos for o in opts[q]]
            )
        return combos

    def choices(
        self, scale: dict[str, float] | None = None
    ) -> list[tuple[tuple[str, ...], float, float]]:
        """``((setting, member options...), cost, loss)`` on the cost/loss front, the upstream
        group (if any) keeping its channels."""
        return _front([c for s in self.settings for c in self.front_at(s, "keep", scale)])

    def option(self, setting: str, member: str, name: str, up: str = "keep") -> Option:
        """A member's option at a setting (the upstream group at ``up``)."""
        found = [o for o in self._options(setting, up)[member] if o[0] == name]
        if not found:
            raise ValueError(
                f"Auto(plan=...): {member} has no option {name!r} with its group at {setting!r}."
            )
        return found[0]

    def cost_loss(
        self, setting: str, names: dict[str, str], up: str = "keep"
    ) -> tuple[float, float]:
        """The group's cost and estimated loss at ``setting`` with its members' options (the
        upstream group at ``up``)."""
        rest, loss, _ = self.settings[setting]
        picked = [self.option(setting, q, names.get(q, "keep"), up) for q in self.members]
        return rest + sum(o[1] for o in picked), loss + sum(o[2] for o in picked)


#: the most points a chain of groups keeps on its front while it is combined (evenly spaced)
_CHAIN_POINTS = 256


def _thin(front: list[Any], cap: int = _CHAIN_POINTS) -> list[Any]:
    """At most ``cap`` points of a front, evenly spaced along it, both ends kept."""
    if len(front) <= cap:
        return front
    n = len(front)
    return [front[i] for i in sorted({round(j * (n - 1) / (cap - 1)) for j in range(cap)})]


def _front(items: list[Any]) -> list[Any]:
    """The ``(name, cost, loss)`` items no other beats on both cost and loss, cheapest first."""
    out: list[Any] = []
    for it in sorted(items, key=lambda x: (x[1], x[2])):
        if not out or it[2] < out[-1][2]:
            out.append(it)
    return out


@dataclass
class AutoTable:
    """What :meth:`Auto.table` measured: per layer, ``(candidate, cost, estimated loss)``
    options (the first is keeping the layer), and the whole model's cost.

    Attributes:
        metric_name: ``"bytes"``, ``"MACs"`` or ``"latency"`` (milliseconds).
        total: the model's cost today.
        options: ``{layer path: [(candidate name, cost, loss), ...]}`` for the layers chosen
            one by one.
        unavailable: ``{layer path: {candidate name: why}}`` for candidates a layer cannot
            take (a layer too small for the clusters, a rank that saves nothing, a channel
            group the search does not price...).
        left: ``{layer path: why}`` for the layers the search leaves as they are (an LM
            head, a grouped convolution, an output layer tied to a searched embedding...).
        groups: ``{root path: ChannelGroup}`` for the channel groups (with channel
            candidates); their layers are not in ``options``. Groups linked by ``before``
            (a layer reading one group's channels and writing the next's) form a chain, one
            knapsack item: :meth:`chains`.
    """

    metric_name: str
    total: float
    options: dict[str, list[Option]]
    unavailable: dict[str, dict[str, str]]
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    groups: dict[str, ChannelGroup] = dataclasses.field(default_factory=dict)
    _fronts: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[str]:
        """Every layer the search chooses for (one by one or in a group)."""
        return [*self.options, *(q for g in self.groups.values() for q in g.members)]

    def chains(self) -> list[list[str]]:
        """The groups' roots in chains, upstream first: each chain is one knapsack item (a
        group alone is a chain of one)."""
        after = {g.before: r for r, g in self.groups.items() if g.before is not None}
        out = []
        for r, g in self.groups.items():
            if g.before is None:
                chain = [r]
                while chain[-1] in after:
                    chain.append(after[chain[-1]])
                out.append(chain)
        return out

    def chain_front(
        self, chain: list[str], scale: dict[str, float] | None = None
    ) -> list[tuple[tuple[tuple[str, ...], ...], float, float]]:
        """A chain's options on its cost/loss front: ``(per group (setting, member
        options...), cost, loss)``, by dynamic programming along the chain (per setting of
        the group reached, the front of everything upstream of it; a shared layer's options
        are the ones measured at both its groups' settings). Fronts longer than
        ``_CHAIN_POINTS`` are thinned evenly while combining."""
        key = (tuple(chain), tuple(sorted((scale or {}).items())))
        if key not in self._fronts:
            self._fronts[key] = self._chain_front(chain, scale)
        return self._fronts[key]

    def _chain_front(
        self, chain: list[str], scale: dict[str, float] | None
    ) -> list[tuple[tuple[tuple[str, ...], ...], float, float]]:
        first = self.groups[chain[0]]
        fronts = {
            s: [((n,), c, v) for n, c, v in first.front_at(s, "keep", scale)]
            for s in first.settings
        }
        for root in chain[1:]:
            g = self.groups[root]
            new = {}
            for s in g.settings:
                combos = [
                    ((*names, n), c + c2, v + v2)
                    for up, prev in fronts.items()
                    for n, c2, v2 in g.front_at(s, up, scale)
                    for names, c, v in prev
                ]
                new[s] = _thin(_front(combos))
            fronts = new
        return _thin(_front([x for f in fronts.values() for x in f]))

    def _items(self, scale: dict[str, float] | None = None) -> dict[str, list[Any]]:
        """The knapsack's items: each layer chosen alone (losses times ``scale[path]``), and
        each chain of groups (its options named by their index in :meth:`chain_front`, the
        front kept as the option's fourth entry)."""
        scale = scale or {}
        items: dict[str, list[Any]] = {
            p: [(n, c, loss * scale.get(p, 1.0)) for n, c, loss in o]
            for p, o in self.options.items()
        }
        for chain in self.chains():
            front = self.chain_front(chain, scale)
            items["\0" + chain[0]] = [(str(i), c, v, x) for i, (x, c, v) in enumerate(front)]
        return items

    @property
    def fixed(self) -> float:
        """The cost of everything the search does not change."""
        return (
            self.total
            - sum(o[0][1] for o in self.options.values())
            - sum(g.cost_loss("keep", {})[0] for g in self.groups.values())
        )

    def smallest(self) -> float:
        """The least reachable cost, as a fraction of today's."""
        return (
            self.fixed + sum(min(o[1] for o in opts) for opts in self._items().values())
        ) / self.total

    def allocate(self, fraction: float, scale: dict[str, float] | None = None) -> dict[str, str]:
        """``{layer path: candidate name}`` for the layers that change under a budget of
        ``fraction`` of today's cost, with the least total estimated loss (each layer's
        estimates multiplied by ``scale[path]`` where given: how :func:`nnslim.compress`
        corrects them after measuring). A pruned channel group's root carries the channel
        setting (``"channels-0.25"``, or ``"channels-0.25+int8"`` with its own option)."""
        budget = fraction * self.total
        if self.smallest() * self.total > budget * (1 + 1e-9):
            raise ValueError(
                f"Auto(target=...): the smallest reachable is {self.smallest():.3f} of the "
                f"model's {self.metric_name} (every chosen layer at its smallest setting, the "
                f"rest as it is); ask for at least that, or add smaller candidates."
            )
        full = self._items(scale)
        items = {p: [o[:3] for o in opts] for p, opts in full.items()}
        # a budget at the smallest reachable (within the check's slack) gets exactly that room
        floor = sum(min(c for _, c, _ in o) for o in items.values())
        choice = _allocate(items, max(budget - self.fixed, floor))
        chains = {c[0]: c for c in self.chains()}
        plan: dict[str, str] = {}
        for p, i in choice.items():
            if p.startswith("\0"):
                for root, names in zip(chains[p[1:]], full[p][i][3], strict=True):
                    plan.update(self._group_plan(self.groups[root], names))
            elif self.options[p][i][0] != "keep":
                plan[p] = self.options[p][i][0]
        return plan

    @staticmethod
    def _group_plan(g: ChannelGroup, names: tuple[str, ...]) -> dict[str, str]:
        setting, *per = names
        plan = {q: n for q, n in zip(g.members, per, strict=True) if n != "keep"}
        if setting != "keep":
            own = plan.get(g.root)
            plan[g.root] = setting if own is None else f"{setting}+{own}"
        return plan

    def _parts(self, plan: dict[str, str]) -> list[tuple[float, float]]:
        """(cost, loss) of each layer and group under ``plan``."""
        out = []
        for p, opts in self.options.items():
            name = plan.get(p, "keep")
            found = [o for o in opts if o[0] == name]
            if not found:
                raise ValueError(f"Auto(plan=...): {p} has no option {name!r}.")
            out.append(found[0][1:])
        for root, g in self.groups.items():
            setting, own = split_setting(plan.get(root, "keep"), g.settings)
            names = {q: plan.get(q, "keep") for q in g.members}
            names[root] = own
            up = "keep"
            if g.before is not None:
                before = self.groups[g.before]
                up = split_setting(plan.get(g.before, "keep"), before.settings)[0]
            out.append(g.cost_loss(setting, names, up))
        return out

    def cost_of(self, plan: dict[str, str]) -> float:
        """The predicted cost of a plan (the whole model's)."""
        return self.fixed + sum(c for c, _ in self._parts(plan))

    def loss_of(self, plan: dict[str, str]) -> float:
        """The estimated loss increase of a plan."""
        return sum(v for _, v in self._parts(plan))

    def front(self, fractions: Any = None) -> list[dict[str, Any]]:
        """The predicted loss at each budget (default: 10 steps from the smallest reachable
        to today's cost): ``[{"budget", "cost", "loss", "plan"}]``, the cheapest first.
        Each point is the knapsack's optimum for its budget, so the loss falls as the budget
        grows: the estimated Pareto front of cost against loss."""
        if fractions is None:
            lo = self.smallest()
            fractions = [lo + (1 - lo) * i / 9 for i in range(10)]
        points = []
        for f in sorted(fractions):
            plan = self.allocate(f)
            points.append(
                {
                    "budget": f,
                    "cost": self.cost_of(plan) / self.total,
                    "loss": self.loss_of(plan),
                    "plan": plan,
                }
            )
        return points

    def names(self) -> list[str]:
        """The candidate names the table holds (``keep`` first; channel settings after)."""
        seen: dict[str, None] = {}
        for opts in self.options.values():
            for name, _, _ in opts:
                seen.setdefault(name, None)
        for g in self.groups.values():
            for _, _, opts in g.settings.values():
                for o in opts.values():
                    for name, _, _ in o:
                        seen.setdefault(name, None)
        for g in self.groups.values():
            for setting in g.settings:
                seen.setdefault(setting, None)
        return list(seen)


def _name(c: Any) -> str:
    """A candidate's name: a built-in's own, or the transform's repr."""
    return c if isinstance(c, str) else repr(c)


def measure_table(
    auto: Auto,
    model: nn.Module,
    ctx: Context,
    batches: list[Any],
    layers: dict[str, nn.Module],
    metric: str,
    stats: dict[str, LayerStats] | None = None,
) -> AutoTable:
    """``auto``'s table for ``layers`` of ``model`` under ``metric`` (``"param_bytes"``,
    ``"macs"`` or ``"latency_ms"``): K-FAC statistics from one pass over ``batches`` (or
    ``stats``, gathered elsewhere: :func:`nnslim.compress_checkpoint` gathers them block by
    block, with the channels' empirical Fisher where there are channel candidates), then each
    candidate on a copy of each layer (channel candidates per group).
    :meth:`Auto.table` calls it with the layers it chose and caches the result."""
    from ..profiling.profiler import profile

    named = dict(model.named_modules())
    ties = tied_heads(model, {p: m for p, m in layers.items() if isinstance(m, nn.Embedding)})
    watched = {**layers, **{h: named[h] for h in ties.values()}}
    if stats is None:
        stats = collect(model, batches, watched, gram=True, out_grads=True)
    n_batches = batch_count(len(batches))  # every process's, where statistics are summed
    inputs = ctx.inputs if ctx.inputs is not None else batches[0]
    timed = metric == "latency_ms"
    whole = profile(model, inputs, memory=False)
    runtime = auto.runtime
    total = (
        _time_ms(model, inputs, runtime, ".") if timed else float(getattr(whole, _COSTS[metric]))
    )
    shapes = _conv_input_shapes(model, inputs, layers) if timed else {}
    options: dict[str, list[Option]] = {}
    unavailable: dict[str, dict[str, str]] = {}
    # with method="gptq", a Linear's quantization candidates are measured by GPTQ on the
    # layer's input Gram (what GPTQ gains is part of the estimate); other layers round
    probes = [
        (_name(c), auto._transform(c), _probe_transform(auto._transform(c)))
        for c in auto.candidates
    ]
    structured = [
        (_name(c), auto._transform(c)) for c in auto.candidates if is_channel_candidate(c)
    ]
    probes = [x for x in probes if not is_channel_candidate(x[1])]

    def prepare(p: str, m: nn.Module) -> tuple[Any, ...]:
        st = stats[p]
        fisher = st.extra.get("out_grad_sq")
        embedding = isinstance(m, nn.Embedding)
        if (st.gram is None and not embedding) or fisher is None or st.rows == 0:
            raise ValueError(
                f"Auto: module {p} saw no calibration input (or no gradient reached it); "
                f"it is not on the path of the calibration batches: exclude it."
            )
        # the loss is a mean over each batch's rows: summed squared output gradients over B
        # batches, / B^2, weight the summed input Gram
        f = fisher.float() / n_batches**2
        # an embedding's inputs are one-hot: its Gram is the diagonal of token counts
        gram = st.extra["counts"].float() if embedding else st.gram.float()
        if _conv(m):  # the Gram summed over input positions, counted per output position
            gram = gram * (float(st.extra["out_rows"]) / max(1, st.rows))
        head = stats[ties[p]] if p in ties else None
        w = (m.weight if _conv(m) or embedding else linear_weight(m)).detach().float()
        base = _LayerProbe(m)
        scale = 1.0
        if metric != "param_bytes":
            calls = float(whole.modules[p].macs) if p in whole.modules else 0.0
            scale = calls / base.cost["macs"] if base.cost["macs"] else 0.0
        if timed:  # timed on what it sees in a forward: its time per forward
            timing[p] = shapes.get(p) or (max(1, round(scale)), w.shape[1])
            base.time_on(timing[p], runtime)
            scale = 1.0 if calls else 0.0
        return w, f, gram, head, base, scale

    groups: dict[str, ChannelGroup] = {}
    timing: dict[str, tuple[int, ...]] = {}  # a latency budget: the shape each layer is timed on
    if structured:
        given = stats if stats is not None and _has_in_fisher(stats) else None
        found, why_not = _channel_groups(model, ctx, batches, layers, structured, given)
        for root, why in why_not.items():
            unavailable.setdefault(root, {}).update(why)
        figures = _figures(model, inputs, found, layers, whole, metric, runtime)
        by_root = {g.root: g for g in found}
        for g in found:
            prepared = {
                q: prepare(q, layers[q]) for q in g.members if q in layers and q not in g.lent
            }
            groups[g.root] = _group_options(
                g,
                prepared,
                probes,
                structured,
                metric,
                figures,
                timing,
                n_batches,
                unavailable,
                by_root.get(g.before) if g.before is not None else None,
                runtime,
            )
            for q in prepared:
                stats[q].gram = None
    in_groups = {q for g in groups.values() for q in g.members}
    for p, m in layers.items():
        if p in in_groups:
            continue
        w, f, gram, head, base, scale = prepare(p, m)
        opts, why = _layer_options(m, base, w, f, gram, probes, metric, scale, head, n_batches)
        if why:
            unavailable.setdefault(p, {}).update(why)
        options[p] = opts
        stats[p].gram = None
    for h in ties.values():
        stats[h].gram = None
    return AutoTable(_METRIC_NAMES[metric], total, options, unavailable, groups=groups)


def _layer_options(
    m: nn.Module,
    base: _LayerProbe,
    w: torch.Tensor,
    f: torch.Tensor,
    gram: torch.Tensor,
    probes: list[tuple[str, Transform, Transform]],
    metric: str,
    scale: float,
    head: LayerStats | None,
    n_batches: int,
) -> tuple[list[Option], dict[str, str]]:
    """One layer's options (keeping it first) and the candidates it cannot take, why: each
    candidate applied to a copy of ``base``'s layer, its cost, and its K-FAC loss from the
    output factor ``f`` and the input Gram ``gram`` (``head``: the statistics of an output
    layer tied to an embedding, which changes with it)."""
    embedding = isinstance(m, nn.Embedding)
    opts: list[Option] = [("keep", base.cost[metric] * scale, 0.0)]
    unavailable: dict[str, str] = {}
    for name, applied, rounded in probes:
        gptq = isinstance(applied, Quantize) and applied.method == "gptq" and is_linear(m)
        # a sparsity candidate's importance (Wanda's norms, SparseGPT's Hessian) from the Gram
        sparse = is_sparsity_candidate(applied)
        try:
            new = base.apply(applied, gram=gram) if gptq or sparse else base.apply(rounded)
        except ValueError as e:
            unavailable[name] = str(e).split("\n")[0][:200]
            continue
        if new is None:
            unavailable[name] = "leaves the layer as it is"
            continue
        cost, after = new
        d = after - w
        if d.dim() == 4 or not embedding:
            loss = _kfac(d, gram, f)
        else:  # rows (vocab, dim): the weight is the transpose of a Linear's
            loss = 0.5 * float((gram @ d.pow(2)) @ f)
            if head is not None:  # the tied head changes by the same rows
                fh = head.extra["out_grad_sq"].float() / n_batches**2
                loss += _kfac(d, head.gram.float(), fh)
        opts.append((name, cost[metric] * scale, loss))
    return opts, unavailable


def _kfac(d: torch.Tensor, gram: torch.Tensor, f: torch.Tensor) -> float:
    """``1/2 sum_o f_o d_o G d_o^T``: the K-FAC loss of a weight change ``d`` (out, in) or, for
    a convolution (out, in, kh, kw), of each kernel offset's slice against the channels'
    Gram (the offsets' cross terms left out)."""
    if d.dim() == 4:
        d = d.flatten(2)
        return 0.5 * float(torch.einsum("oik,ij,ojk->o", d, gram, d) @ f)
    return 0.5 * float(((d @ gram) * d).sum(1) @ f)


def is_channel_candidate(c: Any) -> bool:
    """A candidate that removes channels: one setting for a coupled group, not a layer."""
    c = CANDIDATES.get(c, c) if isinstance(c, str) else c
    return isinstance(c, Prune) and c.structure == "channels"


def is_sparsity_candidate(c: Any) -> bool:
    """A candidate that zeroes single weights of a layer and stores it packed."""
    c = CANDIDATES.get(c, c) if isinstance(c, str) else c
    return isinstance(c, Prune) and c.structure != "channels"


def split_setting(entry: str, structured: Any) -> tuple[str, str]:
    """A plan entry as ``(channel setting or "keep", layer candidate or "keep")``: a group's
    root carries ``"channels-0.25"`` or ``"channels-0.25+int8"``."""
    for name in structured:
        if entry == name:
            return name, "keep"
        if entry.startswith(name + "+"):
            return name, entry[len(name) + 1 :]
    return "keep", entry


@dataclass
class _Found:
    """A coupled channel group Auto searches: its members with parameters (path -> the sides
    pruned, ``"out"`` / ``"in"``), and per channel setting the indices each member loses."""

    root: str
    members: dict[str, set[str]]
    modules: dict[str, nn.Module]
    pruners: dict[str, Any]
    removed: dict[str, dict[tuple[str, str], list[int]]] = dataclasses.field(default_factory=dict)
    gone: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    fisher: dict[str, float] = dataclasses.field(default_factory=dict)  # setting -> estimate
    attention: AttentionSpec | None = None  # a group of heads: the attention module
    before: str | None = None  # the group upstream in a chain: see ChannelGroup
    shared: list[str] = dataclasses.field(default_factory=list)  # its layers this one prices
    lent: set[str] = dataclasses.field(default_factory=set)  # layers the next group prices


def _channel_groups(
    model: nn.Module,
    ctx: Context,
    batches: list[Any],
    layers: dict[str, nn.Module],
    structured: list[tuple[str, Any]],
    fisher: dict[str, LayerStats] | None = None,
) -> tuple[list[_Found], dict[str, dict[str, str]]]:
    """The coupled channel groups the structured candidates may prune, and why the others are
    left (by root). A group is searched when every layer it touches is a searched Linear or
    dense convolution, or maps each channel to itself (a BatchNorm, a depthwise
    convolution): a channel's removal is then exactly its readers' inputs zeroed; and when it
    shares no layer with a group taken before (smaller groups first) or joins its chain
    (:func:`_chain_links`). An attention's heads
    are a group rooted at its query projection. Each setting removes the channels ``Prune``
    would: the lowest scores of its importance, as torch-pruning ranks them (the heads as
    ``Prune`` chooses them)."""
    from ..graph.trace import trace
    from .importance import as_importance
    from .prune import _NothingToPrune
    from .scoring import GroupScorer

    cfg = structured[0][1]
    inputs = as_inputs(ctx.inputs if ctx.inputs is not None else batches[0])
    graph = trace(model, inputs, time_limit=cfg.time_limit)
    dg = graph.dg
    named = dict(model.named_modules())
    paths = {id(m): p for p, m in named.items()}
    try:
        plan = dataclasses.replace(cfg, ratio=0.5)._plan(model, graph, Report(transform="Prune"))
    except (_NothingToPrune, ValueError):
        return [], {}
    names = [n for n, _ in structured]
    why_not: dict[str, dict[str, str]] = {}

    def refuse(root: str, why: str) -> None:
        why_not[root] = {n: why for n in names}

    taken: list[tuple[Any, dict[str, set[str]]]] = []
    for info in graph.groups(ignored=plan.frozen):
        if info.root not in plan.channels or info.root not in layers:
            continue
        members: dict[str, set[str]] = {}
        bad = ""
        for item in info.group:
            dep = item.dep
            mod = dep.target.module
            path = paths.get(id(mod))
            if path is None or not any(True for _ in mod.parameters(recurse=False)):
                continue
            kind = (
                "out"
                if dg.is_out_channel_pruning_fn(dep.handler)
                else "in"
                if dg.is_in_channel_pruning_fn(dep.handler)
                else "other"
            )
            if (is_linear(mod) or _conv(mod)) and kind != "other":
                if path not in layers:
                    bad = f"its channels reach {path}, which the search leaves as it is"
                    break
            elif not maps_each_channel(mod):
                bad = (
                    f"its channels reach {path} ({type(mod).__name__}), whose output a "
                    f"channel's removal changes beyond that channel (Auto prices a removal at "
                    f"the layers reading the channels)"
                )
                break
            members.setdefault(path, set()).add(kind)
        writers = [q for q, k in members.items() if "out" in k and q in layers]
        if not bad and not any("in" in k for q, k in members.items() if q in layers):
            bad = "no searched layer reads its channels"
        elif not bad and not in_one_module(writers):
            bad = "its channels are written by layers in different modules (a residual stream)"
        if bad:
            refuse(info.root, bad)
        else:
            taken.append((info, members))
    for spec in plan.attention:  # heads: the query rows (and key/value rows without GQA)
        if spec.path not in plan.heads:  # and the output projection's columns, per head
            continue
        root = spec.q or spec.qkv or spec.path
        bad = _heads_left(spec, layers)
        if bad:
            refuse(root, bad)
            continue
        mha = spec.kv_heads == spec.heads
        members = {spec.q: {"out"}, **({spec.k: {"out"}, spec.v: {"out"}} if mha else {})}
        taken.append((spec, {**members, spec.o: {"in"}}))
    order = {p: i for i, p in enumerate(named)}

    def root_of(c: Any) -> str:
        return c.q if isinstance(c, AttentionSpec) else c.root

    taken.sort(key=lambda c: (sum(q in layers for q in c[1]), order[root_of(c[0])]))
    owner: dict[str, list[str]] = {}  # layer -> the groups it is a member of (two: a link)
    kinds: dict[str, dict[str, set[str]]] = {}  # root -> its members' sides
    up: dict[str, str] = {}  # root -> the root of the group upstream of it in a chain
    down: dict[str, str] = {}
    chain_of: dict[str, str] = {}  # root -> the first root of its chain
    chosen = []
    for info, members in taken:
        root = root_of(info)
        why, links = _chain_links(
            root, members, owner, kinds, up, down, chain_of, isinstance(info, AttentionSpec)
        )
        if why:
            refuse(root, why)
            continue
        kinds[root] = members
        chain_of[root] = root
        for a, b in links:  # a upstream of b
            up[b], down[a] = a, b
        for r in list(chain_of):  # the chains' first roots, again
            first = r
            while first in up:
                first = up[first]
            chain_of[r] = first
        for q in members:
            owner.setdefault(q, []).append(root)
        chosen.append((info, members))
    chosen.sort(key=lambda c: order[root_of(c[0])])

    scorers: dict[str, Any] = {}
    found = []
    for info, members in chosen:
        heads = isinstance(info, AttentionSpec)
        g = _Found(
            root_of(info),
            members,
            {q: named[q] for q in members},
            {q: dg.get_pruner_of_module(named[q]) for q in members},
        )
        for name, c in structured:
            key = repr(c.importance)
            if key not in scorers:
                imp = as_importance(c.importance)
                st = c._stats(model, ctx, imp, plan.all_layers)
                by_id = {id(named[p]): v for p, v in st.items() if p in named}
                scorers[key] = GroupScorer(imp, by_id, dg)
            if heads:  # as Prune removes heads: its head scores, the same number per KV group
                with torch.no_grad():
                    scores = info.head_scores(model, scorers[key].element_scores)
                n_heads = info.removable(c.ratio)
                if n_heads <= 0:
                    why_not.setdefault(g.root, {})[name] = f"removes no head of its {info.heads}"
                    continue
                remove = info.choose(scores, n_heads)
                chans = [h * info.head_dim + d for h in remove for d in range(info.head_dim)]
                g.removed[name] = {(q, next(iter(k))): chans for q, k in members.items()}
                g.gone[name] = remove
                g.attention = info
                continue
            with torch.no_grad():
                scores = scorers[key](info.group)
            n = info.channels
            if scores is None or len(scores) != n:
                why_not.setdefault(info.root, {})[name] = "its importance gives no channel scores"
                continue
            # torch-pruning's local ranking: the lowest scores, rounded as it rounds
            k = n - int(n * (1 - c.ratio))
            if k > 0:
                idx = torch.topk(scores.cpu(), k, largest=False).indices
                if c.round_to:
                    kept = n - k
                    k = n - (kept - kept % c.round_to)
                    idx = torch.argsort(scores.cpu())[:k]
            if k <= 0 or k >= n:
                why_not.setdefault(info.root, {})[name] = (
                    f"removes {'no' if k <= 0 else 'every'} channel of its {n}"
                )
                continue
            gone = set(idx.tolist())
            removed: dict[tuple[str, str], set[int]] = {}
            for item in info.group:
                path = paths.get(id(item.dep.target.module))
                if path not in members:
                    continue
                dep = item.dep
                kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                hit = [i for i, r in zip(item.idxs, item.root_idxs) if r is not None and r in gone]
                removed.setdefault((path, kind), set()).update(hit)
            g.removed[name] = {q: sorted(v) for q, v in removed.items()}
            g.gone[name] = sorted(gone)
        if g.removed:
            found.append(g)
    _removal_estimates(model, batches, found, layers, fisher)
    kept = {g.root: g for g in found}
    for b, a in up.items():  # links between groups both kept: the shared layers go downstream
        if a in kept and b in kept:
            shared = [q for q in kept[b].members if a in owner[q] and q in layers]
            kept[b].before, kept[b].shared = a, shared
            kept[a].lent.update(shared)
    return found, why_not


def _chain_links(
    root: str,
    members: dict[str, set[str]],
    owner: dict[str, list[str]],
    kinds: dict[str, dict[str, set[str]]],
    up: dict[str, str],
    down: dict[str, str],
    chain_of: dict[str, str],
    heads: bool,
) -> tuple[str, list[tuple[str, str]]]:
    """Whether a group may join the ones taken (why not, or ""), and its links ``(upstream
    root, downstream root)``: a group sharing layers with taken ones joins a chain when every
    layer it shares with a group writes one group's channels and reads the other's (a
    convolution between two pruned groups), it has at most one group on each side, each of
    those has no other group on that side, and the chain closes no loop. Heads (attention)
    share no layer."""
    shared: dict[str, list[str]] = {}
    for q in members:
        for r in owner.get(q, []):
            shared.setdefault(r, []).append(q)
    if not shared:
        return "", []
    other, layer = next((r, qs[0]) for r, qs in shared.items())
    refusal = f"shares {layer} with the channel group of {other}, searched instead"
    if heads or len(shared) > 2 or any(len(owner[q]) > 1 for qs in shared.values() for q in qs):
        return refusal + " (a layer joins at most two groups, in a chain)", []
    links: list[tuple[str, str]] = []
    for r, qs in shared.items():
        if all(members[q] == {"out"} and kinds[r][q] == {"in"} for q in qs):
            if r in down:
                return refusal + f" (which already chains to {down[r]}: no branches)", []
            links.append((r, root))
        elif all(members[q] == {"in"} and kinds[r][q] == {"out"} for q in qs):
            if r in up:
                return refusal + f" (which already follows {up[r]}: no branches)", []
            links.append((root, r))
        else:
            return refusal + " (the layer must write one group's channels and read the other's)", []
    if len(links) == 2:
        ups = [a for a, b in links if b == root]
        downs = [b for a, b in links if a == root]
        if len(ups) != 1 or len(downs) != 1:
            return refusal + " (one group on each side at most: no branches)", []
        if chain_of[ups[0]] == chain_of[downs[0]]:
            return refusal + " (the chain would close a loop)", []
    return "", links


def _has_in_fisher(stats: dict[str, LayerStats]) -> bool:
    return any("in_fisher" in st.extra for st in stats.values())


def _removal_estimates(
    model: nn.Module,
    batches: list[Any],
    found: list[_Found],
    layers: dict[str, nn.Module],
    given: dict[str, LayerStats] | None = None,
) -> None:
    """Each group's estimated loss for each setting: the empirical Fisher of zeroing the
    removed channels at the layers reading them (Fisher pruning: per sample, the channels'
    ``x * dL/dx`` summed, squared; the readers' terms added), from one pass over the
    calibration batches (``given``: statistics with ``in_fisher`` gathered elsewhere, block by
    block when streaming). Not K-FAC's factored form: a removal moves every output of its
    reader together, which the factored form's diagonal output factor prices as if the
    outputs' changes were independent."""
    readers = {
        q: g.modules[q]
        for g in found
        for (q, kind) in next(iter(g.removed.values()))
        if kind == "in" and q in layers
    }
    if not readers:
        return
    stats = given if given is not None else collect(model, batches, readers, in_fisher=True)
    n_batches = batch_count(len(batches))
    for g in found:
        for setting, removed in g.removed.items():
            total = 0.0
            for (q, kind), idx in removed.items():
                st = stats.get(q) if kind == "in" and q in readers else None
                if st is None or "in_fisher" not in st.extra:
                    continue
                f = st.extra["in_fisher"]
                samples = float(st.extra["samples"])
                total += 0.5 * samples / n_batches**2 * float(f[idx][:, idx].sum())
            g.fisher[setting] = total


def _heads_left(spec: Any, layers: dict[str, nn.Module]) -> str:
    """Why Auto leaves an attention module's heads to ``Prune`` alone ("" where it searches
    them): its heads must live in separate Linear projections it searches, with nothing else
    sized by the heads."""
    if spec.qkv is not None:
        return "a fused query/key/value projection: its heads are not searched yet"
    extra = [k for k in ("per_channel", "swin", "bias_table", "tie") if spec.extra.get(k)]
    if extra or any(True for _ in spec.module.parameters(recurse=False)):
        return "tensors sized by its heads besides the projections: its heads are not searched"
    mha = spec.kv_heads == spec.heads
    missing = [p for p in (spec.q, spec.o, *((spec.k, spec.v) if mha else ())) if p not in layers]
    if missing:
        return f"its heads reach {missing[0]}, which the search leaves as it is"
    return ""


def _group_options(
    g: _Found,
    prepared: dict[str, tuple[Any, ...]],
    probes: list[tuple[str, Transform, Transform]],
    structured: list[tuple[str, Any]],
    metric: str,
    figures: dict[str, float],
    timing: dict[str, tuple[int, ...]],
    n_batches: int,
    unavailable: dict[str, dict[str, str]],
    upstream: _Found | None = None,
    runtime: str = "eager",
) -> ChannelGroup:
    """A group's settings: per channel setting (and keeping every channel) the cost of its
    members without options (BatchNorms, falling with their channels: ``figures``, see
    :func:`_figures`), the removal's estimate (its empirical Fisher at the layers reading the
    channels), and each searched member's options on its pruned copy (under a latency budget
    timed on its inputs narrowed to the channels left: ``timing``). The layers it shares with
    the group upstream in a chain (``upstream``) are measured at every pair of the two
    groups' settings; the ones it lends to the group downstream are that group's."""

    def measure(q: str, out: list[int], inn: list[int]) -> list[Option]:
        mod = g.modules[q]
        w, f, gram, head, base, scale = prepared[q]
        if not out and not inn:
            o, why = _layer_options(mod, base, w, f, gram, probes, metric, scale, head, n_batches)
            if why:
                unavailable.setdefault(q, {}).update(why)
            return o
        small = copy.deepcopy(mod)
        with torch.no_grad():
            if out:
                g.pruners[q].prune_out_channels(small, out)
            if inn:
                g.pruners[q].prune_in_channels(small, inn)
        ko = _complement(w.shape[0], out)
        ki = _complement(w.shape[1], inn)
        probe = _LayerProbe(small)
        if q in timing:  # its inputs narrowed to the channels left
            shape = list(timing[q])
            shape[1 if _conv(mod) else -1] = len(ki)
            probe.time_on(tuple(shape), runtime)
        o, _ = _layer_options(
            small,
            probe,
            w[ko][:, ki],
            f[ko],
            gram[ki][:, ki],
            probes,
            metric,
            scale,
            None,
            n_batches,
        )
        return o

    settings: dict[str, tuple[float, float, dict[str, list[Option]]]] = {}
    joint: dict[str, dict[str, dict[str, list[Option]]]] = {}
    ups = [] if upstream is None else [n for n, _ in structured if n in upstream.removed]
    for setting in ["keep", *(n for n, _ in structured if n in g.removed)]:
        removed = g.removed.get(setting, {})
        rest = 0.0
        opts: dict[str, list[Option]] = {}
        for q in g.members:
            if q in g.lent:  # priced by the group downstream, at both settings
                continue
            mod = g.modules[q]
            out = removed.get((q, "out"), [])
            inn = removed.get((q, "in"), [])
            if q not in prepared:  # per channel (a BatchNorm): its cost falls with them
                size = mod.num_features if hasattr(mod, "num_features") else mod.out_channels
                rest += figures.get(q, 0.0) * (size - len(set(out) | set(inn))) / size
                continue
            opts[q] = measure(q, out, inn)
            if q in g.shared and upstream is not None:
                for u in ups:
                    cut = upstream.removed[u].get((q, "in"), [])
                    joint.setdefault(u, {}).setdefault(setting, {})[q] = measure(
                        q, out, sorted(set(inn) | set(cut))
                    )
        if g.attention is not None:  # its own products (scores, weighted values), per head
            spec = g.attention
            own = figures.get(spec.path, 0.0)
            rest += own * (spec.heads - len(g.gone.get(setting, []))) / spec.heads
        settings[setting] = (rest, g.fisher.get(setting, 0.0), opts)
    return ChannelGroup(
        g.root,
        [q for q in g.members if q in prepared],
        settings,
        g.gone,
        before=g.before,
        shared=list(g.shared),
        joint=joint,
    )


def _figures(
    model: nn.Module,
    inputs: Any,
    found: list[_Found],
    layers: dict[str, nn.Module],
    whole: Any,
    metric: str,
    runtime: str = "eager",
) -> dict[str, float]:
    """The cost, per forward, of what a channel setting shrinks beyond the searched layers: a
    group's per-channel members (BatchNorms, depthwise convolutions) and an attention's own
    products (scores, weighted values: the module's figure less its children's). From the
    profile for bytes and MACs; under a latency budget each module timed alone on the
    arguments it receives in one forward (``_time_ms``), an attention less its children."""
    named = dict(model.named_modules())
    own: dict[str, list[str]] = {}  # path -> the children whose figures it does not count
    for g in found:
        for q in g.members:
            if q not in layers:
                own[q] = []
        if g.attention is not None:
            path = g.attention.path
            own[path] = [f"{path}.{n}" for n, _ in named[path].named_children()]
    if metric == "latency_ms":
        paths = {p for p, kids in own.items() for p in (p, *kids)}
        cost = _module_times(model, inputs, sorted(paths), runtime)
    else:
        cost = {
            p: float(getattr(whole.modules[p], _COSTS[metric]))
            for p, kids in own.items()
            for p in (p, *kids)
            if p in whole.modules
        }
    return {p: cost.get(p, 0.0) - sum(cost.get(k, 0.0) for k in kids) for p, kids in own.items()}


def _module_times(
    model: nn.Module, inputs: Any, paths: list[str], runtime: str = "eager"
) -> dict[str, float]:
    """Each module's eager time (ms) on the arguments it receives in one forward of
    ``inputs`` (those of its first call), timed alone."""
    named = dict(model.named_modules())
    seen = _first_inputs(model, inputs, {p: named[p] for p in paths})
    return {p: _time_ms(named[p], seen[p], runtime, p) for p in paths if p in seen}


def _first_inputs(model: nn.Module, inputs: Any, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """The arguments (:class:`~nnslim.base.inputs.Inputs`) each of ``modules`` receives on its
    first call in one forward of ``inputs``."""
    from ..base.inputs import Inputs

    seen: dict[str, Any] = {}

    def keep(p: str) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:  # None: arguments unchanged
            seen.setdefault(p, Inputs(tuple(args), dict(kwargs)))

        return hook

    hooks = [m.register_forward_pre_hook(keep(p), with_kwargs=True) for p, m in modules.items()]
    try:
        with torch.no_grad():
            as_inputs(inputs).call_stateless(model)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _time_ms(module: nn.Module, inputs: Any, runtime: str = "eager", path: str = "") -> float:
    """Median time of ``module`` on ``inputs`` (a tensor or example inputs), in ms, in torch
    eager or exported to ONNX Runtime."""
    from ..io import export as engines
    from ..profiling.latency import measure_latency

    try:
        if runtime == "eager":
            return measure_latency(
                module, as_inputs(inputs), warmup=2, repeat=7, min_time_s=0.01
            ).median_ms
        return engines.onnxruntime_latency(
            module, inputs, warmup=2, repeat=7, min_time_s=0.01
        ).median_ms
    except Exception as e:  # the engine's own errors derive from Exception
        if runtime == "eager":
            raise
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if path == ".":
            raise ValueError(
                f"Auto(runtime={runtime!r}): the model cannot be exported and timed there "
                f"({why}); use runtime='eager'."
            ) from e
        what = path or type(module).__name__
        raise ValueError(
            f"Auto(runtime={runtime!r}): {what} cannot be timed alone there ({why}); use "
            f"runtime='eager', or leave out the candidates that time it (channel candidates "
            f"time a group's BatchNorms and attention modules alone)."
        ) from e


def _probe_transform(t: Transform) -> Transform:
    """A candidate as measured: without calibration data (GPTQ as round to nearest)."""
    if isinstance(t, Quantize) and t.method != "rtn":
        t = dataclasses.replace(t, method="rtn")
    return t


def _conv(m: nn.Module) -> bool:
    """A dense 2-D convolution (the convolutions Auto chooses settings for)."""
    return is_conv2d(m) and m.groups == 1


def _conv_input_shapes(
    model: nn.Module, inputs: Any, layers: dict[str, nn.Module]
) -> dict[str, tuple[int, ...]]:
    """The input shape each convolution among ``layers`` sees in one forward of ``inputs``."""
    convs = {p: m for p, m in layers.items() if _conv(m)}
    return {p: tuple(a.args[0].shape) for p, a in _first_inputs(model, inputs, convs).items()}


class _LayerProbe:
    """One layer alone in a container, its cost, and a candidate's effect on a copy of it.

    A Linear is probed on one row; a convolution on the smallest image whose output has a
    position (``at``) whose window lies inside the image (no padding), so its weight can be
    read back from impulses there, whatever the stride, padding and dilation."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.timing: torch.Tensor | None = None  # a latency budget: time candidates on it
        self.runtime = "eager"
        if isinstance(layer, nn.Embedding):  # probed on one token; read back on all
            self.width = layer.num_embeddings
            self.x = torch.zeros(1, 1, dtype=torch.long, device=layer.weight.device)
        elif _conv(layer):
            w = layer.weight
            self.width = w.shape[1]
            pad = _pair(layer)
            self.at = [-(-p // s) for p, s in zip(pad, layer.stride)]
            self.start = [a * s - p for a, s, p in zip(self.at, layer.stride, pad)]
            size = [
                st + (k - 1) * d + 1 for st, k, d in zip(self.start, w.shape[2:], layer.dilation)
            ]
            self.x = torch.zeros(1, self.width, *size, device=w.device, dtype=_probe_dtype(w))
        else:
            w = linear_weight(layer)
            self.width = w.shape[1]
            self.x = torch.zeros(1, self.width, device=w.device, dtype=_probe_dtype(w))
        self.cost = self._cost(nn.Sequential(layer))
        # the layout of the weight the read-back gives: (out, in[, kh, kw]) or (vocab, dim)
        plain = _conv(layer) or isinstance(layer, nn.Embedding)
        self.shape = tuple((layer.weight if plain else linear_weight(layer)).shape)

    def time_on(self, shape: tuple[int, ...], runtime: str = "eager") -> None:
        """Time the layer, and from now on each candidate, on a random input of ``shape``
        (in ``runtime``)."""
        w = self.layer.weight
        self.timing = torch.randn(shape).to(w.device, w.dtype)
        self.runtime = runtime
        self.cost["latency_ms"] = _time_ms(self.layer, self.timing, runtime)

    def _cost(self, holder: nn.Module) -> dict[str, float]:
        from ..profiling.profiler import profile

        with torch.no_grad():
            prof = profile(holder, self.x, memory=False)
        m = prof.modules.get("0")
        return {"param_bytes": float(m.param_bytes), "macs": float(m.macs)} if m else {}

    def apply(
        self, t: Transform, gram: torch.Tensor | None = None
    ) -> tuple[dict[str, float], torch.Tensor] | None:
        """``(cost, the weight it computes with)`` after ``t``, or None if it changed
        nothing. Raises ``ValueError`` where ``t`` refuses the layer. ``gram``: the Linear's
        input Gram, for a GPTQ ``Quantize`` (which needs the layer's inputs)."""
        holder = nn.Sequential(copy.deepcopy(self.layer))
        if gram is not None and isinstance(t, Prune):
            if isinstance(holder[0], nn.Embedding):
                return None
            holder[0] = sparsify_layer(holder[0], t, gram)
        else:
            if gram is not None and isinstance(t, Quantize):
                report = Report(transform="Quantize")
                stats = LayerStats(gram=gram.clone(), rows=1)
                t._replace(holder, report, "0", holder[0], t.scheme, stats)
            else:
                report = dataclasses.replace(t, select=["0"]).apply(holder, self.x)
            if not report.changes:
                return None
        cost = self._cost(holder)
        if self.timing is not None:
            cost["latency_ms"] = _time_ms(holder[0], self.timing, self.runtime)
        exact = _own_weight(holder[0], self.shape)
        if exact is not None:
            return cost, exact
        if self.x.dim() == 4:
            return cost, self._conv_weight(holder[0])
        if not self.x.is_floating_point():  # an embedding: every row
            with torch.no_grad():
                return cost, holder[0](torch.arange(self.width, device=self.x.device)).float()
        return cost, _effective_weight(holder[0], self.width, self.x)

    def _conv_weight(self, layer: nn.Module) -> torch.Tensor:
        """``(out, in, kh, kw)``: the convolution ``layer`` computes, read back from one
        impulse per input channel and kernel offset at the probe position (less its output
        for zero: the bias)."""
        kh, kw = self.layer.weight.shape[2:]
        dh, dw = self.layer.dilation
        (ah, aw), (sh, sw) = self.at, self.start
        k = kh * kw
        with torch.no_grad():
            bias = layer(self.x).float()[0, :, ah, aw]
            out = []
            for c0 in range(0, self.width, 64):
                cs = range(c0, min(self.width, c0 + 64))
                x = self.x.expand(len(cs) * k, -1, -1, -1).clone()
                for i, c in enumerate(cs):
                    for y in range(kh):
                        for z in range(kw):
                            x[i * k + y * kw + z, c, sh + y * dh, sw + z * dw] = 1.0
                out.append(layer(x).float()[:, :, ah, aw] - bias)  # (channels * k, out)
            w = torch.cat(out)  # rows: channel, then kernel offset
            return w.reshape(self.width, kh, kw, -1).permute(3, 0, 1, 2)


def _own_weight(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The float weight an nnslim layer stands for (its ``weight``: the codes de-quantized,
    the factors multiplied...), exactly, where it has the original's shape; ``None`` for other
    modules, whose weight is read back by running them (nnslim's int kernels would round the
    read-back to bf16: noise the size of a GPTQ layer's error in its own metric)."""
    if not type(layer).__module__.startswith("nnslim.modules"):
        return None
    with torch.no_grad():
        w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
        return None
    return w.detach().float()


def _probe_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype a layer's probe input takes: the layer's own (a bf16 layer refuses fp32
    inputs)."""
    return w.dtype if w.is_floating_point() else torch.float32


def _pair(conv: nn.Module) -> tuple[int, ...]:
    """A Conv2d's padding before each spatial dim, as ints (``"same"``: torch pads
    ``dilation * (kernel - 1) // 2`` before; ``"valid"``: none)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.weight.shape[2:]))
    return tuple(conv.padding)


def _effective_weight(layer: nn.Module, width: int, zero: torch.Tensor) -> torch.Tensor:
    """``(out, in)``: what ``layer`` multiplies its input by, read back by running it on the
    identity (and subtracting its output for zero: the bias)."""
    with torch.no_grad():
        bias = layer(zero).float()
        cols = []
        step = max(1, min(width, 2**22 // max(1, int(bias.shape[-1]))))
        for i in range(0, width, step):
            eye = torch.zeros(min(step, width - i), width, device=zero.device, dtype=zero.dtype)
            eye[:, i : i + eye.shape[0]] = torch.eye(eye.shape[0], device=zero.device)
            cols.append(layer(eye).float() - bias)
        return torch.cat(cols).t()


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
    if not plans:  # a budget at (about) the smallest plan: the buckets' rounding overshoots
        smallest = {p: min(range(len(o)), key=lambda i, o=o: o[i][1]) for p, o in options.items()}
        plans = [c for c in [_fit(options, budget, smallest)] if c is not None]
    if not plans:
        raise ValueError("Auto: no combination of the candidates fits the budget.")
    return min(plans, key=lambda c: sum(options[p][i][2] for p, i in c.items()))


def _knapsack(
    options: dict[str, list[tuple[str, float, float]]],
    budget: float,
    buckets: int,
    rounding: str,
) -> dict[str, int] | None:

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
    # a budget that is a plan's cost up to float rounding fits it
    slack = 1e-9 * max(abs(budget), 1.0)
    left = budget + slack - sum(options[p][i][1] for p, i in choice.items())
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
