import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.quantized import Int8Linear
from nnslim.profiling.counter import OpCounter
from tests.zoo import TinyCNN


def macs_of(module, *inputs, grad=False):
    module.eval()
    counter = OpCounter(module)
    with torch.set_grad_enabled(grad), counter:
        module(*inputs)
    return sum(t.macs for t in counter.tallies.values())


def test_linear_exact():
    p = nnslim.profile(nn.Linear(64, 32), torch.randn(8, 64))
    assert p.macs == 8 * 64 * 32
    assert p.flops == 2 * 8 * 64 * 32 + 8 * 32  # bias adds are "other" FLOPs
    assert p.other_flops == 8 * 32
    assert p.params == 64 * 32 + 32
    assert p.param_bytes == 4 * (64 * 32 + 32)


@given(
    groups=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 3),
    hw=st.integers(3, 9),
    stride=st.integers(1, 2),
    batch=st.integers(1, 3),
)
def test_conv2d_exact_grouped(groups, k, hw, stride, batch):
    conv = nn.Conv2d(8, 16, k, stride=stride, padding=1, groups=groups)
    x = torch.randn(batch, 8, hw, hw)
    out = conv(x)
    expected = out.numel() * (8 // groups) * k * k
    p = nnslim.profile(conv, x)
    assert p.macs == expected
    assert p.other_flops == out.numel()  # bias


def test_depthwise_conv_exact():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert nnslim.profile(conv, torch.randn(1, 8, 6, 6)).macs == 8 * 36 * 9


def test_transposed_conv_exact():
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2)
    assert nnslim.profile(conv, torch.randn(1, 4, 5, 5)).macs == 4 * 25 * 6 * 9


class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_counted_with_and_without_grad(grad):
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    assert macs_of(SDPA(), q, k, v, grad=grad) == 2 * 4 * 16 * 12 * (8 + 8)


def test_sdpa_matches_torch_flop_counter_where_it_counts():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        # the math path (explicit matmuls) is what FlopCounterMode can count
        s = (q @ k.transpose(-1, -2)) * 8**-0.5
        _ = s.softmax(-1) @ v
    assert nnslim.profile(SDPA(), (q, k, v)).macs == fc.get_total_flops() // 2


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_fused_and_unfused_agree():
    x = torch.randn(2, 5, 16)
    expected = 3 * 2 * 5 * 16 * 16 + 2 * 4 * 5 * 5 * (4 + 4) + 2 * 5 * 16 * 16
    assert macs_of(MHA(), x, grad=False) == expected  # fused _native_multi_head_attention
    assert macs_of(MHA(), x, grad=True) == expected  # unfused path
    assert nnslim.profile(MHA(), x).macs == expected


def test_transformer_encoder_layer_fast_path_agrees():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    x = torch.randn(2, 5, 16)
    mha = 3 * 2 * 5 * 16 * 16 + 2 * 4 * 5 * 5 * 8 + 2 * 5 * 16 * 16
    ffn = 2 * 5 * (16 * 32 + 32 * 16)
    assert macs_of(layer, x, grad=False) == mha + ffn
    assert macs_of(layer, x, grad=True) == mha + ffn


