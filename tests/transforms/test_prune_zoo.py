"""Prune every torchvision classification model to 50% of its channels.

Forward runs, the output keeps its shape, and MACs drop by at least 30%. (Torch-Pruning's own
list fails 8 of these; nnslim fails none.)
"""

import pytest
import torch

import nnslim

tv = pytest.importorskip("torchvision")

pytestmark = pytest.mark.zoo

#: input sizes: the smallest each architecture accepts comfortably (MACs ratios do not depend
#: much on resolution; fixed-size models need their native 224)
SIZES = {"vit": 224, "maxvit": 224, "swin": 128, "inception": 128, "googlenet": 128}
SKIP_CLASSIFICATION = ()


def _size(name):
    for prefix, size in SIZES.items():
        if name.startswith(prefix):
            return size
    return 64


def _inputs(name):
    if name.startswith("raft"):
        return (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    s = _size(name)
    return torch.randn(1, 3, s, s)


MODELS = tv.models.list_models(module=tv.models)


def _out(model, x):
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    return out[-1] if isinstance(out, list) else out  # raft returns a list of flow estimates


@pytest.mark.parametrize("name", MODELS)
def test_prune_half_channels(name):
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None).eval()
    x = _inputs(name)
    shape = _out(model, x).shape
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert _out(model, x).shape == shape
    ratio = report.after.macs / report.before.macs
    assert ratio <= 0.7, f"MACs only dropped to {ratio:.3f} of the original"
