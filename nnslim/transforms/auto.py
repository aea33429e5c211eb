"""``Auto``: choose each layer's setting to meet a size, MACs or latency budget with the least
estimated loss.

The loop the library starts from, automatic: every eligible Linear layer (dense Conv2d too:
grouped and depthwise convolutions are reported as left; and ``nn.Embedding`` tables, with an
output layer tied to one chosen with it, except under a latency budget) gets a list of
candidates (kept as it is; int8; int4 with groups of 128, 64 or 32 inputs; palettized to 256,
16 or 8 shared values; low rank keeping half or a quarter of its parameters; or any
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
from ..base.modules import is_conv2d, is_linear, linear_weight, unreplaceable
from ..base.validate import check_choice
from ..core.calibrate import LayerStats, batch_count, collect
from ..core.report import Report
from ..core.target import Target
from ..core.transform import Compose, Context, Transform
from .factorize import Factorize
from .quantize import METHODS, Quantize, _lm_heads, plain_embedding, tied_heads
from .share import ShareWeights

__all__ = ["CANDIDATES", "Auto", "AutoTable"]

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
    "palette-16": ShareWeights(clusters=16),
    "palette-8": ShareWeights(clusters=8),
    "rank-0.5": Factorize(ratio=0.5),
    "rank-0.25": Factorize(ratio=0.25),
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
            :data:`CANDIDATES` and/or transforms with a ``select`` field.
        method: how the built-in quantization candidates are applied: ``"rtn"`` or
            ``"gptq"``.
        zero_point: the built-in int4 candidates' offsets (see :class:`~nnslim.Quantize`).
        plan: ``{layer path: candidate name}``: apply this plan instead of searching (what
            :meth:`table` and :meth:`AutoTable.allocate` return; the names as
            :meth:`AutoTable.names` gives them).
        select: layers the search may change (default: every Linear, dense Conv2d and
            embedding but the LM head; a head tied to an embedding takes the embedding's
            setting).
        exclude: layers it leaves alone.

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
        if isinstance(self.plan, dict):
            object.__setattr__(self, "plan", dict(self.plan))
        if not self.candidates:
            raise ValueError("Auto(candidates=...): give at least one setting.")
        names = [_name(c) for c in self.candidates]
        for c in self.candidates:
            if isinstance(c, str):
                check_choice("Auto", "candidates", c, tuple(CANDIDATES))
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
            unknown = sorted({v for v in self.plan.values()} - set(names))
            if unknown:
                raise ValueError(f"Auto(plan=...): {unknown} are not among the candidates {names}.")
        check_choice("Auto", "method", self.method, METHODS)
        Quantize(zero_point=self.zero_point)  # validates it

    @property
    def _target(self) -> Target:
        return Target.parse("Auto", self.target)[0]

    # ------------------------------------------------------------------------------------------
    def _run(
        self, model: nn.Module, ctx: Context, report: Report, state: dict[str, Any]
    ) -> list[Any]:
        plan = self.plan if self.plan is not None else self._search(model, ctx, report)
        parts = []
        for c in self.candidates:
            paths = [p for p, n in plan.items() if n == _name(c)]
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
            table = _measure(self, model, ctx, batches, layers, metric)
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
    kept = len(table.options) - len(choice)
    if kept:
        counts = {"keep": kept, **counts}
    return (
        f"Auto: {', '.join(f'{n} {k}' for k, n in counts.items())} of "
        f"{len(table.options)} layers; predicted {table.cost_of(choice) / table.total:.4f} of "
        f"the {table.metric_name} (budget {fraction:g}), estimated loss increase "
        f"{table.loss_of(choice):.4g} (K-FAC second order; quantization candidates measured "
        f"{'by GPTQ' if auto.method == 'gptq' else 'by rounding to nearest'})"
    )


_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, AutoTable]] = weakref.WeakKeyDictionary()


@dataclass
class AutoTable:
    """What :meth:`Auto.table` measured: per layer, ``(candidate, cost, estimated loss)``
    options (the first is keeping the layer), and the whole model's cost.

    Attributes:
        metric_name: ``"bytes"``, ``"MACs"`` or ``"latency"`` (milliseconds).
        total: the model's cost today.
        options: ``{layer path: [(candidate name, cost, loss), ...]}``.
        unavailable: ``{layer path: {candidate name: why}}`` for candidates a layer cannot
            take (a layer too small for the clusters, a rank that saves nothing...).
        left: ``{layer path: why}`` for the layers the search leaves as they are (an LM
            head, a grouped convolution, an output layer tied to a searched embedding...).
    """

    metric_name: str
    total: float
    options: dict[str, list[Option]]
    unavailable: dict[str, dict[str, str]]
    left: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def fixed(self) -> float:
        """The cost of everything the search does not change."""
        return self.total - sum(o[0][1] for o in self.options.values())

    def smallest(self) -> float:
        """The least reachable cost, as a fraction of today's."""
        return (
            self.fixed + sum(min(b for _, b, _ in o) for o in self.options.values())
        ) / self.total

    def allocate(self, fraction: float, scale: dict[str, float] | None = None) -> dict[str, str]:
        """``{layer path: candidate name}`` for the layers that change under a budget of
        ``fraction`` of today's cost, with the least total estimated loss (each layer's
        estimates multiplied by ``scale[path]`` where given: how :func:`nnslim.compress`
        corrects them after measuring)."""
        budget = fraction * self.total
        if self.smallest() * self.total > budget * (1 + 1e-9):
            raise ValueError(
                f"Auto(target=...): the smallest reachable is {self.smallest():.3f} of the "
                f"model's {self.metric_name} (every chosen layer at its smallest setting, the "
                f"rest as it is); ask for at least that, or add smaller candidates."
            )
        options = self.options
        if scale:
            options = {
                p: [(n, c, loss * scale.get(p, 1.0)) for n, c, loss in o]
                for p, o in options.items()
            }
        # a budget at the smallest reachable (within the check's slack) gets exactly that room
        floor = sum(min(c for _, c, _ in o) for o in options.values())
        choice = _allocate(options, max(budget - self.fixed, floor))
        return {
            p: self.options[p][i][0] for p, i in choice.items() if self.options[p][i][0] != "keep"
        }

    def _lookup(self, plan: dict[str, str]) -> list[Option]:
        out = []
        for p, opts in self.options.items():
            name = plan.get(p, "keep")
            out.append(next(o for o in opts if o[0] == name))
        return out

    def cost_of(self, plan: dict[str, str]) -> float:
        """The predicted cost of a plan (the whole model's)."""
        return self.fixed + sum(o[1] for o in self._lookup(plan))

    def loss_of(self, plan: dict[str, str]) -> float:
        """The estimated loss increase of a plan."""
        return sum(o[2] for o in self._lookup(plan))

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
        """The candidate names the table holds (``keep`` first)."""
        seen: dict[str, None] = {}
        for opts in self.options.values():
            for name, _, _ in opts:
                seen.setdefault(name, None)
        return list(seen)


