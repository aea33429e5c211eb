import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import nnslim
from tests.train.scripts import make_data, make_model
from tests.zoo import TinyCNN

QUIET = nnslim.TrainOptions(verbose=False)


def blobs(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def accuracy(model, data):
    with torch.no_grad():
        return sum(float((model(x).argmax(-1) == y).float().mean()) for x, y in data) / len(data)


def test_fit_learns_and_counts_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    data = blobs()
    before = accuracy(model, data)
    result = nnslim.Trainer(lr=0.2, options=QUIET).fit(model, data, epochs=5)
    assert result.steps == 5 * len(data)
    assert accuracy(model, data) > max(before, 0.9)
    assert result.losses[-1] < result.losses[0]


def test_optimizer_class_scheduler_and_mse():
    model = nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
    seen = []
    trainer = nnslim.Trainer(
        loss="mse",
        optimizer=torch.optim.Adam,
        lr=0.05,
        options=QUIET,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: seen.append(s) or 1.0),
    )
    trainer.fit(model, data)
    assert seen == [0, 1, 2, 3]


def test_distillation_without_targets_moves_student_to_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [torch.randn(32, 8) for _ in range(8)]

    def gap():
        with torch.no_grad():
            x = torch.cat(data)
            return float(
                nn.functional.kl_div(
                    student(x).log_softmax(-1), teacher(x).softmax(-1), reduction="batchmean"
                )
            )

    before = gap()
    nnslim.Trainer(optimizer=torch.optim.Adam, lr=0.01, teacher=teacher, options=QUIET).fit(
        student, data, epochs=10
    )
    assert gap() < 0.5 * before


def test_feature_matching_checks_shapes():
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    student = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 2))
    trainer = nnslim.Trainer(
        teacher=teacher, distillation=nnslim.Distillation(features={"0": "0"}), options=QUIET
    )
    with pytest.raises(
        ValueError, match=r"'0' has shape \(4, 12\) but the teacher's '0' has \(4, 16\)"
    ):
        trainer.fit(student, [(torch.randn(4, 8), torch.randint(0, 2, (4,)))])
    ok = nnslim.Trainer(
        teacher=teacher, distillation=nnslim.Distillation(features={"2": "2"}), options=QUIET
    )
    assert ok.fit(student, [(torch.randn(4, 8), torch.randint(0, 2, (4,)))]).steps == 1


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_relative_feature_loss_is_the_error_over_the_teachers_mean_square(scale):
    """With identical (zero) logits the loss is the feature term alone: the squared error over
    the teacher feature's mean square, averaged over pairs, the same at any feature scale (a
    residual stream in the thousands does not drown the logits)."""
    torch.manual_seed(0)

    def net(w):
        first = nn.Linear(8, 16)
        nn.init.zeros_(first.bias)
        with torch.no_grad():
            first.weight.copy_(w * scale)
        last = nn.Linear(16, 2)
        nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
        return nn.Sequential(first, nn.ReLU(), last)

    w_t, w_s = torch.randn(16, 8), torch.randn(16, 8)
    teacher, student = net(w_t).eval(), net(w_s)
    x = torch.randn(4, 8)
    d = nnslim.Distillation(
        alpha=1.0, features={"0": "0", "1": "1"}, feature_loss="relative", feature_weight=2.0
    )
    trainer = nnslim.Trainer(lr=1e-9, teacher=teacher, distillation=d, options=QUIET)
    got = trainer.fit(student, [(x, torch.zeros(4, dtype=torch.long))]).losses[0]
    with torch.no_grad():
        t0, s0 = teacher[0](x), student[0](x)
        t1, s1 = t0.relu(), s0.relu()
    want = 2.0 * sum(((s - t) ** 2).mean() / (t**2).mean() for s, t in ((s0, t0), (s1, t1))) / 2
    assert got == pytest.approx(float(want), rel=1e-5)


