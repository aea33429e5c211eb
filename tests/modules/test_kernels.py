"""nnslim's integer kernels as custom operators: torch.compile, torch.export and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnslim.modules import kernels
from nnslim.modules.quantized import Int4Linear, Int8DynamicLinear, Int8Linear

LAYERS = {
    "int8": lambda lin: Int8Linear.from_float(lin),
    "int8-dynamic": lambda lin: Int8DynamicLinear.from_float(lin),
    "int4": lambda lin: Int4Linear.from_float(lin, 32),
    "int4-padded": lambda lin: Int4Linear.from_float(lin, 128),  # 64 inputs padded to 128
}


def _layer(name):
    torch.manual_seed(0)
    return LAYERS[name](nn.Linear(64, 40)).eval()


@pytest.mark.parametrize(
    "op, args",
    [
        (kernels.int8_weight_mm, lambda: (torch.randn(5, 64), *_codes8())),
        (kernels.int8_dynamic_mm, lambda: (torch.randn(5, 64), *_codes8())),
        (kernels.int4_mm, lambda: (torch.randn(5, 64), *_codes4(), 32)),
    ],
    ids=["int8_weight_mm", "int8_dynamic_mm", "int4_mm"],
)
def test_ops_pass_torch_opcheck(op, args):
    """torch's own check of a custom op: schema, fake (meta) implementation, autograd
    registration and what torch.compile needs of it."""
    x, *rest = args()
    torch.library.opcheck(op, (x.requires_grad_(), *rest))


def _codes8():
    m = _layer("int8")
    return m.qweight, m.scale


def _codes4():
    m = _layer("int4")
    return m.qweight, m.scales, m.mins


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches (fake tensors, frames) are dropped after the test, so that their
    garbage does not surface in a later test that counts cyclic garbage."""
    import gc

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    gc.collect()


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_matches_eager(name, fresh_dynamo):
    """Inductor crashed on every int8 layer before (it cannot lower aten._weight_int8pack_mm,
    and wants oneDNN's packed weight as a graph constant)."""
    m = _layer(name)
    x = torch.randn(3, 7, 64)
    got = torch.compile(m)(x)
    assert torch.allclose(got, m(x), atol=1e-5, rtol=1e-5)


def test_compiled_int8_dynamic_traces_the_rounding_and_keeps_only_the_gemm_opaque(fresh_dynamo):
    """Compiled inference of int8-dynamic on CPU: the activations' rounding is plain torch
    operations Inductor fuses, only the integer GEMM is an operator, with no graph break
    (reading /proc/cpuinfo for VNNI inside the trace broke the graph per layer), and the
    result is the eager kernel's exactly."""
    if not kernels.onednn_available():
        pytest.skip("no oneDNN quantized kernels in this torch build")
    m = nn.Sequential(
        _layer("int8-dynamic"), nn.ReLU(), Int8DynamicLinear.from_float(nn.Linear(40, 8))
    ).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0
        gm = explained.graphs[0]
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert "nnslim.int8_rows_mm.default" in ops and "nnslim.int8_dynamic_mm.default" not in ops
        assert torch.equal(torch.compile(m)(x), m(x))
    torch.library.opcheck(kernels.int8_rows_mm, (*kernels.quantize_rows(x, 127), *_codes8(), 127))


@pytest.mark.parametrize("name", ["int4", "int4-padded"])
def test_compiled_int4_traces_the_casts_and_keeps_only_the_gemm_opaque(name, fresh_dynamo):
    """Compiled int4 inference on CPU: the cast to bf16, the padding to the stored width and
    the cast back are torch operations Inductor fuses with the layers around (the whole
    ``nnslim::int4_mm`` made a bare int4 MLP compile 2-4% slower than eager); the GEMM is
    ``nnslim::int4_packed_mm``, and the result is the eager kernel's exactly."""
    m = nn.Sequential(_layer(name), nn.ReLU(), Int4Linear.from_float(nn.Linear(40, 8), 32)).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0
        ops = {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}
        assert "nnslim.int4_packed_mm.default" in ops and "nnslim.int4_mm.default" not in ops
        assert torch.equal(torch.compile(m)(x), m(x))
    lin = _layer(name)
    xb = F.pad(x, (0, 2 * lin.qweight.shape[1] - 64)).to(torch.bfloat16)
    torch.library.opcheck(
        kernels.int4_packed_mm, (xb, lin.qweight, lin.scales, lin.mins, lin.group_size)
    )


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradient_reaches_the_inputs_through_the_dequantized_weight(name):
    """The int4 and int8 kernels have no derivative; the ops pass the gradient of
    ``x @ dequantized(W).T`` back (straight through the quantization)."""
    m = _layer(name)
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 40)
    m(x).backward(g)
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, m.weight, m.bias).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_an_exported_int4_program_keeps_its_packed_weight():
    """torch.export saw the int4 repacking as graph work and redid it every call (8x slower
    than eager); the op packs once, outside the graph."""
    m = _layer("int4")
    x = torch.randn(2, 64)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "nnslim.int4_packed_mm.default" in targets  # the GEMM alone (casts traced around)
    assert not any("int4pack" in t for t in targets)
    assert torch.allclose(ep.module()(x), m(x), atol=1e-6)


def test_int8_kernel_takes_a_weight_at_an_unaligned_address():
    """torch's packed int8 GEMM reads its weight with aligned loads; a weight at an 8-byte
    offset (a safetensors tensor, a view into a larger buffer) crashed the process. It is
    copied first and the product is the aligned weight's, exactly."""
    from nnslim.modules.kernels import int8_weight_mm

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    buf = torch.zeros(w.numel() + 8, dtype=torch.int8)
    view = buf[8:].view(32, 64)
    view.copy_(w)
    assert view.data_ptr() % 64 != 0
    scale = torch.rand(32, generator=g) / 100
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(int8_weight_mm(x, view, scale), int8_weight_mm(x, w, scale))
