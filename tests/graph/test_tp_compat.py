"""nnslim's torch-pruning subclasses: the same groups and pruning as upstream where upstream is
right, a test per fix that fails with upstream's function in its place, and tripwires for when
upstream changes the code the subclasses copy."""

import hashlib
import inspect

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torch_pruning.dependency import index_mapping as _im
from torch_pruning.dependency import shape_infer as _si

from nnslim.graph import tp_compat as tc
from tests.zoo import llama_config


def _build(dg, model, x, **kw):
    with torch.enable_grad():
        return dg.build_dependency(model, example_inputs=x, **kw)


def _groups(dg, model):
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            g = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0, n - 1])
            out.append([(dep.target.name, dep.handler.__name__, list(idxs)) for dep, idxs in g])
    return out


def test_the_graph_builds_the_same_groups_as_upstream_where_upstream_is_right():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    upstream = _groups(_build(tp.DependencyGraph(), model, x), model)
    ours = _groups(_build(tc.DependencyGraph(), model, x), model)
    assert ours == upstream


def test_the_pruner_on_a_prebuilt_graph_prunes_as_upstreams_pruner():
    x = torch.randn(1, 3, 32, 32)
    models = []
    for build in ("upstream", "ours"):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        kw = dict(
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.3,
            ignored_layers=[model.fc],
            round_to=4,
        )
        if build == "upstream":
            pruner = tp.pruner.BasePruner(model, x, **kw)
        else:
            pruner = tc.Pruner(_build(tc.DependencyGraph(), model, x), **kw)
        pruner.step()
        models.append(model)
    a, b = (dict(m.state_dict()) for m in models)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert models[1].conv1.out_channels == 44  # pruned: 64 -> 44


def _upstream_functions():
    return (
        tp.DependencyGraph.get_pruning_group,
        tp.dependency.Group.add_dep,
        tp.dependency.Group.has_pruning_op,
        _im.update_concat_index_mapping,
        _im.update_reshape_index_mapping,
        _si.init_shape_information,
    )


def test_nothing_of_torch_pruning_is_patched():
    before = _upstream_functions()
    import nnslim

    model = torchvision.models.resnet18(weights=None).eval()
    nnslim.Prune(ratio=0.3).apply(model, torch.randn(1, 3, 32, 32))
    assert _upstream_functions() == before


def test_torch_still_returns_a_view_whose_in_place_change_replaces_its_node():
    # what watch_in_place relies on (private Tensor._is_view and Tensor._version): when this
    # fails, torch changed how a Linear on 3-D input returns its result; check whether
    # torch-pruning still loses such a layer from its graph
    layer = nn.Linear(4, 4)
    with torch.enable_grad():
        out = layer(torch.randn(2, 3, 4))
        node, version = out.grad_fn, out._version
        assert out._is_view()
        out += 1
    assert out._version == version + 1
    assert out.grad_fn is not node


def _llama():
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 300, (1, 6))
    return model, ids


def _llama_graph(max_group):
    model, ids = _llama()
    dg = _build(
        tc.DependencyGraph(max_group),
        model,
        (ids,),
        forward_fn=lambda m, i: m(i[0], use_cache=True).logits,
    )
    return model, dg


def test_fix_a_concat_on_the_last_dim_is_not_taken_for_a_channel_concat(monkeypatch):
    # upstream reads CatBackward0._saved_dim = 2**64 - k as a channel concat: in Llama (GQA,
    # rotate_half, the KV cache traced as an output) a group grows around the attention cycle
    import nnslim

    model, ids = _llama()
    x = {"input_ids": ids, "use_cache": True}
    assert max(len(g.members) for g in nnslim.trace(model, x).groups()) < 50
    monkeypatch.setattr(tc, "update_concat_index_mapping", _im.update_concat_index_mapping)
    with pytest.raises(tc.GroupTooLarge, match="grew past 20000 coupled layers"):
        nnslim.trace(model, x).groups()


def test_fix_reshapes_read_the_current_size_field(monkeypatch):
    # upstream reads ViewBackward0._saved_self_sizes, gone in torch 2: every reshape gets a
    # flatten mapping (ShuffleNet v2: a division by zero while the graph is built)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    _build(tc.DependencyGraph(), model, x)
    monkeypatch.setattr(tc, "update_reshape_index_mapping", _im.update_reshape_index_mapping)
    with pytest.raises(ZeroDivisionError):
        _build(tc.DependencyGraph(), model, x)


