"""nnslim's patches of torch-pruning: the same groups as upstream, faster, and a tripwire for
when upstream changes the code they replace."""

import inspect

import torch
import torch_pruning as tp
import torchvision

from nnslim.graph.tp_compat import torch_pruning_fixes


def _groups(model, x):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    out = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            n = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            g = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0, n - 1])
            out.append([(dep.target.name, dep.handler.__name__, list(idxs)) for dep, idxs in g])
    return out


def test_indexed_group_lookup_builds_the_same_groups_as_upstream():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    upstream = _groups(model, x)
    with torch_pruning_fixes():
        assert tp.dependency.Group.has_pruning_op is not _upstream_has_pruning_op
        patched = _groups(model, x)
    assert patched == upstream
    assert tp.dependency.Group.has_pruning_op is _upstream_has_pruning_op  # restored


_upstream_has_pruning_op = tp.dependency.Group.has_pruning_op


def test_upstream_has_pruning_op_still_scans_the_group():
    # when this fails, torch-pruning changed Group.has_pruning_op: check whether it is fast now
    # and drop nnslim.graph.tp_compat._indexed_has_pruning_op
    src = inspect.getsource(tp.dependency.Group.has_pruning_op)
    assert "for _dep, _idxs in self._group" in src