class _Encoder(nn.Module):
    """A model whose output is a hidden state (a Hugging Face encoder's output)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(8, 6, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.proj(x))


@pytest.mark.parametrize(
    "output_loss, want",
    [
        ("auto", lambda s, t: ((s - t) ** 2).mean() / (t**2).mean()),
        ("relative", lambda s, t: ((s - t) ** 2).mean() / (t**2).mean()),
        ("mse", lambda s, t: ((s - t) ** 2).mean()),
        ("cosine", lambda s, t: (1 - nn.functional.cosine_similarity(s, t, dim=-1)).mean()),
        (
            "kl",
            lambda s, t: (
                nn.functional.kl_div(
                    (s / 2).log_softmax(-1), (t / 2).softmax(-1), reduction="batchmean"
                )
                * 4
            ),
        ),
    ],
)
def test_output_loss_of_a_hidden_state(output_loss, want):
    """An encoder's output (``last_hidden_state``, no logits) is matched by its relative
    squared error under ``"auto"``, not by a softmax over hidden units; each named loss is the
    formula it documents (exactly, on the first step)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    teacher, student = _Encoder(torch.randn(6, 8)).eval(), _Encoder(torch.randn(6, 8))
    x = torch.randn(2, 3, 8)
    d = nnslim.Distillation(alpha=1.0, temperature=2.0, output_loss=output_loss)
    trainer = nnslim.Trainer(lr=1e-9, teacher=teacher, distillation=d, options=QUIET)
    got = trainer.fit(student, [x]).losses[0]
    with torch.no_grad():
        s, t = student.proj(x).reshape(-1, 6), teacher.proj(x).reshape(-1, 6)
    assert got == pytest.approx(float(want(s, t)), rel=1e-5)


