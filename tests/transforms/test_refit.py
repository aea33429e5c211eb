"""Prune(refit=True): the layers reading pruned channels refit by least squares."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.transforms.refit import patch_rows, solve


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(40, 80),
    d=st.integers(2, 12),
    kept=st.integers(1, 12),
    out=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_solve_is_the_least_squares_fit(n, d, kept, out, seed):
    """Without damping, ``solve`` is ``lstsq(X, X_ref W^T)`` and its error figures are the
    relative output errors computed directly."""
    kept = min(kept, d)
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x_ref[:, :kept] + 0.1 * torch.randn(n, kept, generator=g, dtype=torch.float64)
    w_ref = torch.randn(out, d, generator=g, dtype=torch.float64)
    w_now = w_ref[:, :kept].clone()
    y = x_ref @ w_ref.t()  # the unpruned layer's output
    w, before, after = solve(w_now, x.t() @ x, y.t() @ x, float((y**2).sum()), damp=0)
    best = torch.linalg.lstsq(x, y).solution.t()
    assert torch.allclose(w, best, atol=1e-8, rtol=1e-6)
    assert before == pytest.approx(_rel(x @ w_now.t(), y), rel=1e-6, abs=1e-9)
    assert after == pytest.approx(_rel(x @ best.t(), y), rel=1e-6, abs=1e-9)
    assert after <= before + 1e-12


def test_patch_rows_are_the_convolution_as_a_product():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 9, 9)
    rows = patch_rows(conv, x)  # a ones column for the bias
    w = torch.cat([conv.weight.reshape(5, -1), conv.bias[:, None]], dim=1)
    y = (rows @ w.t()).reshape(2, -1, 5).transpose(1, 2).reshape(2, 5, 5, 5)
    assert torch.allclose(y, conv(x), atol=1e-5)


class Linear3(nn.Module):
    """Three 1x1 convolutions without nonlinearity on 3 input channels: every layer's output
    has rank 3, so a pruned layer's kept inputs still determine the removed ones and a refit
    reproduces the original output exactly (up to the damping)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_refit_reproduces_a_rank_deficient_network():
    """``b`` loses inputs and outputs: its refit must target the original rows it keeps
    (recorded as Prune cuts them), ``c`` the whole original output."""
    torch.manual_seed(0)
    model = Linear3()
    cal = [torch.randn(4, 3, 6, 6) for _ in range(4)]
    test = torch.randn(8, 3, 6, 6)
    ref = model(test).detach()
    plain, refit = copy.deepcopy(model), copy.deepcopy(model)
    nnslim.Prune(ratio=0.5).apply(plain, cal[0], calibration=cal)
    report = nnslim.Prune(ratio=0.5, refit=True).apply(refit, cal[0], calibration=cal)
    assert refit.b.in_channels == refit.b.out_channels == 8
    # which original channels each layer keeps, read off the plainly pruned weights (exact
    # copies of original rows and columns): b's refit must reproduce b's kept outputs
    wa, wb = model.a.weight.flatten(1), model.b.weight.flatten(1)
    s = [int((wa == r).all(1).nonzero()) for r in plain.a.weight.flatten(1)]
    rows = [int((wb[:, s] == r).all(1).nonzero()) for r in plain.b.weight.flatten(1)]
    inner = model.b(model.a(test)).detach()[:, rows]
    assert _rel(refit.b(refit.a(test)).detach(), inner) < 0.03
    assert _rel(plain(test).detach(), ref) > 0.3
    assert _rel(refit(test).detach(), ref) < 0.03  # the damping (1% of the mean diagonal)
    errors = {c.path: c.details.get("refit_error") for c in report.changes}
    assert errors["a"] is None  # its inputs kept their channels
    assert errors["b"][1] < 0.03 < 0.3 < errors["b"][0]
    assert errors["c"][1] < 0.03 < 0.3 < errors["c"][0]
    assert any("refit 2 layers" in n for n in report.notes)


class MLPs(nn.Module):
    def __init__(self, d=16, h=64):
        super().__init__()
        self.up1, self.down1 = nn.Linear(d, h), nn.Linear(h, d)
        self.up2, self.down2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        x = x + self.down1(F.gelu(self.up1(x)))
        return x + self.down2(F.gelu(self.up2(x)))


def test_refit_lowers_the_error_on_held_out_data():
    torch.manual_seed(0)
    model = MLPs()
    mix = torch.randn(16, 16)
    cal = [torch.randn(128, 16) @ mix for _ in range(8)]
    test = torch.randn(512, 16) @ mix
    ref = model(test).detach()
    errs = {}
    for refit in (False, True):
        m = copy.deepcopy(model)
        nnslim.Prune(ratio=0.5, importance="wanda", select=["up1", "up2"], refit=refit).apply(
            m, cal[0], calibration=cal
        )
        assert m.down1.in_features == m.down2.in_features == 32
        errs[refit] = _rel(m(test).detach(), ref)
    assert errs[True] < 0.6 * errs[False]


