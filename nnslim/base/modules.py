"""Small helpers about modules that every transform needs."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from .snapshot import rollback_enabled

__all__ = [
    "copy_model",
    "is_conv2d",
    "is_hf_conv1d",
    "is_linear",
    "layer_skip_reason",
    "linear_weight",
    "out_width",
    "replace_module",
    "set_module",
    "share_hooks",
    "shared_parameters",
    "unreplaceable",
    "weight_rows",
]


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _keeps(m: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    """An instance of ``base`` whose class computes what ``base`` computes (a subclass that
    overrides none of ``methods``: timm's ``Linear``, torch's ``NonDynamicallyQuantizableLinear``)."""
    cls = type(m)
    return isinstance(m, base) and all(
        getattr(cls, name) is getattr(base, name) for name in methods
    )


_COMPUTES_LIKE: dict[type, bool] = {}


def _computes_like_base(m: nn.Module, base: type[nn.Module]) -> bool:
    """Whether a subclass that overrides ``forward`` still computes its base's function
    (timm's ``Linear``, Falcon's ``FalconLinear``: ``x @ w.T + b``), checked once per class on
    random inputs within float rounding. Its own forward runs, without hooks."""
    cls = type(m)
    if cls in _COMPUTES_LIKE:
        return _COMPUTES_LIKE[cls]
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type == "meta" or not w.is_floating_point():
        return False
    if set(m._parameters) - {"weight", "bias"} or m._buffers or m._modules:
        return False  # state of its own (a scale, an adapter) may change what it computes later
    g = torch.Generator().manual_seed(0)
    ok = False
    try:
        with torch.no_grad():
            if base is nn.Linear:
                x = torch.randn(2, 3, m.in_features, generator=g).to(w)
                ref = torch.nn.functional.linear(x, w, m.bias)
            else:
                side = 2 * max(m.kernel_size) * max(m.dilation) + 3
                x = torch.randn(1, m.in_channels, side, side, generator=g).to(w)
                ref = nn.Conv2d._conv_forward(m, x, w, m.bias)
            out = cls.forward(m, x)
            ok = (
                isinstance(out, torch.Tensor)
                and out.shape == ref.shape
                and bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))
            )
    except Exception:
        ok = False
    _COMPUTES_LIKE[cls] = ok
    return ok


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass that keeps its forward, or overrides it with the same
    function) or a Hugging Face ``Conv1D``."""
    if _keeps(m, nn.Linear, "forward") or is_hf_conv1d(m):
        return True
    return isinstance(m, nn.Linear) and _computes_like_base(m, nn.Linear)


def is_conv2d(m: nn.Module) -> bool:
    """An ``nn.Conv2d`` (or a subclass that keeps its forward, or overrides it with the same
    function)."""
    if _keeps(m, nn.Conv2d, "forward", "_conv_forward"):
        return True
    return isinstance(m, nn.Conv2d) and _computes_like_base(m, nn.Conv2d)


def maps_each_channel(m: nn.Module) -> bool:
    """A layer that maps each channel to itself (a BatchNorm, a depthwise convolution): in a
    channel group it follows the channels it reads; it does not write them as a producer
    does."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return is_conv2d(m) and m.groups == m.in_channels == m.out_channels


def layer_skip_reason(m: nn.Module, parent: nn.Module | None = None) -> str | None:
    """Why a Linear/Conv2d-like module cannot be replaced by a transform's own layer, or
    ``None`` (also for modules that are not Linear/Conv2d at all)."""
    if getattr(type(m), "nnslim_packed_sparse", False):
        return (
            "a packed sparse layer (Prune(pack=True)) is left as it is: sparsify without "
            "pack=True to combine the sparsity with quantization, factorization or palettes"
        )
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return None
    base = "nn.Linear" if isinstance(m, nn.Linear) else "nn.Conv2d"
    if not (is_linear(m) or is_conv2d(m)):
        return (
            f"{type(m).__name__} subclasses {base} but overrides its forward with another "
            f"function: a replacement would not compute what it computes"
        )
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention reads this projection's weight directly instead of calling "
            "it (Prune converts self-attention to a head-prunable twin with plain projections)"
        )
    return None


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or Hugging Face ``Conv1D``."""
    return m.weight.t() if is_hf_conv1d(m) else m.weight