def _name(c: Any) -> str:
    """A candidate's name: a built-in's own, or the transform's repr."""
    return c if isinstance(c, str) else repr(c)


def _measure(
    auto: Auto,
    model: nn.Module,
    ctx: Context,
    batches: list[Any],
    layers: dict[str, nn.Module],
    metric: str,
    stats: dict[str, LayerStats] | None = None,
) -> AutoTable:
    """The table: K-FAC statistics from one pass (or ``stats``, gathered elsewhere: a model
    streamed block by block), then each candidate on a copy of each layer."""
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
    total = _time_ms(model, inputs) if timed else float(getattr(whole, _COSTS[metric]))
    shapes = _conv_input_shapes(model, inputs, layers) if timed else {}
    options: dict[str, list[Option]] = {}
    unavailable: dict[str, dict[str, str]] = {}
    # with method="gptq", a Linear's quantization candidates are measured by GPTQ on the
    # layer's input Gram (what GPTQ gains is part of the estimate); other layers round
    probes = [
        (_name(c), auto._transform(c), _probe_transform(auto._transform(c)))
        for c in auto.candidates
    ]
    for p, m in layers.items():
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
            base.time_on(shapes.get(p) or (max(1, round(scale)), w.shape[1]))
            scale = 1.0 if calls else 0.0
        keep = base.cost[metric] * scale
        opts: list[Option] = [("keep", keep, 0.0)]
        for name, applied, rounded in probes:
            gptq = isinstance(applied, Quantize) and applied.method == "gptq" and is_linear(m)
            try:
                new = base.apply(applied, gram=gram) if gptq else base.apply(rounded)
            except ValueError as e:
                unavailable.setdefault(p, {})[name] = str(e).split("\n")[0][:200]
                continue
            if new is None:
                unavailable.setdefault(p, {})[name] = "leaves the layer as it is"
                continue
            cost, after = new
            d = after - w
            if d.dim() == 4:  # a convolution: each kernel offset against the channels' Gram
                d = d.flatten(2)
                loss = 0.5 * float(torch.einsum("oik,ij,ojk->o", d, gram, d) @ f)
            elif embedding:  # rows (vocab, dim): the weight is the transpose of a Linear's
                loss = 0.5 * float((gram @ d.pow(2)) @ f)
                if head is not None:  # the tied head changes by the same rows
                    fh = head.extra["out_grad_sq"].float() / n_batches**2
                    loss += 0.5 * float(((d @ head.gram.float()) * d).sum(1) @ fh)
            else:
                loss = 0.5 * float(((d @ gram) * d).sum(1) @ f)
            opts.append((name, cost[metric] * scale, loss))
        options[p] = opts
        st.gram = None
    for h in ties.values():
        stats[h].gram = None
    return AutoTable(_METRIC_NAMES[metric], total, options, unavailable)