class _Tokens(nn.Module):
    """A per-token encoder taking Hugging Face keywords, with one block to match."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 6)])

    def forward(self, input_ids, attention_mask=None):
        from transformers.modeling_outputs import BaseModelOutput

        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h)
        return BaseModelOutput(last_hidden_state=h)


@pytest.mark.parametrize("output_loss", ["relative", "kl", "cosine"])
def test_distillation_leaves_padded_positions_out(output_loss):
    """A batch with an ``attention_mask`` that marks padding is matched at its real tokens
    only (output and block features): the loss is the one of the real tokens gathered, and
    what the models compute at the padded positions changes nothing."""
    pytest.importorskip("transformers")
    teacher, student = _Tokens(0).eval(), _Tokens(1)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    d = nnslim.Distillation.for_blocks(teacher, alpha=1.0, temperature=2.0, output_loss=output_loss)
    real = mask.bool()

    def loss(batch):
        trainer = nnslim.Trainer(lr=1e-12, teacher=teacher, distillation=d, options=QUIET)
        return trainer.fit(copy.deepcopy(student), [batch]).losses[0]

    got = loss({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        kd = nnslim.Trainer(teacher=teacher, distillation=d)._kd
        hs = student.layers[0](student.emb(ids))[real]
        ht = teacher.layers[0](teacher.emb(ids))[real]
        s, t = student(ids).last_hidden_state[real], teacher(ids).last_hidden_state[real]
        want = (
            kd(s, t, output_loss)
            + (((hs - ht) ** 2).mean() / (ht**2).mean() + ((s - t) ** 2).mean() / (t**2).mean()) / 2
        )
    assert got == pytest.approx(float(want), rel=1e-5)
    # another pad token (other embeddings at the padded positions): the same loss
    other = ids.clone()
    other[1, 2:] = 19
    assert loss({"input_ids": other, "attention_mask": mask}) == pytest.approx(got, rel=1e-6)
    # without the mask every position counts
    assert loss({"input_ids": other}) != pytest.approx(got, rel=1e-3)
    # a tokenizer's BatchEncoding (not a dict) is masked the same
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert loss(enc) == pytest.approx(got, rel=1e-6)


def test_mean_cosine_matches_the_pooled_sentence_embedding():
    """``output_loss="mean_cosine"``: one minus the cosine of each sequence's output averaged
    over its real tokens (the sentence embedding), whatever the padded positions hold; a 2-D
    output is taken as pooled; an output of another rank is refused by name."""
    pytest.importorskip("transformers")
    teacher, student = _Tokens(0).eval(), _Tokens(1)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    d = nnslim.Distillation(alpha=1.0, output_loss="mean_cosine")

    def loss(batch):
        trainer = nnslim.Trainer(lr=1e-12, teacher=teacher, distillation=d, options=QUIET)
        return trainer.fit(copy.deepcopy(student), [batch]).losses[0]

    got = loss({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        s, t = student(ids).last_hidden_state, teacher(ids).last_hidden_state
        ps = torch.stack([s[0].mean(0), s[1, :2].mean(0)])
        pt = torch.stack([t[0].mean(0), t[1, :2].mean(0)])
        want = (1 - nn.functional.cosine_similarity(ps, pt, dim=-1)).mean()
    assert got == pytest.approx(float(want), rel=1e-5)
    other = ids.clone()
    other[1, 2:] = 19
    assert loss({"input_ids": other, "attention_mask": mask}) == pytest.approx(got, rel=1e-6)
    # the same sentences unpadded, one by one: the same pooled embeddings
    kd = nnslim.Trainer(teacher=teacher, distillation=d)._kd
    with torch.no_grad():
        one = [
            kd(
                student(i[None]).last_hidden_state,
                teacher(i[None]).last_hidden_state,
                "mean_cosine",
            )
            for i in (ids[0], ids[1, :2])
        ]
    assert float(sum(one) / 2) == pytest.approx(got, rel=1e-5)
    flat_s, flat_t = torch.randn(3, 6), torch.randn(3, 6)
    assert float(kd(flat_s, flat_t, "mean_cosine")) == pytest.approx(
        float(kd(flat_s, flat_t, "cosine")), rel=1e-6
    )
    with pytest.raises(ValueError, match="mean_cosine.*shape"):
        kd(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), "mean_cosine")
    # a sequence of padding alone has no embedding: it is left out, not counted as cosine 0
    s3, t3 = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    half = torch.tensor([[True, True, False, False], [False, False, False, False]])
    assert float(kd(s3, t3, "mean_cosine", half)) == pytest.approx(
        float(kd(s3[:1, :2], t3[:1, :2], "mean_cosine")), rel=1e-6
    )
    assert float(kd(s3, t3, "mean_cosine", torch.zeros(2, 4, dtype=torch.bool))) == 0.0


def test_auto_output_loss_keeps_kl_for_logits():
    """Logits (a plain tensor, or an output with ``logits`` beside a hidden state) keep the KL
    term under ``"auto"``."""
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from nnslim.base.inputs import is_hidden_state

    h = torch.randn(2, 3)
    assert not is_hidden_state(h)
    assert not is_hidden_state((h, h))
    assert not is_hidden_state(CausalLMOutputWithPast(logits=h, hidden_states=(h,)))
    assert is_hidden_state({"sentence_embedding": h})
    teacher = nn.Linear(8, 4).eval()
    student = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    d = nnslim.Distillation(alpha=1.0, temperature=3.0)
    got = nnslim.Trainer(lr=1e-9, teacher=teacher, distillation=d, options=QUIET)
    loss = got.fit(student, [x]).losses[0]
    with torch.no_grad():
        want = nn.functional.kl_div(
            (student(x) / 3).log_softmax(-1), (teacher(x) / 3).softmax(-1), reduction="batchmean"
        )
    assert loss == pytest.approx(float(want) * 9, rel=1e-5)


def test_output_of_another_shape_is_refused():
    teacher, student = nn.Linear(8, 4).eval(), nn.Linear(8, 3)
    trainer = nnslim.Trainer(teacher=teacher, options=QUIET)
    with pytest.raises(ValueError, match=r"student's output has shape \(5, 3\) but the teacher's"):
        trainer.fit(student, [torch.randn(5, 8)])


def test_regularization_shrinks_what_it_targets():
    torch.manual_seed(0)
    data = [(torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))) for _ in range(4)]
    plain, reg = TinyCNN(), TinyCNN()
    reg.load_state_dict(plain.state_dict())
    nnslim.Trainer(lr=0.01, options=QUIET).fit(plain, data, epochs=3)
    nnslim.Trainer(
        lr=0.01,
        regularization=nnslim.Regularization(l1=1e-3, bn_l1=1e-2, group_lasso=1e-2),
        options=QUIET,
    ).fit(reg, data, epochs=3)
    assert reg.bn1.weight.abs().sum() < plain.bn1.weight.abs().sum()
    assert reg.conv1.weight.abs().sum() < plain.conv1.weight.abs().sum()


def test_group_lasso_setup_does_not_eat_a_batch_of_a_one_shot_iterator():
    torch.manual_seed(0)
    data = [(torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))) for _ in range(4)]
    result = nnslim.Trainer(
        lr=0.01, regularization=nnslim.Regularization(group_lasso=1e-2), options=QUIET
    ).fit(TinyCNN(), iter(data), epochs=1)
    assert result.steps == 4


def test_accumulation_equals_a_bigger_batch():
    torch.manual_seed(0)
    a = nn.Linear(6, 3)
    b = nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nnslim.Trainer(lr=0.1, options=QUIET).fit(a, [(x, y)])
    nnslim.Trainer(lr=0.1, options=nnslim.TrainOptions(verbose=False, accumulate=2)).fit(
        b, [(x[:8], y[:8]), (x[8:], y[8:])]
    )
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_bf16_and_clipping_run():
    model = nn.Linear(4, 2)
    w = model.weight.detach().clone()
    data = [(torch.randn(8, 4) * 100, torch.randint(0, 2, (8,)))]
    opts = nnslim.TrainOptions(verbose=False, precision="bf16", clip_grad_norm=0.01)
    nnslim.Trainer(lr=1.0, options=opts).fit(model, data)
    assert 0 < float((model.weight.detach() - w).norm()) <= 0.0101


def test_early_stopping_restores_the_best_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.4, 0.3])
    snapshots = []

    def evaluate(m):
        snapshots.append(m.weight.detach().clone())
        return next(scores)

    opts = nnslim.TrainOptions(verbose=False, eval_every=1, patience=2)
    result = nnslim.Trainer(lr=0.5, evaluate=evaluate, options=opts).fit(
        model, [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(10)]
    )
    assert result.stopped_early and result.steps == 4 and result.best_metric == 0.9
    assert torch.equal(model.weight, snapshots[1])


def test_masks_stay_applied_during_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(model, torch.randn(1, 8))
    zeros = model[0].weight == 0
    nnslim.Trainer(lr=0.5, options=QUIET).fit(model, blobs(), epochs=2)
    assert (model[0].weight[zeros] == 0).all()
    assert (model[0].weight[~zeros] != 0).all()


def test_silent_when_not_verbose(capsys):
    nnslim.Trainer(options=nnslim.TrainOptions(verbose=False)).fit(
        nn.Linear(4, 2), [(torch.randn(2, 4), torch.tensor([0, 1]))]
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_nan_loss_stops_with_clear_error_and_keeps_weights():
    model = nn.Linear(4, 2)
    good = model.weight.detach().clone()
    data = [(torch.full((2, 4), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"the loss is nan at step 1; stopped before updating"):
        nnslim.Trainer(options=QUIET).fit(model, data)
    assert torch.equal(model.weight, good)


def _oscillating():
    """``w * 1`` fitted to 0 by SGD at lr 1.25: ``w <- w (1 - 2 lr) = -1.5 w``, so the loss
    ``w^2`` grows 2.25x a step and stays finite for dozens of steps."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    data = [(torch.ones(1, 1), torch.zeros(1, 1))] * 30
    return model, data


