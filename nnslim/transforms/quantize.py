"""``Quantize``: integer weights that are really smaller and run integer kernels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, final, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..base.describe import shape_of
from ..base.modules import (
    is_conv2d,
    is_hf_conv1d,
    is_linear,
    linear_weight,
    out_width,
    replace_module,
    unreplaceable,
)
from ..base.validate import all_finite, check_choice, check_fraction, check_int, check_type
from ..core.calibrate import LayerStats, run_sequential
from ..core.report import Report
from ..core.select import normalize_selector
from ..core.transform import Context, Transform
from ..modules.fake_quant import FakeQuantLinear
from ..modules.masks import MASK_NAME
from ..modules.quantized import (
    GROUP_SIZES,
    ZERO_POINTS,
    Int4Embedding,
    Int4Linear,
    Int8Conv2d,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
    ZeroPoint,
    int4_group_size,
    padded_width,
)
from .gptq import gptq

__all__ = ["GROUP_SIZES", "SCHEMES", "Quantize", "convert", "int4_group_size"]

Scheme = Literal["int8", "int8-dynamic", "int4"]
Method = Literal["rtn", "gptq"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
METHODS: tuple[str, ...] = get_args(Method)

#: how much narrower than min/max an int4 GPTQ group's range may get (see ``gptq(clip=)``)
GPTQ_CLIP = 0.2


@final
@dataclass(frozen=True)
class Quantize(Transform):
    """Replace Linear (and Hugging Face ``Conv1D``) layers with integer-weight modules.

    Schemes:

    * ``"int8"``: int8 weights, symmetric per output channel; activations stay float
      (:class:`~nnslim.modules.quantized.Int8Linear`). Conv2d layers get int8 storage.
    * ``"int8-dynamic"``: int8 weights and int8 activations quantized per token at run time
      (:class:`~nnslim.modules.quantized.Int8DynamicLinear`).
    * ``"int4"``: 4-bit weights, asymmetric per group of ``group_size`` inputs
      (:class:`~nnslim.modules.quantized.Int4Linear`).

    Args:
        scheme: the scheme; with ``select`` as a mapping, its values are per-layer schemes.
        group_size: inputs per group for int4: 32, 64 or 128. A layer whose width it does not
            divide gets the largest smaller size that does, or, where none does, is padded
            with zero weights to the next multiple (the report gives each layer's size).
        method: ``"rtn"`` (round to nearest on each group's min/max) or ``"gptq"``
            (second-order, needs calibration; processed block by block, so only one block's
            statistics are held at a time; int4 groups get the range, up to 20% narrower than
            min/max, with the least Hessian-weighted rounding error).
        smooth: activation-aware scaling (needs calibration): for ``int8-dynamic`` the
            SmoothQuant migration strength in ``[0, 1]``; for ``int4`` a fixed AWQ exponent in
            ``[0, 1]`` or ``"auto"`` to search it per layer. ``None``: off.
        qat: insert fake-quant modules for quantization-aware training instead; turn them
            into integer modules with :func:`nnslim.convert` after fine-tuning.
        damp: GPTQ's damping: this fraction of the Hessian's mean diagonal is added to it.
        act_order: GPTQ quantizes the columns in order of decreasing Hessian diagonal (the
            inputs with the most energy first), each group's grid fixed up front from the
            float weight ("static groups", so groups stay contiguous for the kernels);
            ``False``: left to right, each group's grid from the error-updated weights.
        true_sequential: GPTQ inside each block layer group after layer group in the order
            the block runs them (a Llama block: q/k/v, then o, then gate/up, then down), each
            calibrated on the outputs of the groups already quantized; ``False``: a block's
            layers all on the block's float inputs (the block runs once).
        zero_point: int4 groups' offset: ``"float"`` (a minimum per group, as GGUF's
            ``Q4_1``) or ``"integer"`` (a zero point in ``[0, 15]`` per group, the range
            widened to include 0: what GPTQ/AWQ checkpoints hold, and what
            ``nnslim.export(format="compressed-tensors")`` needs for vLLM).
        select: layers to quantize (default: every Linear/Conv1D, and Conv2d for int8).
        exclude: layers to keep in float.

    Embeddings and the LM head (an output layer tied to, or as wide as, an embedding) stay in
    float unless selected by name; the report lists them. A selected ``nn.Embedding`` is
    stored in the scheme's layout, one row per token (int8 per row, or int4 in groups along
    the row; round to nearest, since a lookup has no inputs to calibrate on), and a lookup
    de-quantizes the rows it reads. An embedding tied to an output layer (one weight) is
    quantized with it: selecting either takes both, the head by the method given, and the
    embedding reads the head's codes (one copy, as the float model held one weight).

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = nnslim.Quantize(scheme="int8").apply(model)
        >>> type(model[0]).__name__
        'Int8Linear'
    """

    scheme: Scheme = "int8"
    group_size: int = 128
    method: Method = "rtn"
    smooth: Any = None
    qat: bool = False
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    zero_point: ZeroPoint = "float"
    select: Any = None
    exclude: Any = None

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        check_choice("Quantize", "scheme", self.scheme, SCHEMES)
        check_int("Quantize", "group_size", self.group_size)
        check_choice("Quantize", "group_size", self.group_size, GROUP_SIZES)
        check_choice("Quantize", "method", self.method, METHODS)
        check_type("Quantize", "qat", self.qat, bool)
        check_choice("Quantize", "zero_point", self.zero_point, ZERO_POINTS)
        check_fraction("Quantize", "damp", self.damp, high_inclusive=True)
        check_type("Quantize", "true_sequential", self.true_sequential, bool)
        check_type("Quantize", "act_order", self.act_order, bool)
        if self.smooth is not None:
            if isinstance(self.smooth, str):
                check_choice("Quantize", "smooth", self.smooth, ("auto",))
            else:
                check_fraction("Quantize", "smooth", self.smooth, high_inclusive=True)
        sel = normalize_selector(self.select)
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    check_choice("Quantize", f"select[{key!r}]", v, SCHEMES)
        normalize_selector(self.exclude, "exclude")
        if self.qat and (self.method != "rtn" or self.smooth is not None):
            raise ValueError(
                "Quantize(qat=True) trains the rounding; do not combine it with gptq or smooth."
            )
        if self.qat and self.zero_point != "float":
            raise ValueError(
                "Quantize(qat=True) trains int4 with a float minimum per group; "
                "zero_point='integer' is for post-training quantization (rtn or gptq)."
            )

    # ------------------------------------------------------------------------------------------
    # -- the compress loop ----------------------------------------------------------------------
    def gentler(self) -> Quantize | None:
        """int4 becomes int8 (the same method); int8 has no gentler form."""
        if self.scheme == "int4" and not self.qat:
            return replace(self, scheme="int8", smooth=None)
        return None

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        named = dict(model.named_modules())
        left = unreplaceable(model)
        for p, why in left.items():
            report.skipped(p, why)
        eligible = [
            (p, m)
            for p, m in named.items()
            if p and p not in left and (is_linear(m) or is_conv2d(m))
        ]
        sel = normalize_selector(self.select)
        explicit = (
            {k for k, _ in sel if isinstance(k, str) and not k.startswith("re:")} if sel else set()
        )
        embeddings = {p: m for p, m in named.items() if p and isinstance(m, nn.Embedding)}
        chosen = dict(
            self.resolve(
                model,
                self.select,
                self.exclude,
                eligible=eligible
                + [(p, embeddings[p]) for p in sorted(explicit & set(embeddings))],
            )
        )
        heads = _lm_heads(model, ctx)
        for p in list(chosen):
            if p in heads and p not in explicit:
                del chosen[p]
                report.skipped(p, "LM head stays in float (select it by name to quantize it)")
        emb_plan = self._embedding_plan(model, report, chosen, embeddings)
        eligible = [(p, m) for p, m in eligible if p not in embeddings]
        for p, _ in eligible:
            if p not in chosen and p not in heads:
                report.skipped(p, "not selected" if self.select is not None else "excluded")
        plan: dict[str, str] = {}
        for p, value in chosen.items():
            m = named[p]
            scheme = value or self.scheme
            if not is_linear(m):  # a Conv2d
                if scheme != "int8" or self.qat:
                    if p in explicit or value is not None:
                        raise ValueError(
                            f"Quantize: module {p} ({shape_of(m)}) is a Conv2d; convolutions support "
                            f"only int8 weight storage (scheme='int8', no QAT). Exclude it or use int8."
                        )
                    report.skipped(p, f"Conv2d has no {scheme} kernel (int8 storage only)")
                    continue
            w = linear_weight(m) if is_linear(m) else m.weight
            if not all_finite(w):
                raise ValueError(
                    f"Quantize: module {p} ({shape_of(m)}) has NaN or Inf weights; fix or exclude "
                    f"it (exclude=[{p!r}])."
                )
            plan[p] = scheme
        if not plan and not emb_plan:
            if eligible and self.select is None and self.exclude is None:
                # every candidate is left in float with its reason (convolutions without a
                # kernel for the scheme, LM heads): a no-op the report explains, as for a layer
                # that cannot take the scheme; an explicit request that cannot be met raises
                return
            raise ValueError(_nothing_left(self, eligible, heads))
        if self.qat:
            for p, scheme in plan.items():
                old = named[p]
                gs = int4_group_size(linear_weight(old).shape[1], self.group_size)
                new = FakeQuantLinear.from_float(old, scheme, gs)
                report.changed(
                    p, "fake-quantized (QAT)", shape_of(old), shape_of(new), scheme=scheme
                )
                replace_module(model, p, new)
            return
        lost = [
            p
            for p, scheme in plan.items()
            if scheme == "int4"
            and self.zero_point != "integer"
            and _keep_mask(named[p]) is not None
        ]
        if lost:
            report.note(
                f"{len(lost)} sparse layer(s) ({lost[0]}...) lose their exact zeros: int4 with a "
                f"float minimum per group has no exact 0; quantize with zero_point='integer' "
                f"to keep them"
            )
        needs_data = self.method == "gptq" or self.smooth is not None
        if not needs_data:
            for p, scheme in plan.items():
                self._replace(model, report, p, named[p], scheme, None)
            self._replace_embeddings(model, report, emb_plan)
            return
        batches = ctx.require_calibration(
            f"Quantize(method={self.method!r}, smooth={self.smooth!r})", "to measure activations"
        )
        linears = {p: named[p] for p in plan if is_linear(named[p])}
        for p in plan:
            if p not in linears:
                self._replace(model, report, p, named[p], plan[p], None)

        def process(paths: list[str], stats: dict[str, LayerStats]) -> None:
            for p in paths:  # each layer's statistics are dropped once used
                self._replace(model, report, p, linears[p], plan[p], stats.pop(p))

        run_sequential(
            model,
            batches,
            linears,
            process,
            norms=self.smooth is not None,
            gram=self.method == "gptq",
            rows=256
            if self.smooth == "auto"
            or (self.smooth is not None and any(plan[p] == "int4" for p in linears))
            else 0,
            true_sequential=self.true_sequential and self.method == "gptq",
        )
        self._replace_embeddings(model, report, emb_plan)

    def _embedding_plan(
        self,
        model: nn.Module,
        report: Report,
        chosen: dict[str, Any],
        embeddings: dict[str, nn.Module],
    ) -> dict[str, tuple[str, str | None]]:
        """``{embedding path: (scheme, tied head path or None)}`` for the embeddings to
        quantize (taken out of ``chosen``). An embedding tied to an output layer is one weight
        with it: selecting either quantizes both (the head is added to ``chosen``), with one
        scheme; the other embeddings stay float and are reported."""
        ties = tied_heads(model, embeddings)
        plan: dict[str, tuple[str, str | None]] = {}
        for e, em in embeddings.items():
            h = ties.get(e)
            picked = e in chosen or (h is not None and h in chosen)
            if not picked:
                report.skipped(e, "embeddings stay in float (select it by name to quantize it)")
                continue
            selected = e in chosen
            value = chosen.pop(e, None)
            if h is not None and h in chosen and value is not None and chosen[h] is not None:
                if value != chosen[h]:
                    raise ValueError(
                        f"Quantize: embedding {e} and output layer {h} are tied (one weight) but "
                        f"were given two schemes ({value!r}, {chosen[h]!r}); give them one."
                    )
            scheme = value or (chosen.get(h) if h is not None else None) or self.scheme
            if self.qat:
                raise ValueError(
                    f"Quantize(qat=True): embedding {e} ({shape_of(em)}) has no fake-quantized "
                    f"form; quantize it after training (qat=False) or leave it out of select."
                )
            if not plain_embedding(em):
                raise ValueError(
                    f"Quantize: embedding {e} is a {type(em).__name__} with a forward of its own "
                    f"(a scale, a padding rule...), which a quantized table would drop; leave it "
                    f"(and an output layer tied to it) out of select."
                )
            if getattr(em, "max_norm", None) is not None:
                raise ValueError(
                    f"Quantize: embedding {e} has max_norm={em.max_norm}, which rescales rows "
                    f"in place on lookup; a quantized table cannot. Leave it out of select."
                )
            if not all_finite(em.weight):
                raise ValueError(
                    f"Quantize: embedding {e} ({shape_of(em)}) has NaN or Inf weights; fix or "
                    f"leave it out of select."
                )
            if h is not None:
                if h not in chosen:
                    report.note(f"{h} is tied to embedding {e} (one weight): quantized with it")
                elif not selected:
                    report.note(f"embedding {e} is tied to {h} (one weight): quantized with it")
                chosen[h] = scheme
            plan[e] = (scheme, h)
        return plan

    def _replace_embeddings(
        self, model: nn.Module, report: Report, plan: dict[str, tuple[str, str | None]]
    ) -> None:
        """Replace the planned embeddings (after their tied heads, whose codes they share)."""
        for e, (scheme, h) in plan.items():
            old = model.get_submodule(e)
            details: dict[str, Any] = {"scheme": scheme, "bits": 4 if scheme == "int4" else 8}
            if h is not None:
                head = model.get_submodule(h)
                cls = Int4Embedding if isinstance(head, Int4Linear) else Int8Embedding
                new: nn.Module = cls.sharing(old, head)  # type: ignore[arg-type]
                details.update(method=self.method, tied_to=h)
                if isinstance(head, Int4Linear):
                    details["group_size"] = head.group_size
            elif scheme == "int4":
                gs = int4_group_size(old.embedding_dim, self.group_size)
                new = Int4Embedding.from_float(old, gs, zero_point=self.zero_point)
                details.update(method="rtn", group_size=gs)
            else:  # int8 and int8-dynamic: a lookup has no activations to round
                new = Int8Embedding.from_float(old)
                details["method"] = "rtn"
            report.changed(e, "quantized", shape_of(old), shape_of(new), **details)
            replace_module(model, e, new)

    def _replace(
        self,
        model: nn.Module,
        report: Report,
        path: str,
        old: nn.Module,
        scheme: str,
        st: LayerStats | None,
    ) -> None:
        details: dict[str, Any] = {"scheme": scheme, "method": self.method}
        gs = (
            int4_group_size(linear_weight(old).shape[1], self.group_size) if scheme == "int4" else 0
        )
        if not is_linear(old):  # a Conv2d
            new: nn.Module = Int8Conv2d.from_float(old)
            details["method"] = "rtn"
        else:
            w = linear_weight(old).detach().float()
            keep = _keep_mask(old)
            exact_zero = scheme != "int4" or self.zero_point == "integer"
            if keep is not None:
                details["sparse_zeros_kept"] = exact_zero
            smooth = None
            if st is not None and self.smooth is not None and scheme in ("int8-dynamic", "int4"):
                smooth, alpha = _smoothing(w, st, scheme, self.smooth, gs)
                details["smooth_alpha"] = round(alpha, 3)
                w = w * smooth[None, :]
            if self.method == "gptq" and st is not None and st.gram is not None:
                if smooth is not None:  # inputs are divided by smooth: X' = X / s
                    st.gram = st.gram / smooth[:, None] / smooth[None, :]
                # gptq consumes the statistics' Hessian (st.gram is emptied): one (in, in)
                # matrix fewer held while it runs
                if scheme == "int4":
                    # padded with zero columns: dead inputs of the Hessian
                    gram = _take_gram(st)
                    pad = padded_width(w.shape[1], gs) - w.shape[1]
                    codes, scale, mn = gptq(
                        F.pad(w, (0, pad)),
                        F.pad(gram, (0, pad, 0, pad)) if pad else gram,
                        keep=F.pad(keep, (0, pad), value=True)
                        if keep is not None and exact_zero
                        else None,
                        bits=4,
                        group_size=gs,
                        clip=GPTQ_CLIP,
                        damp=self.damp,
                        act_order=self.act_order,
                        zero_point=self.zero_point,
                        consume=True,
                    )
                    new = Int4Linear.from_codes(
                        old, codes, scale, mn, gs, smooth, zero_point=self.zero_point
                    )
                else:
                    codes, scale, _ = gptq(
                        w,
                        _take_gram(st),
                        keep=keep,
                        bits=8,
                        damp=self.damp,
                        act_order=self.act_order,
                        consume=True,
                    )
                    cls = Int8DynamicLinear if scheme == "int8-dynamic" else Int8Linear
                    new = cls.from_float(old, weight=codes.float() * scale[:, None])
                    if smooth is not None and isinstance(new, Int8DynamicLinear):
                        new = Int8DynamicLinear.from_float(
                            old, weight=codes.float() * scale[:, None], smooth=smooth
                        )
            else:
                if scheme == "int4":
                    new = Int4Linear.from_float(
                        old, gs, weight=w, smooth=smooth, zero_point=self.zero_point
                    )
                elif scheme == "int8-dynamic":
                    new = Int8DynamicLinear.from_float(old, weight=w, smooth=smooth)
                else:
                    new = Int8Linear.from_float(old, weight=w)
            if scheme == "int4":
                details["group_size"] = gs
                if self.zero_point != "float":
                    details["zero_point"] = self.zero_point
                if w.shape[1] % gs:
                    details["padded_to"] = padded_width(w.shape[1], gs)
        details["bits"] = 4 if scheme == "int4" else 8
        report.changed(path, "quantized", shape_of(old), shape_of(new), **details)
        replace_module(model, path, new)


def _keep_mask(m: nn.Module) -> torch.Tensor | None:
    """A sparse layer's keep-mask ``(out, in)`` (its ``weight_mask``), or ``None``."""
    mask = m._buffers.get(MASK_NAME)
    if not isinstance(mask, torch.Tensor):
        return None
    mask = mask.to(torch.bool)
    return mask.t() if is_hf_conv1d(m) else mask.reshape(mask.shape[0], -1)


