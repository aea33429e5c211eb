"""``ShareWeights``: k-means weight sharing (palettization) and cross-layer parameter sharing."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, final

import torch
from torch import nn

from ..base.blocks import block_lists
from ..base.describe import shape_of
from ..base.inputs import Inputs, output_tensors
from ..base.modules import (
    is_conv2d,
    is_hf_conv1d,
    is_linear,
    replace_module,
    set_module,
    shared_parameters,
    unreplaceable,
)
from ..base.snapshot import preserved_state
from ..base.validate import check_int, check_type
from ..core.calibrate import collect
from ..core.report import Report
from ..core.select import normalize_selector, per_layer_values
from ..core.transform import Context, Transform
from ..modules.masks import MASK_NAME
from ..modules.shared import MAX_CLUSTERS, PalettizedConv2d, PalettizedLinear, palettize

__all__ = ["ShareWeights"]

GRANULARITIES = ("tensor", "channel")
#: A layer with at least this fraction of exact zeros keeps them (a reserved zero centroid).
ZERO_FRACTION = 0.01
_OWNER = "ShareWeights"


def _eligible(m: nn.Module) -> bool:
    return is_linear(m) or is_conv2d(m)


def _check_clusters(name: str, value: Any) -> None:
    check_int(
        _OWNER,
        name,
        value,
        low=2,
        high=MAX_CLUSTERS,
        hint="Indices take ceil(log2(clusters)) bits: 16 clusters are 4-bit, 256 are 8-bit.",
    )


def _check_across(value: Any) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(
            f"{_OWNER}(across_layers=...): expected 'auto', a container path such as "
            f"'encoder.layer', a 're:' pattern of block paths, or a list of those; got "
            f"{value!r:.60}."
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(
                f"{_OWNER}(across_layers=...): every entry must be a non-empty string, got "
                f"{item!r:.60}."
            )
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise ValueError(
                    f"{_OWNER}(across_layers=...): invalid regular expression {item!r}: {e}."
                ) from None


@final
@dataclass(frozen=True)
class ShareWeights(Transform):
    """Share weights: k-means codebooks per layer, and one set of parameters across blocks.

    **Palettization** (``clusters``): the weights of each selected Linear, Hugging Face
    ``Conv1D`` and Conv2d layer are clustered (1-D k-means, k-means++ seeding, deterministic for
    ``seed``) and the layer is replaced by a
    :class:`~nnslim.modules.shared.PalettizedLinear`/:class:`~nnslim.modules.shared.PalettizedConv2d`
    that stores ``ceil(log2(clusters))``-bit packed indices plus a float32 codebook, so the saved
    file and the profiler's byte count shrink (16 clusters: about 8x below fp32). Its output
    equals that of the dense layer holding the clustered weight exactly; a layer with at most
    ``clusters`` distinct values is reproduced exactly. The codebook is a trainable parameter
    (each centroid receives the summed gradient of its weights; the assignment stays fixed).
    Layers pruned before (a ``weight_mask`` buffer, or at least 1% exact zeros) keep their zeros:
    entry 0 of each codebook is a zero held at zero.

    **Cross-layer sharing** (``across_layers``, ALBERT-style): repeated blocks of identical
    structure (same type, parameter shapes and ``repr``) are tied to one module object, the most
    central one of the group (smallest summed relative parameter distance to the others), most
    similar blocks first. Tied parameters are stored and counted once. With example inputs, the
    relative output error after each tie is reported; with ``max_error`` a tie that would push it
    above the limit is undone and listed. Tying runs before palettization, so with both, the
    shared blocks are clustered once.

    Args:
        clusters: codebook entries per layer, 2 to 65536 (``None``: no palettization, only
            cross-layer sharing). With ``select`` as a mapping, its values are per-layer counts.
        granularity: ``"tensor"`` (one codebook per weight), ``"channel"`` (one per output
            channel) or an integer ``n`` (one per ``n`` output channels, as coremltools'
            grouped palettization).
        sensitivity: weight the k-means by each weight's importance, the sum over calibration
            batches of its squared gradient (a Fisher-diagonal estimate, as coremltools' SKM);
            needs ``calibration``.
        across_layers: the blocks to tie: ``"auto"`` (every ModuleList/Sequential whose items
            repeat), a container path (``"encoder.layer"``: its children), a ``"re:"`` pattern
            matched against block paths (``"re:model\\.layers\\.\\d+"``), or a list of those.
        max_error: tie a block only while the model's relative output error on the example
            inputs stays at or below this (needs example inputs; ``None``: tie every block).
        seed: seed of the k-means++ sampling.
        select: layers to palettize (default: every Linear, Conv1D and Conv2d).
        exclude: layers to leave dense.

    The report gives, per palettized layer, ``clusters``, ``bits``, ``codebooks`` and ``error``
    (the relative error of its weight); per tied block, ``parameters_of`` (the block whose
    parameters it now uses), ``distance`` and ``error`` (the relative output error after the tie);
    and a note with the output error of the whole transform. Layers whose weight is tied to
    another module's (an LM head tied to the embedding), layers with fewer weights per codebook
    than ``clusters`` and other module types are left alone and listed; NaN or Inf weights are
    an error. See :doc:`/sharing`.

    Example:
        >>> import torch
        >>> from nnslim.transforms.share import ShareWeights
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> report = ShareWeights(clusters=16).apply(model, torch.randn(2, 64))
        >>> type(model[0]).__name__, model[0].bits, tuple(model[0].codebook.shape)
        ('PalettizedLinear', 4, (1, 16))
        >>> report.touched
        ['0', '2']
    """

    clusters: int | None = 16
    granularity: Literal["tensor", "channel"] | int = "tensor"
    sensitivity: bool = False
    across_layers: Any = None
    max_error: float | None = None
    seed: int = 0
    select: Any = None
    exclude: Any = None

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        if self.clusters is not None:
            _check_clusters("clusters", self.clusters)
        g = self.granularity
        if isinstance(g, str):
            if g not in GRANULARITIES:
                raise ValueError(
                    f"{_OWNER}(granularity=...): unknown value {g!r}; expected 'tensor', "
                    f"'channel' or a positive integer (output channels per codebook)."
                )
        else:
            check_int(
                _OWNER,
                "granularity",
                g,
                low=1,
                hint="Use 'tensor', 'channel' or the number of output channels per codebook.",
            )
        check_type(_OWNER, "sensitivity", self.sensitivity, bool)
        check_int(_OWNER, "seed", self.seed, low=0)
        if self.max_error is not None:
            check_type(_OWNER, "max_error", self.max_error, (int, float))
            if not (math.isfinite(self.max_error) and self.max_error > 0):
                raise ValueError(
                    f"{_OWNER}(max_error=...): expected a positive relative error such as 0.05, "
                    f"got {self.max_error!r}."
                )
            if self.across_layers is None:
                raise ValueError(
                    f"{_OWNER}(max_error=...) limits cross-layer tying; set across_layers too "
                    f"(for example across_layers='auto')."
                )
        if self.across_layers is not None:
            _check_across(self.across_layers)
        sel = normalize_selector(self.select)
        normalize_selector(self.exclude, "exclude")
        if self.clusters is None:
            if self.across_layers is None:
                raise ValueError(
                    f"{_OWNER}: nothing to do with clusters=None and across_layers=None; set "
                    f"clusters (k-means per layer), across_layers (tie repeated blocks) or both."
                )
            extra = [
                n
                for n, bad in (
                    ("select", self.select is not None),
                    ("exclude", self.exclude is not None),
                    ("sensitivity", self.sensitivity),
                    ("granularity", self.granularity != "tensor"),
                )
                if bad
            ]
            if extra:
                raise ValueError(
                    f"{_OWNER}: {', '.join(extra)} configure palettization, which "
                    f"clusters=None turns off; set clusters (e.g. 16) or drop them."
                )
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    _check_clusters(f"select[{key!r}]", v)

    # ------------------------------------------------------------------------------------------
    # -- the compress loop ----------------------------------------------------------------------
    def split(self, steps: int) -> list[Transform]:
        """Halve the clusters each step down to ``clusters`` (16 in 3 steps: 64, 32, 16), each
        step clustering the layers' current values again; sharing across layers is one step."""
        if (
            steps <= 1
            or not isinstance(self.clusters, int)
            or self.across_layers is not None
            or per_layer_values(self.select)
        ):
            return [self]
        ks = sorted({min(self.clusters << k, MAX_CLUSTERS) for k in range(steps)}, reverse=True)
        return [replace(self, clusters=k) for k in ks]

    def gentler(self) -> ShareWeights | None:
        """Twice the clusters."""
        if isinstance(self.clusters, int) and self.clusters < MAX_CLUSTERS:
            return replace(self, clusters=min(2 * self.clusters, MAX_CLUSTERS))
        return None

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        if self.max_error is not None:
            ctx.require_inputs(
                f"{_OWNER}(max_error={self.max_error})", "to measure the output error of each tie"
            )
        ref = _outputs(model, ctx.inputs) if ctx.inputs is not None else None
        if self.across_layers is not None:
            self._tie(model, ctx.inputs, ref, report)
        if self.clusters is not None:
            self._palettize(model, ctx, report)
        if ref is not None and ctx.inputs is not None:
            err = _rel_error(_outputs(model, ctx.inputs), ref)
            report.note(
                f"relative output error on the example inputs: {err:.4g}"
                if math.isfinite(err)
                else "the output's shape changed on the example inputs (a detector keeps the "
                "boxes its scores pass), so no relative error is given"
            )

    # -- cross-layer sharing --------------------------------------------------------------------
    def _tie(
        self,
        model: nn.Module,
        inputs: Inputs | None,
        ref: list[torch.Tensor] | None,
        report: Report,
    ) -> None:
        groups = _block_groups(model, self.across_layers)
        for paths in groups:
            mods: list[nn.Module] = []
            keep: list[str] = []
            for p in paths:
                m = model.get_submodule(p)
                same = next((q for q, o in zip(keep, mods) if o is m), None)
                if same is not None:
                    report.skipped(p, f"already the same module as {same}")
                    continue
                mods.append(m)
                keep.append(p)
            if len(mods) < 2:
                continue
            dist = _distances(mods)
            r = int(dist.sum(1).argmin())
            order = sorted((j for j in range(len(mods)) if j != r), key=lambda j: float(dist[r, j]))
            tied: dict[int, float | None] = {}
            for j in order:
                set_module(model, keep[j], mods[r])
                err = None
                if ref is not None and inputs is not None:
                    err = _rel_error(_outputs(model, inputs), ref)
                    if self.max_error is not None and err > self.max_error:
                        set_module(model, keep[j], mods[j])
                        report.skipped(
                            keep[j],
                            f"tying it to {keep[r]} would raise the relative output error to "
                            f"{err:.4g} > max_error={self.max_error}",
                        )
                        continue
                tied[j] = err
            if not tied:
                report.note(f"{keep[r]} was chosen to be shared, but no block was tied to it")
                continue
            # the earliest tied block hosts the shared parameters, so that every other position
            # is an alias of a module that stays where it was (a recordable edit)
            host = min([r, *tied])
            if host != r:
                _adopt(mods[host], mods[r])
                for j in [r, *tied]:
                    set_module(model, keep[j], mods[host])
            for j in sorted([r, *tied]):
                if j == host and host == r:
                    continue
                details: dict[str, Any] = {"parameters_of": keep[r]}
                if j != r:
                    details["distance"] = float(dist[r, j])
                    if tied[j] is not None:
                        details["error"] = tied[j]
                after = f"parameters of {keep[r]}" if j == host else f"same module as {keep[host]}"
                report.changed(keep[j], "tied", shape_of(mods[j]), after, **details)
            members = [keep[j] for j in sorted([r, *tied])]
            report.note(
                f"{keep[host]} holds the parameters of {keep[r]} (the most central block) for "
                f"{len(members)} blocks: {members}"
            )
            if len({_layer_idx(mods[j]) for j in [r, *tied]}) > 1:
                report.note(
                    f"the blocks tied to {keep[host]} had distinct layer_idx attributes; the "
                    f"shared module keeps those of {keep[host]}, so a key/value cache (text "
                    f"generation) would mix the layers: run them with use_cache=False."
                )

    # -- palettization --------------------------------------------------------------------------
    def _palettize(self, model: nn.Module, ctx: Context, report: Report) -> None:
        default_k = self.clusters
        if default_k is None:  # pragma: no cover - guarded by _apply
            return
        eligible = self._palettizable(model, report)
        plan = self._palettize_plan(model, eligible, default_k, report)
        named = dict(model.named_modules())
        dense = {p: named[p] for p in plan if not _palettized(named[p])}
        importance = self._importance(model, ctx, dense, report) if dense else {}
        if self.sensitivity and len(dense) < len(plan):
            report.note(
                "palettized layers clustered again are weighted by their current values only "
                "(no weight gradient exists for them)"
            )
        locations = _locations(model)
        for p, (k, gs, keep_zeros) in plan.items():
            old = named[p]
            w = _weight2d(old)
            imp = importance.get(p)
            book, codes, zero_code = palettize(
                w,
                k,
                group_size=gs,
                importance=imp,
                keep_zeros=keep_zeros,
                seed=self.seed,
            )
            book = book.to(w.device)
            if isinstance(old, (nn.Conv2d, PalettizedConv2d)):
                new: nn.Module = PalettizedConv2d.from_codes(old, book, codes, gs, zero_code)
            else:
                new = PalettizedLinear.from_codes(old, book, codes, gs, zero_code)
            with torch.no_grad():
                ref = w.float()
                err = float((new.dequantize().reshape(ref.shape) - ref).norm() / ref.norm())
            details: dict[str, Any] = {
                "clusters": new.clusters,
                "bits": new.bits,
                "codebooks": new.codebook.shape[0],
                "error": err if math.isfinite(err) else 0.0,
                "zeros_kept": keep_zeros,
            }
            if self.sensitivity:
                details["sensitivity"] = imp is not None
            first = None
            for where in locations[id(old)]:
                if first is None:
                    first = where
                    report.changed(where, "palettized", shape_of(old), shape_of(new), **details)
                else:
                    report.changed(where, "palettized", shape_of(old), shape_of(new), same_as=first)
                replace_module(model, where, new)

    def _palettizable(self, model: nn.Module, report: Report) -> list[tuple[str, nn.Module]]:
        """The layers that can be palettized (the others listed in ``report`` with why)."""
        named = dict(model.named_modules())
        # palettized layers are candidates too: one with more clusters than asked is clustered
        # again from its current values (how compress() shares weights in steps)
        left = unreplaceable(model)
        eligible = [
            (p, m)
            for p, m in named.items()
            if p and p not in left and (_eligible(m) or _palettized(m))
        ]
        for p, m in named.items():
            w = m._parameters.get("weight")
            if p in left:
                report.skipped(p, left[p])
            elif w is not None and w.dim() >= 2 and not (p and _eligible(m)):
                why = (
                    "the root module cannot be replaced; wrap it in a container"
                    if not p and _eligible(m)
                    else f"{type(m).__name__} is not palettized (only Linear, Conv1D and Conv2d)"
                )
                report.skipped(p, why)
        if not eligible:
            raise ValueError(
                f"{_OWNER}: the model has no Linear, Conv1D or Conv2d layer to palettize; use "
                f"clusters=None for cross-layer sharing alone."
            )
        return eligible

    def _palettize_plan(
        self,
        model: nn.Module,
        eligible: list[tuple[str, nn.Module]],
        default_k: int,
        report: Report,
    ) -> dict[str, tuple[int, int, bool]]:
        """``{path: (clusters, group size, keep zeros)}`` for the selected layers that can take
        their clusters (the others listed in ``report``, or an error for an explicit choice)."""
        named = dict(model.named_modules())
        sel = normalize_selector(self.select)
        explicit = (
            {k for k, _ in sel if isinstance(k, str) and not k.startswith("re:")} if sel else set()
        )
        picked = dict(self.resolve(model, self.select, eligible=eligible))
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p, _ in eligible:
            if p not in chosen:
                report.skipped(p, "excluded" if p in picked else "not selected")
        tied = _tied_weights(model)
        plan: dict[str, tuple[int, int, bool]] = {}
        for p, value in chosen.items():
            m = named[p]
            k = int(value) if value is not None else default_k
            if _palettized(m) and m.clusters <= k:
                report.skipped(p, f"already palettized with {m.clusters} clusters (<= {k})")
                continue
            w = _weight2d(m)
            own = m._parameters.get("weight")
            others = [
                path
                for key, path in (tied.get(id(own), {}) if own is not None else {}).items()
                if key != (id(m), "weight")
            ]
            if others:
                why = (
                    f"its weight is tied to {others[0]}; palettizing it would untie them and "
                    f"store the weight twice"
                )
                if p in explicit:
                    raise ValueError(f"{_OWNER}: module {p} ({shape_of(m)}): {why}.")
                report.skipped(p, why)
                continue
            if not torch.isfinite(w).all():
                raise ValueError(
                    f"{_OWNER}: module {p} ({shape_of(m)}) has NaN or Inf weights; fix or exclude "
                    f"it (exclude=[{p!r}])."
                )
            out, per = w.shape
            gs = self._group_size(out)
            smallest = (out % gs or gs) * per
            if smallest < k:
                why = f"{smallest} weights per codebook, fewer than the {k} clusters"
                if p in explicit:
                    raise ValueError(
                        f"{_OWNER}: module {p} ({shape_of(m)}) has {why}; give it fewer clusters "
                        f"(select={{{p!r}: {max(2, smallest // 2)}}}) or exclude it."
                    )
                report.skipped(p, why)
                continue
            # a palettized layer keeps the zeros it held at zero (pruned weights)
            keep = m.zero_code >= 0 if _palettized(m) else _keeps_zeros(m, w)
            plan[p] = (k, gs, keep)
        if not plan:
            why = "; ".join(f"{s.path}: {s.reason}" for s in report.skips[:4])
            raise ValueError(
                f"{_OWNER}: no layer left to palettize ({why}). Lower clusters, change "
                f"select/exclude, or use clusters=None for cross-layer sharing alone."
            )
        return plan

    def _group_size(self, out: int) -> int:
        if self.granularity == "tensor":
            return out
        if self.granularity == "channel":
            return 1
        return min(int(self.granularity), out)

    def _importance(
        self,
        model: nn.Module,
        ctx: Context,
        layers: dict[str, nn.Module],
        report: Report,
    ) -> dict[str, torch.Tensor]:
        if not self.sensitivity:
            return {}
        batches = ctx.require_calibration(
            f"{_OWNER}(sensitivity=True)", "to weight the k-means by squared gradients"
        )
        imp: dict[str, torch.Tensor] = {}
        for batch in batches:  # one batch at a time: the Fisher diagonal sums squares
            stats = collect(model, [batch], layers, grads=True)
            for p, st in stats.items():
                if st.grad is not None:
                    g2 = st.grad.float().pow(2)
                    if is_hf_conv1d(layers[p]):
                        g2 = g2.t()
                    imp[p] = g2 if p not in imp else imp[p] + g2
        missing = [p for p in layers if p not in imp or not bool((imp[p] > 0).any())]
        if missing:
            report.note(
                f"no gradient reached {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"they were clustered without importance weights"
            )
        return {
            p: v.reshape(_weight2d(layers[p]).shape) for p, v in imp.items() if p not in missing
        }


# -- helpers ------------------------------------------------------------------------------------
def _palettized(m: nn.Module) -> bool:
    return isinstance(m, (PalettizedLinear, PalettizedConv2d))


def _weight2d(m: nn.Module) -> torch.Tensor:
    """The weight as ``(out, n)``, with a ``weight_mask`` applied (masked entries are zero).

    A palettized layer gives its current clustered weight.
    """
    if _palettized(m):
        w = m.dequantize().detach()
        return w.reshape(w.shape[0], -1)
    w = m.weight.detach()
    mask = m._buffers.get(MASK_NAME)
    if isinstance(mask, torch.Tensor) and mask.shape == w.shape:
        w = torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))
    if is_hf_conv1d(m):
        w = w.t()
    return w.reshape(w.shape[0], -1)