def test_a_diverging_loss_stops_and_puts_the_weights_back(tmp_path):
    model, data = _oscillating()
    sgd = nnslim.Trainer(optimizer=torch.optim.SGD, lr=1.25, options=QUIET)
    with pytest.raises(ValueError, match=r"the loss diverged: its mean over steps 11-20 is") as e:
        sgd.fit(model, data, checkpoint_dir=tmp_path / "ck")
    assert "weights from before fit() were put back" in str(e.value)
    assert "TrainOptions(diverge=None)" in str(e.value) and str(tmp_path / "ck") in str(e.value)
    assert float(model.weight.detach()) == 1.0  # exactly as before
    # the check off: the same run goes on to the end (the loss is finite throughout)
    off = nnslim.Trainer(
        optimizer=torch.optim.SGD,
        lr=1.25,
        options=nnslim.TrainOptions(verbose=False, diverge=None),
    )
    model, data = _oscillating()
    result = off.fit(model, data)
    assert result.steps == 30 and result.losses[-1] > 1e9
    # a loss that falls (factor -0.1 a step) runs to the end
    model, data = _oscillating()
    calm = nnslim.Trainer(optimizer=torch.optim.SGD, lr=0.45, options=QUIET)
    assert calm.fit(model, data).steps == 30


@pytest.mark.parametrize("bad", [1.0, 0.5, -2, float("nan")])
def test_diverge_option_is_checked(bad):
    with pytest.raises(ValueError, match=r"TrainOptions\(diverge=...\)|diverge"):
        nnslim.TrainOptions(diverge=bad)