def _llama():
    from tests.zoo import llama_config

    return pytest.importorskip("transformers").LlamaForCausalLM(llama_config()).eval()


def _gpt2():
    from tests.zoo import gpt2_config

    return pytest.importorskip("transformers").GPT2LMHeadModel(gpt2_config()).eval()


@pytest.mark.parametrize(
    "build, tokens, select, readers",
    [
        # Llama: the attention's and the MLP's output Linears
        (
            _llama,
            64,
            r"re:model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)",
            ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
        ),
        # GPT-2's projections are Hugging Face Conv1D (weights stored (in, out))
        (
            _gpt2,
            48,
            r"re:transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
            ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
        ),
    ],
    ids=["llama", "gpt2"],
)
def test_refit_on_language_models_readers(build, tokens, select, readers):
    """Heads and MLP units pruned: exactly the layers reading them are refit, and the logits
    move less from the unpruned model's than without the refit."""
    torch.manual_seed(0)
    model = build()
    cal = [{"input_ids": torch.randint(0, 300, (2, tokens))} for _ in range(4)]
    test = torch.randint(0, 300, (2, tokens))
    ref = model(test).logits.detach()
    errs = {}
    for refit in (False, True):
        m = copy.deepcopy(model)
        report = nnslim.Prune(ratio=0.25, importance="wanda", select=select, refit=refit).apply(
            m, cal[0], calibration=cal
        )
        if refit:
            refit_paths = {c.path for c in report.changes if "refit_error" in c.details}
            assert refit_paths == {r.format(i) for i in (0, 1) for r in readers}
        errs[refit] = _rel(m(test).logits.detach(), ref)
    assert errs[True] < 0.8 * errs[False]


def test_refit_leaves_masked_layers_and_says_so():
    torch.manual_seed(0)
    model = MLPs()
    cal = [torch.randn(128, 16) for _ in range(4)]
    nnslim.Prune(ratio=0.5, structure="unstructured", select=["down1"]).apply(model, cal[0])
    report = nnslim.Prune(ratio=0.5, select=["up1", "up2"], refit=True).apply(
        model, cal[0], calibration=cal
    )
    assert any("down1: it holds a sparsity mask" in n for n in report.notes)
    errors = {c.path: c.details.get("refit_error") for c in report.changes}
    assert errors["down1"] is None and errors["down2"] is not None


def test_refit_with_too_few_rows_is_left_and_said():
    torch.manual_seed(0)
    model = MLPs()
    cal = [torch.randn(4, 16)]  # 4 rows for 33 columns (32 inputs and the bias)
    report = nnslim.Prune(ratio=0.5, select=["up1"], refit=True).apply(
        model, cal[0], calibration=cal
    )
    assert any("4 calibration rows for 33 weight columns" in n for n in report.notes)


def test_refit_bad_input():
    with pytest.raises(ValueError, match="no channel is removed"):
        nnslim.Prune(ratio=0.5, structure="unstructured", refit=True)
    model = MLPs()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration"):
        nnslim.Prune(ratio=0.5, select=["up1"], refit=True).apply(model, torch.randn(2, 16))
    bad = [torch.randn(8, 16), torch.randn(8, 5)]  # the second batch cannot run
    with pytest.raises(Exception, match="calibration batch 1"):
        nnslim.Prune(ratio=0.5, select=["up1"], refit=True).apply(
            model, torch.randn(2, 16), calibration=bad
        )
    after = model.state_dict()
    assert model.down1.in_features == 64
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_choose_damp_is_two_fold_cross_validation():
    """The ridge strength is chosen by fitting on one fold of batches and measuring on the
    other; the errors it reports are those held-out errors, computed here from the rows."""
    from nnslim.transforms.refit import DAMPS, choose_damp

    g = torch.Generator().manual_seed(3)
    w_ref = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w_now = w_ref[:, :4].clone()
    folds, data = [], []
    for _ in range(2):
        kept = torch.randn(30, 4, generator=g, dtype=torch.float64)
        gone = kept[:, :2] + 0.2 * torch.randn(30, 2, generator=g, dtype=torch.float64)
        x_ref = torch.cat([kept, gone], dim=1)  # the removed inputs follow two kept ones
        x = kept + 0.1 * torch.randn(30, 4, generator=g, dtype=torch.float64)
        data.append((x, x_ref))
        y = x_ref @ w_ref.t()
        folds.append({"gram": x.t() @ x, "yx": y.t() @ x, "energy": float((y**2).sum())})

    def ridge(x, x_ref, damp):
        lam = damp * (x * x).sum(0)
        return (x_ref @ w_ref.t()).t() @ x + w_now * lam, x.t() @ x + torch.diag(lam)

    def held_out(damp):
        err = 0.0
        for fit, test in ((0, 1), (1, 0)):
            rhs, a = ridge(*data[fit], damp)
            w = torch.linalg.solve(a, rhs.t()).t()
            x, x_ref = data[test]
            err += float(((x @ w.t() - x_ref @ w_ref.t()) ** 2).sum())
        return err

    energy = sum(float(((x_ref @ w_ref.t()) ** 2).sum()) for _, x_ref in data)
    now = sum(float(((x @ w_now.t() - x_ref @ w_ref.t()) ** 2).sum()) for x, x_ref in data)
    chosen, before, after = choose_damp(w_now, folds)
    assert before == pytest.approx((now / energy) ** 0.5, rel=1e-9)
    best = min(DAMPS, key=held_out)
    assert held_out(best) < now  # here a refit helps on data it did not see
    assert chosen == best
    assert after == pytest.approx((held_out(chosen) / energy) ** 0.5, rel=1e-9)
    assert after < before
    # where no fit beats the cut weight on the held-out fold (it is exact), it is kept
    exact = w_ref[:, :4].clone()
    same = [
        {
            "gram": f["gram"],
            "yx": exact @ f["gram"],
            "energy": float((exact @ f["gram"] * exact).sum()),
        }
        for f in folds
    ]
    assert choose_damp(exact, same)[0] is None


