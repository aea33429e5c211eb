"""The ``nnslim`` command line.

* ``nnslim demo``: the digits demo.
* ``nnslim profile MODULE:FACTORY``: profile a model built by calling ``FACTORY()``.
* ``nnslim compress --recipe recipe.json MODULE:FACTORY``: apply a recipe (the JSON form of a
  Transform or Compose) and print the report; ``--output`` saves the result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["main"]


def _load_factory(spec: str) -> Any:
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise SystemExit(
            f"nnslim: expected MODULE:FACTORY (like torchvision.models:resnet18), got {spec!r}"
        )
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise SystemExit(f"nnslim: cannot import {mod!r}: {e}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"nnslim: {mod!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated shape like 1,3,224,224, got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnslim", description="Make PyTorch models smaller and faster."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train, compress and compare a small CNN on scikit-learn digits")
    p = sub.add_parser("profile", help="profile a model built by MODULE:FACTORY")
    p.add_argument(
        "factory",
        help="MODULE:FACTORY, called with no arguments (e.g. torchvision.models:resnet18)",
    )
    p.add_argument(
        "--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input shape"
    )
    p.add_argument("--depth", type=int, default=1, help="module tree depth in the table")
    p.add_argument("--latency", action="store_true", help="also measure latency")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c = sub.add_parser(
        "compress", help="apply a recipe (JSON transform) to a model built by MODULE:FACTORY"
    )
    c.add_argument("factory", help="MODULE:FACTORY, called with no arguments")
    c.add_argument(
        "--recipe", required=True, help="JSON file: the to_dict() form of a Transform or Compose"
    )
    c.add_argument(
        "--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input shape"
    )
    c.add_argument("--output", help="save the compressed model here (nnslim.save)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import main as demo

        demo()
        return 0
    if args.command == "profile":
        from .profiling import profile

        model = _load_factory(args.factory)()
        prof = profile(model, torch.randn(*args.input_shape), latency=args.latency)
        print(json.dumps(prof.to_dict(), indent=1) if args.json else prof.table(depth=args.depth))
        return 0
    if args.command == "compress":
        from .core.transform import Transform
        from .io.save import save

        try:
            with open(args.recipe) as f:
                recipe = Transform.from_json(f.read())
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"nnslim: cannot read the recipe {args.recipe!r}: {e}") from None
        model = _load_factory(args.factory)()
        model.eval()
        report = recipe.apply(model, torch.randn(*args.input_shape))
        print(report.to_json(indent=1) if args.json else report.table())
        if args.output:
            save(model, args.output)
            print(f"saved to {args.output}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