class NaNGradient(nn.Module):
    """A finite loss whose gradient is NaN from step ``after`` on: sqrt at 0 has an infinite
    derivative, times the zero in front of it."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.after = after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x)
        if self.calls > self.after:
            w = self.fc.weight
            out = out + 0 * torch.sqrt(w - w.detach()).sum()
        return out


def test_nan_gradient_with_a_finite_loss_stops_before_stepping_and_checkpointing(tmp_path):
    torch.manual_seed(0)
    model = NaNGradient(after=2)
    data = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 4
    trainer = nnslim.Trainer(lr=0.1, options=nnslim.TrainOptions(verbose=False))
    with pytest.raises(ValueError, match=r"a gradient is NaN or Inf at step 3 \(in fc.weight\)"):
        trainer.fit(model, data, checkpoint_dir=tmp_path)
    assert torch.isfinite(model.fc.weight).all()
    # the last checkpoint holds the weights after step 2, all finite, and resumes
    model.after = 10**9
    model.calls = 0
    result = trainer.fit(model, data, checkpoint_dir=tmp_path, resume=True)
    assert result.steps == 4
    assert torch.isfinite(model.fc.weight).all()


def test_empty_loader_and_bad_options():
    with pytest.raises(ValueError, match="yielded no batch"):
        nnslim.Trainer(options=QUIET).fit(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="unknown value 'fp16'"):
        nnslim.Trainer(options=nnslim.TrainOptions(precision="fp16"))
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        nnslim.Trainer(options=QUIET).fit(nn.Linear(2, 2), [torch.randn(1, 2)], resume=True)


def test_hf_batches_use_the_model_loss():
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 8))
    result = nnslim.Trainer(optimizer=torch.optim.AdamW, lr=1e-2, options=QUIET).fit(
        model, [{"input_ids": ids, "labels": ids}] * 5
    )
    assert result.losses[-1] < result.losses[0]


def _run(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tests.train.scripts", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


def test_resume_after_kill_reaches_the_same_weights(tmp_path):
    full = _run(["resume", str(tmp_path / "a"), str(tmp_path / "full.pt"), "0"])
    assert full.returncode == 0, full.stderr
    killed = _run(["resume", str(tmp_path / "b"), str(tmp_path / "resumed.pt"), "17"])
    assert killed.returncode == -9  # SIGKILL mid-training
    assert not (tmp_path / "resumed.pt").exists()
    resumed = _run(["resume", str(tmp_path / "b"), str(tmp_path / "resumed.pt"), "0"])
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full.pt")
    b = torch.load(tmp_path / "resumed.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_optimizer_setup_is_refused_and_keeps_the_model(tmp_path):
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=2)
    step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5)  # noqa: E731
    adamw = nnslim.Trainer(optimizer=torch.optim.AdamW, lr=0.01, options=opts, scheduler=step_lr)
    adamw.fit(make_model(), make_data(), max_steps=4, checkpoint_dir=tmp_path)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    no_scheduler = nnslim.Trainer(optimizer=torch.optim.AdamW, lr=0.01, options=opts)
    with pytest.raises(ValueError, match="scheduler StepLR, this run has AdamW and None"):
        no_scheduler.fit(model, make_data(), checkpoint_dir=tmp_path, resume=True)
    sgd = nnslim.Trainer(lr=0.01, options=opts, scheduler=step_lr)
    with pytest.raises(ValueError, match="written with optimizer AdamW .* this run has SGD"):
        sgd.fit(model, make_data(), checkpoint_dir=tmp_path, resume=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same setup resumes where max_steps stopped it (position, RNG, AdamW moments) and
    # reaches the weights of an uninterrupted run
    result = adamw.fit(model, make_data(), max_steps=6, checkpoint_dir=tmp_path, resume=True)
    assert result.steps == 6
    straight = make_model()
    adamw.fit(straight, make_data(), max_steps=6)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # resuming the finished run with the same max_steps trains nothing and rewrites nothing
    again = adamw.fit(model, make_data(), max_steps=6, checkpoint_dir=tmp_path, resume=True)
    assert again.steps == 6
    for k, v in straight.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def _failure(proc):
    """What a failed torchrun run printed: every line naming an error, then its last lines (the
    launcher's summary alone does not say why a rank died)."""
    lines = proc.stderr.splitlines()
    marks = ("Error", "error", "terminate", "what()", "Exception", "Traceback", "abort")
    named = [line for line in lines if any(m in line for m in marks)]
    return "\n".join(named[-40:]) + "\n...\n" + proc.stderr[-1500:]


def _torchrun(port, args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "tests.train.scripts",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,  # a desynchronised collective would hang
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


@pytest.mark.parametrize("strategy,port", [("ddp", 29517), ("fsdp", 29518)])
def test_torchrun_matches_single_process_on_the_global_batch(tmp_path, strategy, port):
    proc = _torchrun(port, [strategy, str(tmp_path / "ddp.pt")])
    assert proc.returncode == 0, _failure(proc)
    ddp = torch.load(tmp_path / "ddp.pt")
    # one process, each step on the concatenation of the two ranks' batches
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = make_model()
    model[2].p = 0.0
    data = make_data(batch_size=8)

    class Merged:
        def __iter__(self):
            batches = list(iter(data))
            for i in range(0, len(batches) - 1, 2):
                (x0, y0), (x1, y1) = batches[i], batches[i + 1]
                yield torch.cat([x0, x1]), torch.cat([y0, y1])

    nnslim.Trainer(lr=0.1, options=QUIET).fit(model, Merged(), epochs=2)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k


def test_one_process_checkpoint_at_an_odd_position_resumes_under_torchrun(tmp_path):
    """Batch groups count from where the resumed run starts: a one-process checkpoint at step 3
    (3 batches read) resumes under 2 processes without a rank missing its batch."""
    killed = _run(["resume", str(tmp_path / "c"), str(tmp_path / "x.pt"), "4"])
    assert killed.returncode == -9
    from nnslim.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "c").name == "step-000000003"
    resumed = _torchrun(29522, ["resume", str(tmp_path / "c"), str(tmp_path / "x.pt"), "0"])
    assert resumed.returncode == 0, _failure(resumed)
    state = torch.load(latest_checkpoint(tmp_path / "c") / "state.pt", weights_only=True)
    # 3 single steps, then the 9 batches left of the first epoch in pairs (the last one
    # skipped), then 2 epochs of 6 pairs
    assert state["step"] == 3 + 4 + 2 * 6


def test_fsdp_checkpoint_resume_after_kill_reaches_the_same_weights(tmp_path):
    """Under FSDP the checkpoint gathers full weights and optimizer state (AdamW moments,
    scheduler, RNG) to rank 0; a run killed mid-training resumes to the uninterrupted result."""
    full = _torchrun(29519, ["resume", str(tmp_path / "a"), str(tmp_path / "full.pt"), "0", "fsdp"])
    assert full.returncode == 0, _failure(full)
    killed = _torchrun(
        29520, ["resume", str(tmp_path / "b"), str(tmp_path / "resumed.pt"), "11", "fsdp"]
    )
    assert killed.returncode != 0  # the ranks killed themselves at step 11
    assert not (tmp_path / "resumed.pt").exists()
    from nnslim.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "step-000000010"
    # the checkpoint holds a plain model (full tensors, the unsharded edit record)
    plain = nnslim.load(ckpt / "model.safetensors", make_model())
    assert plain[0].weight.shape == (32, 8)
    optimizer = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]
    assert optimizer["state"]["0.weight"]["exp_avg"].shape == (32, 8)  # full, keyed by name
    # the same checkpoint resumes on one process: weights and AdamW state carry over
    shutil.copytree(tmp_path / "b", tmp_path / "one")
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=1)
    step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5)  # noqa: E731
    trainer = nnslim.Trainer(optimizer=torch.optim.AdamW, lr=0.01, options=opts, scheduler=step_lr)
    one = trainer.fit(
        make_model(),
        make_data(),
        epochs=3,
        checkpoint_dir=tmp_path / "one",
        resume=True,
        max_steps=11,
    )
    assert one.steps == 11
    after = torch.load(latest_checkpoint(tmp_path / "one") / "state.pt", weights_only=True)
    assert int(after["optimizer"]["state"]["0.weight"]["step"]) == 11
    resumed = _torchrun(
        29521, ["resume", str(tmp_path / "b"), str(tmp_path / "resumed.pt"), "0", "fsdp"]
    )
    assert resumed.returncode == 0, _failure(resumed)
    a = torch.load(tmp_path / "full.pt")
    b = torch.load(tmp_path / "resumed.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _loss(model, data):
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in data) / len(data)