def out_width(m: nn.Module) -> int | None:
    """Output channels of an ``nn.Linear``, a Hugging Face ``Conv1D`` (``nf``) or a layer with
    an ``(out, ...)`` weight (convolutions); ``None`` for anything else."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if is_hf_conv1d(m):
        return int(m.nf)
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


def weight_rows(t: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """A weight-shaped tensor of ``m`` as ``(out, rest)`` rows (a Hugging Face ``Conv1D``
    stores ``(in, out)``: transposed)."""
    return t.t() if is_hf_conv1d(m) else t.reshape(t.shape[0], -1)


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Parameters held under more than one ``(module, name)``: one list per shared parameter of
    ``(module, name, full path)``, one entry per path it is reached at (a module registered
    twice appears once per path)."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, name, f"{path}.{name}" if path else name))
    return [o for o in owners.values() if len({(id(m), n) for m, n, _ in o}) > 1]


def unreplaceable(model: nn.Module) -> dict[str, str]:
    """``{path: reason}`` for every Linear/Conv2d-like module of ``model`` that a transform
    cannot replace (see :func:`layer_skip_reason`)."""
    out = {}
    for parent_path, parent in model.named_modules():
        for name, m in parent._modules.items():
            why = None if m is None else layer_skip_reason(m, parent)
            if why is not None:
                out[f"{parent_path}.{name}" if parent_path else name] = why
    return out


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models that cache tensors computed in a forward.

    ``copy.deepcopy`` refuses tensors that are not graph leaves ("Only Tensors created
    explicitly by the user support the deepcopy protocol"), such as the attention-bias caches
    timm's LeViT and EfficientFormer fill in eval mode; the copy holds detached copies of them.
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in m.__dict__.values():
            _copy_non_leaves(v, memo, 0)
    return copy.deepcopy(model, memo)


def _copy_non_leaves(v: Any, memo: dict[int, Any], depth: int) -> None:
    if isinstance(v, torch.Tensor):
        if not v.is_leaf and id(v) not in memo:
            memo[id(v)] = v.detach().clone()
    elif depth < 4 and isinstance(v, dict):
        for x in v.values():
            _copy_non_leaves(x, memo, depth + 1)
    elif depth < 4 and isinstance(v, (list, tuple)):
        for x in v:
            _copy_non_leaves(x, memo, depth + 1)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


#: the hook tables of ``nn.Module`` a replacement takes over (torch has no public API to list a
#: module's hooks; tests/core/test_modules.py fails when these names change upstream)
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def share_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward/backward hooks registered on ``old`` (a user's hook on a layer
    keeps firing on its quantized or factorized replacement, and its handle still removes it:
    both modules hold the same tables)."""
    if not any(getattr(old, t, None) for t in _HOOK_TABLES):
        return
    if any(getattr(new, t, None) for t in _HOOK_TABLES):
        raise ValueError(
            f"cannot move the hooks of {type(old).__name__} onto a {type(new).__name__} that "
            f"has hooks of its own"
        )
    for t in _HOOK_TABLES:
        if hasattr(old, t):
            new.__dict__[t] = old.__dict__[t]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (and every other path the same module is used at) for good (not a
    trial that may be undone), with the old module's hooks and train/eval mode.

    Inside :func:`~nnslim.base.snapshot.no_rollback` the old module's weights that the model
    no longer uses are released at once (each such tensor is emptied), so that a
    transform never holds a layer's old and new weights for longer than the replacement itself.
    """
    old = model.get_submodule(path)
    if old is new:
        return
    # a module used at several paths is one layer: every use gets the replacement
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is old and p] or [path]
    new.train(old.training)
    for p in paths:
        set_module(model, p, new)
    share_hooks(old, new)
    if rollback_enabled():
        return
    live = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers())
        if t.device.type != "meta" and t.numel()
    }
    for m in old.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is None or t.device.type == "meta" or not t.numel():
                continue
            if t.untyped_storage().data_ptr() not in live:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