class Functional(nn.Module):
    """@, einsum, F.linear, addmm (GPT-2 Conv1D style) and bmm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 12))
        self.b = nn.Parameter(torch.randn(12))

    def forward(self, x):  # x: (3, 4, 8)
        a = x @ self.w  # 3*4*8*12
        b = torch.einsum("bik,kj->bij", x, self.w)  # same
        c = F.linear(x, self.w.t())  # same
        d = torch.addmm(self.b, x.reshape(-1, 8), self.w)  # same, + bias
        e = torch.bmm(a, a.transpose(1, 2))  # 3*4*12*4
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()


def test_functional_matmuls_all_counted():
    p = nnslim.profile(Functional(), torch.randn(3, 4, 8))
    assert p.macs == 4 * (3 * 4 * 8 * 12) + 3 * 4 * 12 * 4
    assert p.unsupported == {}


class MaxMin(nn.Module):
    def forward(self, x, y):
        return torch.max(x) + x.min(dim=1).values.sum() + torch.maximum(x, y).sum()


def test_max_and_min_reductions_cost_their_input():
    # max / min have elementwise overloads (max.other) and reducing ones (max.default, max.dim)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    p = nnslim.profile(MaxMin(), (x, y))
    # max over 30, min over rows (30), maximum (30) then its sum (30), sum of 6, two adds
    assert p.other_flops == 30 + 30 + 30 + 30 + 6 + 2
    assert p.unsupported == {}


def test_tiny_transformer_total_and_tree():
    torch.manual_seed(0)
    d, ff, n_tok, vocab = 16, 32, 6, 50

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.block = nn.TransformerEncoderLayer(d, 2, ff, batch_first=True)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.emb.weight  # tied

        def forward(self, ids):
            return self.lm_head(self.block(self.emb(ids)))

    model = Tiny()
    p = nnslim.profile(model, torch.randint(0, vocab, (1, n_tok)))
    block = (
        3 * n_tok * d * d + 2 * n_tok * n_tok * (d // 2) * 2 + n_tok * d * d + n_tok * 2 * d * ff
    )
    assert p.modules["block"].macs == block
    assert p.modules["lm_head"].macs == n_tok * d * vocab
    assert p.macs == block + n_tok * d * vocab
    unique = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    assert p.params == unique  # tied embedding counted once
    assert p.modules[""].params == unique


def test_int8_storage_bytes_are_real():
    q = Int8Linear.from_float(nn.Linear(64, 32))
    p = nnslim.profile(q, torch.randn(2, 64))
    assert p.params == 64 * 32 + 32
    assert p.param_bytes == 64 * 32 * 1 + 32 * 4 + 32 * 4  # int8 weight, fp32 scale, fp32 bias
    assert p.macs == 2 * 64 * 32


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4"])
def test_quantized_kernels_count_the_same_macs(scheme):
    """Every integer kernel path (oneDNN u8s8, _int_mm, int8/int4 packed) has a formula."""
    m = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(3, 5, 64)
    before = nnslim.profile(m, x, memory=False)
    nnslim.Quantize(scheme=scheme, group_size=32).apply(m, x)
    after = nnslim.profile(m, x, memory=False)
    assert after.macs == before.macs == 15 * 64 * 32
    assert not after.unsupported


def test_memory_peak_of_a_linear_is_its_output():
    lin = nn.Linear(1000, 1000, bias=False)
    p = nnslim.profile(lin, torch.randn(10, 1000))
    assert p.static_bytes == 1000 * 1000 * 4 + 10 * 1000 * 4
    assert p.activation_peak_bytes == 10 * 1000 * 4


def test_memory_frees_dead_activations():
    seq = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])
    p = nnslim.profile(seq, torch.randn(64, 256))
    one = 64 * 256 * 4
    # never more than two activations alive at once in a chain
    assert one <= p.activation_peak_bytes <= 2 * one


def test_backward_profile():
    p = nnslim.profile(nn.Linear(32, 16), torch.randn(4, 32), backward=True)
    assert p.backward_macs == 4 * 32 * 16  # weight gradient only (input needs no grad)
    assert p.backward_peak_bytes >= p.peak_bytes


def test_unsupported_ops_are_listed_by_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cdist(self.lin(x), x)

    p = nnslim.profile(Odd(), torch.randn(4, 3))
    assert p.unsupported == {"aten._cdist_forward": [""]}
    assert "aten._cdist_forward" in p.table()
    assert p.macs == 4 * 3 * 3


def test_forward_failure_and_device_mismatch_are_clear():
    with pytest.raises(ValueError, match=r"Linear.forward failed on example_inputs.*\(2, 5\)"):
        nnslim.profile(nn.Linear(4, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="are on meta but Linear is on cpu"):
        nnslim.profile(nn.Linear(4, 4), torch.randn(2, 4, device="meta"))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        nnslim.profile("model", torch.randn(1))


def test_modes_are_restored_and_batchnorm_stats_untouched():
    m = TinyCNN().train()
    stats = m.bn1.running_mean.clone()
    nnslim.profile(m, torch.randn(2, 3, 8, 8))
    assert m.training and m.bn1.training
    assert torch.equal(m.bn1.running_mean, stats)


def test_tree_table_dict_and_compare():
    m = TinyCNN()
    x = torch.randn(1, 3, 8, 8)
    a = nnslim.profile(m, x, latency=True, repeat=3)
    assert a.modules["conv1"].macs == 8 * 64 * 3 * 9
    assert a.modules[""].macs == sum(a.modules[n].macs for n in ("conv1", "conv2", "fc"))
    d = json.loads(a.to_json())
    assert d["modules"]["conv2"]["macs"] == 16 * 64 * 8 * 9
    assert d["latency"]["threads"] == torch.get_num_threads()
    table = a.table(depth=1)
    assert "conv1" in table and "MACs" in table
    nnslim.Prune(ratio=0.5).apply(m, x)
    b = nnslim.profile(m, x)
    cmp = a - b
    assert cmp.ratio("macs") == pytest.approx(b.macs / a.macs)
    assert "ratio" in str(cmp) and "MACs" in str(cmp)
    assert cmp.to_dict()["params"]["after"] == b.params


def test_sparsity_reported():
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:5] = 0
    p = nnslim.profile(lin, torch.randn(1, 10))
    assert p.zero_params == 50
    assert p.weight_count == 100
    assert p.sparsity == pytest.approx(0.5)


def test_profile_leaves_no_reference_cycles():
    # cyclic garbage is freed only by the collector, whose full collections cost more than a
    # small model's forward; a profile must free everything it made by reference counting
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    nnslim.profile(model, x)
    gc.collect()
    gc.disable()
    try:
        for memory in (True, False):
            nnslim.profile(model, x, memory=memory, backward=memory)
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("memory", [True, False])
def test_lazy_model_profiled_before_its_first_forward(memory):
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    p = nnslim.profile(model, torch.randn(2, 8), memory=memory)
    assert p.macs == 2 * 8 * 4 and p.params == 8 * 4 + 4
    assert p.static_bytes == 2 * 8 * 4  # the input: the weights are made during the forward
    if memory:
        assert p.peak_bytes >= p.static_bytes + 4 * (8 * 4 + 4) + 4 * 2 * 4


def test_views_of_one_storage_are_separate_weights_holding_its_bytes_once():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            qkv = torch.randn(12, 4)
            self.q, self.k, self.v = (nn.Parameter(qkv[i * 4 : (i + 1) * 4]) for i in range(3))
            self.tied = self.q  # the same tensor again: tied, counted once

        def forward(self, x):
            return x @ self.q.T + x @ self.k.T + x @ self.v.T

    p = nnslim.profile(Fused(), torch.randn(2, 4))
    assert p.params == 48 and p.param_bytes == 48 * 4
    with torch.device("meta"):  # built there: .to("meta") would copy each view (and untie)
        on_meta = Fused()
    assert nnslim.profile(on_meta, torch.randn(2, 4, device="meta")).params == 48


def test_two_tensors_over_the_same_memory_hold_it_once():
    import numpy as np

    data = np.ones((4, 4), dtype=np.float32)

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.from_numpy(data))
            self.register_buffer("b", torch.from_numpy(data))

        def forward(self, x):
            return x @ self.a + x @ self.b

    assert nnslim.profile(Aliased(), torch.randn(2, 4)).buffer_bytes == 4 * 4 * 4


def test_backward_counts_convolutions_norms_and_attention():
    # each gradient costs what its forward product did: a conv whose input needs no gradient
    # costs its weight gradient only; a later conv, both gradients
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    )
    x = torch.randn(2, 3, 8, 8)
    p = nnslim.profile(model, x, backward=True)
    first, second = 2 * 8 * 64 * 27, 2 * 4 * 36 * 72
    assert p.macs == first + second
    assert p.backward_macs == first + 2 * second
    assert p.unsupported == {}

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    p = nnslim.profile(Attention(), (q, k, v), backward=True)
    assert p.backward_macs == 2 * p.macs == 2 * (2 * 4 * 16 * 16 * (8 + 8))
    assert p.unsupported == {}


def test_backward_operators_without_formula_are_listed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.linalg.det(self.w) * x  # no formula forward or backward

    p = nnslim.profile(Odd(), torch.randn(3, 4), backward=True)
    assert "(backward)" in {path for paths in p.unsupported.values() for path in paths}


@pytest.mark.parametrize(
    "transform",
    [
        lambda: nnslim.Quantize(scheme="int8"),
        lambda: nnslim.Quantize(scheme="int8-dynamic"),
        lambda: nnslim.Quantize(scheme="int4"),
        lambda: nnslim.ShareWeights(clusters=16),
        lambda: nnslim.Factorize(ratio=0.5),
    ],
    ids=["int8", "int8-dynamic", "int4", "share", "factorize"],
)
def test_nnslim_own_layers_have_a_formula_for_every_operator(transform):
    """The first forward of a compressed layer (weights packed then, indices unpacked) has no
    operator the profiler cannot price."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32))
    x = torch.randn(2, 3, 8, 8)
    transform().apply(m.eval(), x)
    fresh = copy.deepcopy(m)  # no packed weights cached yet
    p = nnslim.profile(fresh, x, memory=False)
    assert p.unsupported == {}
    assert p.macs > 0