def test_fine_tuning_keeps_compressed_layers_what_they_are():
    """QAT, factorized and palettized layers train and stay quantizable/low-rank/clustered."""
    data = blobs()
    torch.manual_seed(0)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    # QAT: the float weights move, and convert gives the function that was trained
    qat = fresh()
    nnslim.Quantize(scheme="int8", qat=True).apply(qat, torch.randn(2, 8))
    w0 = qat[0].weight.detach().clone()
    before = _loss(qat, data)
    nnslim.Trainer(lr=0.2, options=QUIET).fit(qat, data, epochs=5)
    assert type(qat[0]).__name__ == "FakeQuantLinear" and not torch.equal(qat[0].weight, w0)
    assert _loss(qat, data) < before
    x = torch.randn(4, 8)
    with torch.no_grad():
        fake = qat(x)
    nnslim.convert(qat)
    assert type(qat[0]).__name__ == "Int8Linear"
    with torch.no_grad():  # same grid; the int8 kernel rounds activations (bf16/7-bit)
        assert float((qat(x) - fake).norm() / fake.norm()) < 0.03

    # factorized: both factors train, the rank stays
    fac = fresh()
    nnslim.Factorize(rank=2, select=["0"]).apply(fac, torch.randn(2, 8))
    first, second = fac[0].first.weight.detach().clone(), fac[0].second.weight.detach().clone()
    before = _loss(fac, data)
    nnslim.Trainer(lr=0.2, options=QUIET).fit(fac, data, epochs=5)
    assert fac[0].first.weight.shape == (2, 8) and fac[0].second.weight.shape == (32, 2)
    assert not torch.equal(fac[0].first.weight, first)
    assert not torch.equal(fac[0].second.weight, second)
    assert _loss(fac, data) < before

    # palettized: only the centroids train; every weight stays on its (moved) centroid
    pal = fresh()
    nnslim.ShareWeights(clusters=4, select=["0"]).apply(pal, torch.randn(2, 8))
    codes, book = pal[0].codes().clone(), pal[0].codebook.detach().clone()
    before = _loss(pal, data)
    nnslim.Trainer(lr=0.2, options=QUIET).fit(pal, data, epochs=5)
    assert torch.equal(pal[0].codes(), codes) and not torch.equal(pal[0].codebook, book)
    with torch.no_grad():
        w = pal[0].weight
        assert torch.unique(w).numel() <= 4 * pal[0].codebook.shape[0]
        group = torch.arange(w.shape[0]) // pal[0].group_size
        rebuilt = pal[0].codebook.index_select(0, group).gather(1, codes).reshape(w.shape)
        assert torch.equal(w, rebuilt)
    assert _loss(pal, data) < before