class _Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 10, 1)
        self.a, self.b, self.d = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.c(x).chunk(3, 1)
        return self.a(a) + self.b(b) + self.d(c)


def test_fix_chunk_sizes_are_read_from_the_current_field():
    # upstream reads SplitBackward0._saved_self_sizes, gone in torch 2: uneven chunks of 10
    # channels in 3 came out as [2, 4, 4] instead of [4, 4, 2]
    dg = _build(tc.DependencyGraph(), _Chunk(), torch.randn(1, 3, 4, 4))
    (split,) = [n for n in dg.module2node.values() if n.type == tp.ops.OPTYPE.SPLIT]
    assert split.module.split_sizes == [4, 4, 2]
    split.module.split_sizes = split.module.offsets = None
    _si.init_shape_information(dg)
    assert split.module.split_sizes == [2, 4, 4]  # upstream's


def test_fix_a_concat_torch_pruning_cannot_size_gets_no_mapping(monkeypatch):
    # CvT's class token: a split on the token dim, then a concat; upstream sums channels it
    # could not infer and raises from inside while the graph is built
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], num_labels=3)
    model = transformers.CvtForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    _build(tc.DependencyGraph(), model, x, forward_fn=lambda m, i: m(i).logits)
    monkeypatch.setattr(tc, "update_concat_index_mapping", _im.update_concat_index_mapping)
    with pytest.raises(IndexError):
        _build(tc.DependencyGraph(), model, x, forward_fn=lambda m, i: m(i).logits)


class _FeatureConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.map = nn.Linear(8, 16), nn.Linear(8, 4), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(torch.cat((self.a(x), self.b(x)), -1))


def test_fix_a_concat_of_features_on_the_last_dim_keeps_its_offsets():
    # the first fix alone left RoCBert's feature concat unmapped: b's channels were matched to
    # the Linear's first columns instead of columns 16..19
    model = _FeatureConcat()
    dg = _build(tc.DependencyGraph(), model, torch.randn(2, 3, 8))
    group = dg.get_pruning_group(model.b, tp.prune_linear_out_channels, [0, 3])
    cols = [list(i) for d, i in group if d.target.module is model.map]
    assert cols == [[16, 19]]


def test_fix_group_membership_is_looked_up_through_an_index():
    # upstream's Group.has_pruning_op scans the group for every dependency it adds (n^2);
    # when this fails, check whether upstream is fast now and drop _Group.has_pruning_op
    src = inspect.getsource(tp.dependency.Group.has_pruning_op)
    assert "for _dep, _idxs in self._group" in src


#: sha256 of the upstream methods the subclasses copy (torch-pruning 1.6.0)
COPIED = {
    "DependencyGraph.build_dependency": (tp.DependencyGraph.build_dependency, "884b30d48392c771"),
    "DependencyGraph.get_pruning_group": (tp.DependencyGraph.get_pruning_group, "706814b0c1b9f064"),
    "BasePruner.__init__": (tp.pruner.BasePruner.__init__, "d555e7346b292c55"),
}


@pytest.mark.parametrize("name", sorted(COPIED))
def test_the_copied_upstream_methods_are_unchanged(name):
    # when this fails, torch-pruning changed a method nnslim.graph.tp_compat copies: compare
    # the new source with the copy, carry the change over (or drop the copy if the fixes are
    # upstream now), then update the hash here and tp_compat.UPSTREAM
    fn, want = COPIED[name]
    got = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    assert got == want, f"{name} changed upstream (torch-pruning {tp.__version__})"
    assert tc.UPSTREAM == tp.__version__


def test_group_building_stops_at_the_time_limit_naming_the_root(monkeypatch):
    model, dg = _llama_graph(None)
    slow = tp.dependency.Group.add_dep

    def add_dep(self, dep, idxs):
        import time

        time.sleep(0.01)
        slow(self, dep, idxs)

    monkeypatch.setattr(tp.dependency.Group, "add_dep", add_dep)
    emb = model.model.embed_tokens
    with (
        dg.limit(0.05, "checking groups"),
        pytest.raises(
            tc.TraceError,
            match=r"checking groups did not finish within 0 s \(at model\.embed_tokens\)",
        ),
    ):
        dg.get_pruning_group(emb, tp.prune_embedding_out_channels, list(range(64)))
    # outside the block: no limit
    assert len(dg.get_pruning_group(emb, tp.prune_embedding_out_channels, [0])) > 1