def test_a_failing_refit_restores_the_model(monkeypatch):
    """A layer that kept its outputs keeps its bias tensor through the cut; the refit gives it
    a new one (never writes in place), so a failure after the refit of some layers still
    restores the model exactly."""
    import nnslim.transforms.refit as refit_mod

    torch.manual_seed(0)
    model = MLPs()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    values = {k: v.detach().clone() for k, v in tensors.items()}
    cal = [torch.randn(64, 16) for _ in range(4)]
    real = refit_mod.choose_damp
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second layer's refit")
        return real(*a, **k)

    monkeypatch.setattr(refit_mod, "choose_damp", second_fails)
    with pytest.raises(RuntimeError, match="boom"):
        nnslim.Prune(ratio=0.5, select=["up1", "up2"], refit=True).apply(
            model, cal[0], calibration=cal
        )
    assert len(calls) == 2  # the first layer was refit before the failure
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors[k] for k in tensors)
    assert all(torch.equal(after[k], values[k]) for k in values)


def test_cuts_on_trial_copies_are_not_recorded():
    from nnslim.modules.masks import cut_mask, not_recording_cuts, recording_cuts

    a, b = nn.Linear(4, 6), nn.Linear(4, 6)
    with recording_cuts() as cuts:
        with torch.no_grad():
            a.weight = nn.Parameter(a.weight[[0, 2, 3, 5]])
        cut_mask(a, "out", [1, 4])
        with not_recording_cuts():
            cut_mask(b, "out", [0])
        with torch.no_grad():
            a.weight = nn.Parameter(a.weight[[1, 2, 3]])
        cut_mask(a, "out", [0])  # a second cut composes with the first
    assert set(cuts) == {id(a)}
    assert cuts[id(a)][1].tolist() == [2, 3, 5]


class _Relu(nn.Module):
    """An MLP block whose down projection's output an in-place ReLU then overwrites."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.inplace = inplace

    def forward(self, x):
        y = self.down(torch.relu(self.up(x)))
        return (y.relu_() if self.inplace else torch.relu(y)) + x


def test_refit_targets_are_the_outputs_before_an_in_place_change():
    """The unpruned layer's outputs (the refit's targets) are copied as it returns them: an
    in-place ReLU after it changes nothing in the refit (the same weights as with the
    out-of-place ReLU)."""
    got = {}
    g = torch.Generator().manual_seed(3)
    cal = [torch.randn(64, 16, generator=g) for _ in range(4)]
    for inplace in (False, True):
        torch.manual_seed(0)

        class Net(nn.Module):
            def __init__(self, inplace: bool):
                super().__init__()
                self.blocks = nn.ModuleList([_Relu(inplace), _Relu(inplace)])

            def forward(self, x):
                for b in self.blocks:
                    x = b(x)
                return x

        model = Net(inplace).eval()
        report = nnslim.Prune(ratio=0.5, select=["blocks.0.up", "blocks.1.up"], refit=True).apply(
            model, cal[0], calibration=cal
        )
        assert any("refit_error" in c.details for c in report.changes)
        got[inplace] = [model.blocks[i].down.weight.detach().clone() for i in range(2)]
    for a, b in zip(got[False], got[True]):
        torch.testing.assert_close(a, b)