def test_resume_with_plain_sgd_reaches_the_same_weights(tmp_path):
    # plain SGD keeps no per-parameter state: torch's full-state loader found no device in it
    # and raised "Expected device to be set"
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=2)
    torch.manual_seed(3)
    full = make_model()
    nnslim.Trainer(lr=0.05, options=opts).fit(full, make_data(), max_steps=8)
    torch.manual_seed(3)
    first = make_model()
    nnslim.Trainer(lr=0.05, options=opts).fit(
        first, make_data(), max_steps=4, checkpoint_dir=tmp_path
    )
    torch.manual_seed(3)
    resumed = make_model()
    nnslim.Trainer(lr=0.05, options=opts).fit(
        resumed, make_data(), max_steps=8, checkpoint_dir=tmp_path, resume=True
    )
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("damage", ["truncate-weights", "truncate-state", "flip-byte"])
def test_resume_passes_over_a_corrupt_checkpoint_to_the_previous_one(tmp_path, damage):
    """A checkpoint damaged after it was written (a truncated copy, a flipped byte) is passed
    over with a note; training resumes from the one before and reaches the same weights."""
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=1)  # keeps the newest 2

    def fit(directory, max_steps, resume=False):
        torch.manual_seed(0)
        model = make_model()
        result = nnslim.Trainer(lr=0.05, options=opts).fit(
            model,
            make_data(),
            epochs=1,
            checkpoint_dir=directory,
            resume=resume,
            max_steps=max_steps,
        )
        return model, result

    full, _ = fit(tmp_path / "full", 6)
    fit(tmp_path / "run", 4)
    from nnslim.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == "step-000000004"
    target = newest / ("state.pt" if damage == "truncate-state" else "model.safetensors")
    data = target.read_bytes()
    if damage == "flip-byte":
        data = data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]  # inside the last tensor
    else:
        data = data[: len(data) // 2]
    target.write_bytes(data)
    with pytest.warns(UserWarning, match="step-000000004 is unreadable"):
        resumed, result = fit(tmp_path / "run", 6, resume=True)
    assert any("resumed from step-000000003 instead" in n for n in result.notes)
    assert result.steps == 6
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, full.state_dict()[k], atol=1e-6), k