def _take_gram(st: LayerStats) -> torch.Tensor:
    gram, st.gram = st.gram, None
    if gram is None:
        raise RuntimeError("Quantize: the layer's Hessian was already used")
    return gram


def _smoothing(
    w: torch.Tensor, st: LayerStats, scheme: str, smooth: Any, group_size: int
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales ``s`` (weights times ``s``, inputs divided by ``s``)."""
    eps = 1e-5
    if scheme == "int8-dynamic":
        alpha = 0.5 if smooth == "auto" else float(smooth)
        x_max = st.extra["amax"].clamp_min(eps)
        w_max = w.abs().amax(0).clamp_min(eps)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(eps)
        return s, alpha
    # AWQ: s = mean|x|^alpha, alpha chosen to minimise the output error of the rounded weight
    x_mean = (st.extra["abs_sum"] / max(st.rows, 1)).clamp_min(eps)
    rows = torch.cat(st.extra.get("rows", []), 0) if st.extra.get("rows") else None
    alphas = [float(smooth)] if smooth != "auto" else [i / 10 for i in range(11)]
    best: tuple[float, torch.Tensor, float] | None = None
    for a in alphas:
        s = x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        if rows is None or len(alphas) == 1:
            return s, a
        wq = _fake_int4(w * s[None, :], group_size) / s[None, :]
        err = float(((rows @ wq.t()) - (rows @ w.t())).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, s, a)
    if best is None:  # pragma: no cover - alphas is never empty
        raise RuntimeError("AWQ search evaluated no exponent")
    return best[1], best[2]


def _fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    g = F.pad(w, (0, padded_width(inp, group_size) - inp)).reshape(out, -1, group_size)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((mx - mn) / 15).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 15) * scale + mn).reshape(out, -1)[:, :inp]


def _nothing_left(t: Quantize, eligible: list[tuple[str, nn.Module]], heads: set[str]) -> str:
    """Why Quantize found nothing to quantize, in the words that fit what happened."""
    if not eligible:
        return (
            "Quantize: the model has no nn.Linear, Hugging Face Conv1D or nn.Conv2d layer that "
            "can be quantized (the report lists the layers that were looked at and why each "
            "was left alone)."
        )
    return "Quantize: no layer left to quantize after select/exclude."


def plain_embedding(m: nn.Module) -> bool:
    """An ``nn.Embedding`` whose lookup is the plain one (not a subclass that scales it...)."""
    return isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward


def tied_heads(model: nn.Module, embeddings: dict[str, nn.Module]) -> dict[str, str]:
    """``{embedding path: output layer path}`` for the embeddings a Linear is tied to (the
    same weight parameter): one weight, quantized or searched as one."""
    out = {}
    for h, m in model.named_modules():
        w = m._parameters.get("weight") if is_linear(m) and not is_hf_conv1d(m) else None
        for e, em in embeddings.items():
            if w is not None and w is em.weight:
                out[e] = h
    return out


def _lm_heads(model: nn.Module, ctx: Context) -> set[str]:
    """Output layers that act as LM heads: tied to an embedding, or as wide as one."""
    named = dict(model.named_modules())
    emb_weights = {id(m.weight) for m in named.values() if isinstance(m, nn.Embedding)}
    vocab = {m.num_embeddings for m in named.values() if isinstance(m, nn.Embedding)}
    heads = set()
    for p, m in named.items():
        if not is_linear(m):
            continue
        out = out_width(m)
        tied = id(m.weight) in emb_weights
        if (
            tied
            or p.endswith("lm_head")
            or (out in vocab and out > 1000 and _is_output(model, p, ctx))
        ):
            heads.add(p)
    return heads


def _is_output(model: nn.Module, path: str, ctx: Context) -> bool:
    if ctx.inputs is None:
        return True
    from .prune import output_layers_by_identity

    return path in output_layers_by_identity(model, ctx.inputs)


@final
@dataclass(frozen=True)
class ConvertQAT(Transform):
    """Turn fake-quant (QAT) modules into integer modules (see :func:`convert`)."""

    _copy_on_snapshot = False

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        found = [(p, m) for p, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
        if not found:
            raise ValueError(
                "convert: the model has no fake-quant modules; apply Quantize(qat=True) first."
            )
        for p, m in found:
            w = m.weight.detach().float()
            if m.scheme == "int4":
                new: nn.Module = Int4Linear.from_float(m, m.group_size, weight=w)
            elif m.scheme == "int8-dynamic":
                new = Int8DynamicLinear.from_float(m, weight=w)
            else:
                new = Int8Linear.from_float(m, weight=w)
            report.changed(p, "converted", shape_of(m), shape_of(new), scheme=m.scheme)
            replace_module(model, p, new)


def convert(model: nn.Module, example_inputs: Any = None) -> Report:
    """Replace every fake-quant module left by ``Quantize(qat=True)`` with its integer twin.

    The integer module computes exactly what the fake-quant module computed in its forward
    (same grid), now with packed weights and integer kernels.
    """
    return ConvertQAT().apply(model, example_inputs)