def _time_ms(module: nn.Module, inputs: Any) -> float:
    """Median eager time of ``module`` on ``inputs`` (a tensor or example inputs), in ms."""
    from ..profiling.latency import measure_latency

    return measure_latency(module, as_inputs(inputs), warmup=2, repeat=7, min_time_s=0.01).median_ms


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
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args, p=p: shapes.setdefault(p, tuple(args[0].shape))
        )
        for p, m in layers.items()
        if _conv(m)
    ]
    try:
        with torch.no_grad():
            as_inputs(inputs).call_stateless(model)
    finally:
        for h in hooks:
            h.remove()
    return shapes


class _LayerProbe:
    """One layer alone in a container, its cost, and a candidate's effect on a copy of it.

    A Linear is probed on one row; a convolution on the smallest image whose output has a
    position (``at``) whose window lies inside the image (no padding), so its weight can be
    read back from impulses there, whatever the stride, padding and dilation."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.timing: torch.Tensor | None = None  # a latency budget: time candidates on it
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
            self.x = torch.zeros(1, self.width, *size, device=w.device)
        else:
            w = linear_weight(layer)
            self.width = w.shape[1]
            self.x = torch.zeros(1, self.width, device=w.device)
        self.cost = self._cost(nn.Sequential(layer))
        # the layout of the weight the read-back gives: (out, in[, kh, kw]) or (vocab, dim)
        plain = _conv(layer) or isinstance(layer, nn.Embedding)
        self.shape = tuple((layer.weight if plain else linear_weight(layer)).shape)

    def time_on(self, shape: tuple[int, ...]) -> None:
        """Time the layer, and from now on each candidate, on a random input of ``shape``."""
        w = self.layer.weight
        self.timing = torch.randn(shape).to(w.device, w.dtype)
        self.cost["latency_ms"] = _time_ms(self.layer, self.timing)

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
            cost["latency_ms"] = _time_ms(holder[0], self.timing)
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
            eye = torch.zeros(min(step, width - i), width, device=zero.device)
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