def test_resume_with_every_checkpoint_corrupt_says_so(tmp_path):
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=2)
    nnslim.Trainer(lr=0.05, options=opts).fit(
        make_model(), make_data(), epochs=1, checkpoint_dir=tmp_path, max_steps=4
    )
    for f in tmp_path.glob("step-*/model.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="no checkpoint in the directory reads back whole"):
        nnslim.Trainer(lr=0.05, options=opts).fit(
            make_model(), make_data(), epochs=1, checkpoint_dir=tmp_path, resume=True
        )


def test_a_model_in_train_mode_keeps_the_batchnorm_it_froze():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # frozen statistics for fine-tuning
    stats = model[1].running_mean.clone()
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    nnslim.Trainer(lr=0.1, options=QUIET).fit(model, data)
    assert not model[1].training and torch.equal(model[1].running_mean, stats)
    # a model handed over in eval mode (as transforms leave it) is trained in train mode, and
    # comes back in eval mode
    model.eval()
    nnslim.Trainer(lr=0.1, options=QUIET).fit(model, data)
    assert not torch.equal(model[1].running_mean, stats)
    assert not any(m.training for m in model.modules())


def test_distillation_for_blocks_recovers_a_pruned_llama():
    """Minitron-style recovery in a few lines: the blocks' outputs (the residual stream, kept
    wide by MLP pruning) and the logits of the unpruned model teach the pruned one. The
    teacher first learns a rule (each token is the previous + 7), so pruning costs it."""
    transformers = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=3))
    g = torch.Generator().manual_seed(0)

    def batch():
        x = (torch.randint(0, 300, (8, 1), generator=g) + 7 * torch.arange(16)) % 300
        return {"input_ids": x}

    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(100):
        b = batch()
        loss = teacher(**b, labels=b["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    ids = [batch() for _ in range(6)]
    student = copy.deepcopy(teacher)
    nnslim.Prune(ratio=0.5, select="re:.*mlp.*").apply(student, ids[0])
    d = nnslim.Distillation.for_blocks(teacher, every=2)
    assert d.features == {f"model.layers.{i}": f"model.layers.{i}" for i in (0, 2)}
    assert d.feature_loss == "relative"  # scale-free: the residual stream is not O(1)

    def gap():
        with torch.no_grad():
            return sum(
                float(
                    nn.functional.kl_div(
                        student(**b).logits.log_softmax(-1),
                        teacher(**b).logits.softmax(-1),
                        reduction="batchmean",
                    )
                )
                for b in ids
            )

    before = gap()
    nnslim.Trainer(
        optimizer=torch.optim.Adam, lr=1e-3, teacher=teacher, distillation=d, options=QUIET
    ).fit(student, ids, epochs=4)
    assert gap() < 0.2 * before
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        nnslim.Distillation.for_blocks(nn.Linear(2, 2))


def test_a_feature_that_does_not_run_is_an_error_not_a_skip():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            return self.a(x)

    t2 = Skips().eval()
    s2 = copy.deepcopy(t2)
    trainer = nnslim.Trainer(
        teacher=t2, distillation=nnslim.Distillation(features={"unused": "unused"}), options=QUIET
    )
    with pytest.raises(ValueError, match="student's 'unused' did not run"):
        trainer.fit(s2, [(torch.randn(4, 8), torch.randint(0, 2, (4,)))])
