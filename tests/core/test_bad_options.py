"""Bad options are refused where they are written (each config's ``__post_init__``, each entry
point's first lines), with the owner, the field and the range in the message, never accepted
or failing later from inside."""

import pytest
import torch
from torch import nn

import nnslim
from nnslim import Distillation, Regularization, Trainer, TrainOptions


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


X = torch.randn(3, 4)
_COMPRESS = dict(evaluate=lambda m: 1.0, target={"macs": 0.5}, tolerance=0.1, example_inputs=X)

CASES = {
    # reversed gradients before: loss 1.40 -> 11.5
    "clip_grad_norm<0": (
        lambda: TrainOptions(clip_grad_norm=-1),
        ValueError,
        r"TrainOptions\(clip_grad_norm=...\).*\(0.0, inf\)",
    ),
    "clip_grad_norm=0": (lambda: TrainOptions(clip_grad_norm=0), ValueError, "clip_grad_norm"),
    "eval_every=0": (lambda: TrainOptions(eval_every=0), ValueError, r"eval_every=.*\[1, inf\]"),
    "patience<0": (lambda: TrainOptions(patience=-1), ValueError, r"patience=.*\[0, inf\]"),
    "accumulate=0": (lambda: TrainOptions(accumulate=0), ValueError, "accumulate"),
    "checkpoint_every=1.5": (lambda: TrainOptions(checkpoint_every=1.5), TypeError, "integer|int"),
    "precision": (lambda: TrainOptions(precision="fp16"), ValueError, "unknown value 'fp16'"),
    "strategy": (lambda: TrainOptions(strategy="deepspeed"), ValueError, "strategy"),
    "verbose": (lambda: TrainOptions(verbose="yes"), TypeError, r"verbose=.*expected bool"),
    "l1<0": (lambda: Regularization(l1=-1), ValueError, r"Regularization\(l1=...\)"),
    "group_lasso nan": (
        lambda: Regularization(group_lasso=float("nan")),
        ValueError,
        "group_lasso",
    ),
    "temperature=0": (
        lambda: Distillation(temperature=0),
        ValueError,
        r"Distillation\(temperature=...\)",
    ),
    "alpha>1": (lambda: Distillation(alpha=1.5), ValueError, "alpha"),
    "features": (lambda: Distillation(features=["a"]), TypeError, "features"),
    "feature_loss": (lambda: Distillation(feature_loss="l1"), ValueError, "feature_loss"),
    "output_loss": (lambda: Distillation(output_loss="l1"), ValueError, "output_loss"),
    "optimizer=123": (lambda: Trainer(optimizer=123), TypeError, r"Trainer\(optimizer=...\)"),
    "options='x'": (lambda: Trainer(options="x"), TypeError, "expected TrainOptions"),
    "distillation='x'": (lambda: Trainer(distillation="x"), TypeError, "expected Distillation"),
    "regularization=0.1": (
        lambda: Trainer(regularization=0.1),
        TypeError,
        "expected Regularization",
    ),
    "teacher": (lambda: Trainer(teacher="gpt2"), TypeError, "teacher"),
    "scheduler": (lambda: Trainer(scheduler=3), TypeError, "scheduler"),
    "select={}": (lambda: nnslim.Prune(ratio=0.3, select={}), ValueError, "select is empty"),
    "select=[]": (lambda: nnslim.Quantize(select=[]), ValueError, "select is empty"),
    "repeat=0": (lambda: nnslim.profile(_model(), X, repeat=0), ValueError, r"repeat=.*\[1"),
    "warmup<0": (lambda: nnslim.profile(_model(), X, warmup=-1), ValueError, "warmup"),
    "threads=0": (lambda: nnslim.profile(_model(), X, threads=0), ValueError, "threads"),
    "transforms=123": (
        lambda: nnslim.compress(_model(), 123, **_COMPRESS),
        TypeError,
        r"compress\(transforms=...\)",
    ),
    "transforms=[]": (lambda: nnslim.compress(_model(), [], **_COMPRESS), TypeError, "non-empty"),
    "transforms=[1]": (
        lambda: nnslim.compress(_model(), [nnslim.Prune(ratio=0.3), 1], **_COMPRESS),
        TypeError,
        "item 1 is a int",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_is_refused_with_its_name(case):
    make, error, message = CASES[case]
    with pytest.raises(error, match=message):
        make()


def test_an_empty_exclude_excludes_nothing():
    m = _model()
    rep = nnslim.Quantize(scheme="int8", exclude=[]).apply(m, X)
    assert len(rep.changes) == 2


def test_good_options_still_construct():
    TrainOptions(clip_grad_norm=1.0, eval_every=1, patience=0, verbose=False)
    Regularization(l1=1e-4, group_lasso=0.0)
    Distillation(temperature=2.0, alpha=1.0, features={"a": "b"}, feature_weight=0.0)
    Trainer(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), options=TrainOptions())