def _keeps_zeros(m: nn.Module, w: torch.Tensor) -> bool:
    zeros = int((w == 0).sum())
    if zeros == 0:
        return False
    return isinstance(m._buffers.get(MASK_NAME), torch.Tensor) or zeros >= ZERO_FRACTION * w.numel()


def _tied_weights(model: nn.Module) -> dict[int, dict[tuple[int, str], str]]:
    """:func:`shared_parameters` by parameter: ``id -> {(module id, name): first path}`` (a
    module that sits at several paths, cross-layer sharing, is one holder, not a tie)."""
    out: dict[int, dict[tuple[int, str], str]] = {}
    for group in shared_parameters(model):
        m, n, _ = group[0]
        holders = out.setdefault(id(m._parameters[n]), {})
        for m, n, full in group:
            holders.setdefault((id(m), n), full)
    return out


def _locations(model: nn.Module) -> dict[int, list[str]]:
    """For each module, one path per distinct (parent object, attribute name) that holds it."""
    out: dict[int, list[str]] = {}
    seen: set[tuple[int, int, str]] = set()
    for p, m in model.named_modules(remove_duplicate=False):
        if not p:
            continue
        parent_path, _, name = p.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        key = (id(m), id(parent), name)
        if key in seen:
            continue
        seen.add(key)
        out.setdefault(id(m), []).append(p)
    return out