def test_latency_waits_for_the_accelerator_through_torch_benchmarks_clock(monkeypatch):
    # the clock is torch.utils.benchmark's, which synchronizes an accelerator before reading
    import nnslim.profiling.latency as lat
    from nnslim.base.inputs import as_inputs

    reads = []

    def clock():
        reads.append(1)
        return float(len(reads))

    monkeypatch.setattr(lat, "clock", clock)
    got = lat.measure_latency(torch.nn.Linear(2, 2), as_inputs(torch.randn(1, 2)), repeat=3)
    assert got.runs == 3 and got.median_ms == 1000.0  # each run one tick of the fake clock
    from torch.utils.benchmark.utils import timer

    assert lat.clock is not timer.timer  # patched here; the module's own is torch's:
    monkeypatch.undo()
    assert lat.clock is timer.timer


def test_a_module_called_inside_one_that_does_not_hold_it_is_charged_itself():
    # the rotary-embedding pattern: held by the model, called by each layer; a tracker that
    # only knows the set of running modules would charge it to the deeper caller
    class Layer(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.__dict__["shared"] = shared  # used, not held

        def forward(self, x):
            return self.fc(self.shared(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = nn.Linear(8, 8, bias=False)
            self.layers = nn.ModuleList([Layer(self.rope), Layer(self.rope)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    p = nnslim.profile(Net(), torch.randn(2, 8))
    own = {path: m.macs for path, m in p.modules.items()}
    assert p.modules["rope"].calls == 2
    assert own["rope"] == 2 * 2 * 64
    assert own["layers.0.fc"] == 2 * 64


@pytest.mark.parametrize(
    "transform",
    [
        nnslim.Quantize(scheme="int8"),
        nnslim.Quantize(scheme="int4", group_size=32),
        nnslim.ShareWeights(clusters=16),
        nnslim.Prune(structure="2:4", pack=True),
    ],
    ids=["int8", "int4", "palette", "packed-2:4"],
)
def test_compressed_layers_profile_on_meta_as_on_cpu(transform):
    """A compressed model moved to the meta device (planning without weights) profiles to the
    same parameters and weight bytes as on the CPU (its layers' zero counts, which read the
    values, were an error there). MACs are compared where the kernels agree: the CPU's int4
    kernel counts an 8-row layer's MACs padded to 16 rows, which the meta path does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    x = torch.randn(2, 64)
    transform.apply(model, x)
    cpu = nnslim.profile(model, x, memory=False)
    meta = nnslim.profile(model.to("meta"), x.to("meta"), memory=False)
    assert (meta.params, meta.param_bytes) == (cpu.params, cpu.param_bytes)
    if transform.__class__.__name__ != "Quantize" or transform.scheme != "int4":
        assert meta.macs == cpu.macs
