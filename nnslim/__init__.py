"""nnslim: make PyTorch models smaller and faster.

Public API (everything else is implementation):

* transforms: :class:`Prune`, :class:`Quantize`, :class:`Factorize`, :class:`ShareWeights`,
  :class:`Compose`, and the base
  :class:`Transform` for your own;
* :func:`profile` and :class:`Profile`;
* :func:`save` and :func:`load`;
* :class:`Report`.
"""

from . import evaluate
from ._version import __version__
from .base.serialize import register_class
from .core.report import Report
from .core.target import Target
from .core.transform import Compose, Context, Transform
from .graph.trace import Graph, trace
from .io import hf
from .io.export import export
from .io.save import load, save
from .large import checkpoint_table, compress_checkpoint
from .modules.masks import apply_masks
from .profiling import Profile, profile, register_formula
from .train import (
    CompressionResult,
    Distillation,
    Regularization,
    Trainer,
    TrainOptions,
    TrainResult,
    TrainState,
    compress,
)
from .transforms.allocation import OWL
from .transforms.auto import Auto, AutoTable
from .transforms.factorize import Factorize
from .transforms.importance import Importance
from .transforms.prune import Prune
from .transforms.quantize import Quantize, convert
from .transforms.share import ShareWeights

__all__ = [
    "OWL",
    "Auto",
    "AutoTable",
    "Compose",
    "CompressionResult",
    "Context",
    "Distillation",
    "Factorize",
    "Graph",
    "Importance",
    "Profile",
    "Prune",
    "Quantize",
    "Regularization",
    "Report",
    "ShareWeights",
    "Target",
    "TrainOptions",
    "TrainResult",
    "TrainState",
    "Trainer",
    "Transform",
    "__version__",
    "apply_masks",
    "checkpoint_table",
    "compress",
    "compress_checkpoint",
    "convert",
    "evaluate",
    "export",
    "hf",
    "load",
    "profile",
    "register_class",
    "register_formula",
    "save",
    "trace",
]