def _outputs(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    with preserved_state(model), torch.no_grad():
        out = inputs.call(model)
    return [t.detach().float() for t in output_tensors(out) if t.is_floating_point()]


def _rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 error of the outputs; infinite where their shapes differ (a detector's box
    count follows its scores)."""
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
        return math.inf
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _signature(m: nn.Module) -> tuple[Any, ...]:
    return (
        type(m),
        repr(m),
        tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_parameters()),
        tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_buffers()),
    )


def _group(blocks: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """Paths of blocks with parameters, grouped by identical structure (groups of >= 2)."""
    by_sig: dict[Any, list[str]] = {}
    for p, m in blocks:
        if p and any(True for _ in m.parameters()):
            by_sig.setdefault(_signature(m), []).append(p)
    return [ps for ps in by_sig.values() if len(ps) >= 2]


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _inside(path: str, claimed: list[str]) -> bool:
    return any(path == c or path.startswith(c + ".") for c in claimed)


def _block_groups(model: nn.Module, spec: Any) -> list[list[str]]:
    named = dict(model.named_modules())
    specs = [spec] if isinstance(spec, str) else list(spec)
    groups: list[list[str]] = []
    claimed: list[str] = []
    arg = f"{_OWNER}(across_layers=...)"
    for s in specs:
        found: list[list[str]] = []
        if s == "auto":
            for path, mod in block_lists(model):
                if _inside(path, claimed):
                    continue
                children = [(_join(path, n), c) for n, c in mod._modules.items() if c is not None]
                gs = _group(children)
                found += gs
                claimed += [p for g in gs for p in g]
            if not found:
                raise ValueError(
                    f"{arg}: 'auto' found no ModuleList/Sequential with two items of identical "
                    f"structure; name the blocks with a 're:' pattern instead."
                )
        elif s.startswith("re:"):
            hits = [(p, m) for p, m in named.items() if p and re.fullmatch(s[3:], p)]
            hits = [(p, m) for p, m in hits if not any(p.startswith(q + ".") for q, _ in hits)]
            found = [[p for p in g if not _inside(p, claimed)] for g in _group(hits)]
            found = [g for g in found if len(g) >= 2]
            if not found:
                raise ValueError(
                    f"{arg}: {s!r} "
                    + (
                        f"matches {[p for p, _ in hits][:4]}, but no two of them have the same "
                        f"structure and parameter shapes"
                        if hits
                        else "matches no module"
                    )
                    + "; list the module paths with `[n for n, _ in model.named_modules()]`."
                )
            claimed += [p for g in found for p in g]
        else:
            if s not in named:
                close = difflib.get_close_matches(s, list(named), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(
                    f"{arg}: no module named {s!r} in the model.{hint} Name the container of the "
                    f"repeated blocks (e.g. 'encoder.layer'), or use a 're:' pattern."
                )
            container = named[s]
            children = [(_join(s, n), c) for n, c in container._modules.items() if c is not None]
            found = [[p for p in g if not _inside(p, claimed)] for g in _group(children)]
            found = [g for g in found if len(g) >= 2]
            if not found:
                raise ValueError(
                    f"{arg}: the children of {s!r} ({type(container).__name__}, "
                    f"{len(children)} children) hold no two blocks of identical structure; name "
                    f"the container of the repeated blocks (e.g. 'encoder.layer' rather than "
                    f"'encoder.layer.0')."
                )
            claimed += [p for g in found for p in g]
        groups += found
    return groups


def _distances(mods: list[nn.Module]) -> torch.Tensor:
    """Pairwise relative distances of the blocks' parameters: ``||a - b|| / mean(||a||, ||b||)``."""
    n = len(mods)
    sq = torch.zeros(n, n, dtype=torch.float64)
    norms = torch.zeros(n, dtype=torch.float64)
    params = [dict(m.named_parameters()) for m in mods]
    for name in params[0]:
        v = torch.stack([ps[name].detach().reshape(-1).float().cpu() for ps in params])
        d = torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist").double()
        sq += d.pow(2)
        norms += v.double().pow(2).sum(1)
    nrm = norms.sqrt()
    scale = ((nrm[:, None] + nrm[None, :]) / 2).clamp_min(1e-30)
    return sq.sqrt() / scale


def _adopt(host: nn.Module, source: nn.Module) -> None:
    """Point every parameter and buffer of ``host`` at the tensor objects of ``source``.

    The two have the same structure (same signature); no tensor is written.
    """
    for (_, h), (_, s) in zip(host.named_modules(), source.named_modules()):
        for name in list(h._parameters):
            h._parameters[name] = s._parameters[name]
        for name in list(h._buffers):
            h._buffers[name] = s._buffers[name]


def _layer_idx(m: nn.Module) -> tuple[Any, ...]:
    return tuple(
        (p, s.__dict__["layer_idx"]) for p, s in m.named_modules() if "layer_idx" in s.__dict__
    )
