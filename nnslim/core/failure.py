"""Where a forward fails: the innermost module running when it raised."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base.inputs import Inputs
from ..base.snapshot import preserved_state


def first_line(e: BaseException, n: int = 160) -> str:
    """``"Type: first line of the message"`` (an error may have an empty message)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:n] if lines else ''}"


def failing_module(model: nn.Module, inputs: Inputs) -> tuple[str, str] | None:
    """``None`` when ``model`` runs on ``inputs``; else ``(path of the innermost module whose
    forward was running when it raised, the error in one line)``. The model's state (train
    mode, buffers a forward writes) is left as it was."""
    stack: list[str] = []
    names = {id(m): p for p, m in model.named_modules()}

    def pre(m: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(m), ""))

    def post(_m: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with preserved_state(model), torch.no_grad():
            inputs.call_stateless(model)
        return None
    except Exception as e:
        return (stack[-1] if stack else ""), first_line(e)
    finally:
        for h in handles:
            h.remove()


def culprits(where: str, changed: list[str]) -> list[str]:
    """The changed modules most likely to have broken a forward that failed in ``where``: the
    module itself, else those inside it (a parent reading its replaced child: T5's
    ``wo.weight.dtype``), else its nearest changed ancestor."""
    if where in changed:
        return [where]
    inside = [p for p in changed if not where or p.startswith(where + ".")]
    if inside:
        return inside
    up = [p for p in changed if where.startswith(p + ".")]
    return [max(up, key=len)] if up else []
