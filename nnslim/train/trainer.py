"""``nnslim.Trainer``: fine-tune a compressed model to win back accuracy."""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from ..base.blocks import layer_stack
from ..base.distributed import rank_world
from ..base.inputs import (
    Inputs,
    as_inputs,
    first_tensor,
    is_hidden_state,
    per_token,
    real_tokens,
)
from ..base.modules import copy_model, is_hf_conv1d
from ..base.snapshot import preserve_modes
from ..base.validate import check_choice, check_fraction, check_int, check_type
from ..io.save import _record_of, with_float_dtypes
from ..modules.masks import apply_masks
from .checkpoint import (
    CorruptCheckpoint,
    checkpoints_newest_first,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "Distillation",
    "Regularization",
    "TrainOptions",
    "TrainResult",
    "TrainState",
    "Trainer",
]


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from the teacher given to the :class:`Trainer`.

    Attributes:
        temperature: softening temperature of the KL term on logits.
        output_loss: how the student's output is matched to the teacher's. ``"kl"``: KL
            divergence of the softened distributions (the output is logits); ``"mse"``: mean
            squared error; ``"relative"``: squared error divided by the teacher output's mean
            square (scale-free); ``"cosine"``: one minus the cosine similarity of each output
            vector (last dimension), averaged; ``"mean_cosine"``: one minus the cosine similarity
            of each sequence's mean-pooled output (a ``(batch, tokens, features)`` output
            averaged over its real tokens: the sentence embedding a sentence-transformers model
            serves, matched as it is used; a 2-D output is taken as pooled already); ``"auto"``
            (default): ``"kl"`` when the output is
            logits (a tensor, a tuple, or a Hugging Face output with ``logits``), and
            ``"relative"`` when it is a hidden state or an embedding (an output with
            ``last_hidden_state``, ``sentence_embedding`` or ``embeddings`` and no ``logits``:
            an encoder's, where a softmax over hidden units is meaningless).
        alpha: weight of the distillation terms (the task loss gets ``1 - alpha``; without
            targets the distillation terms alone are used).
        features: student module path -> teacher module path whose outputs are matched with a
            mean squared error (shapes must agree: pick layers pruning did not narrow, such as
            residual-stream block outputs).
        feature_weight: weight of the feature terms.
        feature_loss: ``"mse"``: the mean squared error of each matched pair, summed;
            ``"relative"``: each pair's squared error divided by the teacher feature's mean
            square, averaged over the pairs (scale-free: a transformer's residual stream reaches
            values in the thousands, where plain MSE drowns the logit term; the default of
            :meth:`for_blocks`).

    A batch whose inputs carry an ``attention_mask`` that marks padding (a Hugging Face
    tokenizer's padded batch) is matched at its real tokens only: per-token outputs and
    features at padded positions enter no term (they feed nothing a user reads, and would
    otherwise take a share of the loss that grows with the padding).
    """

    temperature: float = 4.0
    alpha: float = 0.5
    features: dict[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0
    feature_loss: Literal["mse", "relative"] = "mse"
    output_loss: Literal["auto", "kl", "mse", "relative", "cosine", "mean_cosine"] = "auto"

    def __post_init__(self) -> None:
        check_fraction(
            "Distillation", "temperature", self.temperature, high=1e6, low_inclusive=False
        )
        check_fraction("Distillation", "alpha", self.alpha, high_inclusive=True)
        check_fraction("Distillation", "feature_weight", self.feature_weight, high=1e6)
        check_choice("Distillation", "feature_loss", self.feature_loss, ("mse", "relative"))
        check_choice(
            "Distillation",
            "output_loss",
            self.output_loss,
            ("auto", "kl", "mse", "relative", "cosine", "mean_cosine"),
        )
        if not isinstance(self.features, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.features.items()
        ):
            raise TypeError(
                f"Distillation(features=...): expected a dict of student module path -> teacher "
                f"module path (strings), got {self.features!r:.80}."
            )

    @classmethod
    def for_blocks(cls, model: nn.Module, *, every: int = 1, **kwargs: Any) -> Distillation:
        """Distillation that matches the output of every ``every``-th repeated block of
        ``model`` (a transformer's layers: the residual stream, whose width head and MLP
        pruning keep) and of its last block with the same block of the teacher, besides the
        logits: intermediate-feature distillation as Minitron recovers pruned LLMs with.

        Args:
            model: the student (or the teacher: the paths are the same).
            every: match every this-many blocks.
            kwargs: ``temperature``, ``alpha``, ``feature_weight``, ``feature_loss``
                (default ``"relative"`` here), ``output_loss``.

        Raises:
            ValueError: the model has no repeated blocks (name the layers with ``features=``).
        """
        check_int("Distillation.for_blocks", "every", every, low=1)
        stack = layer_stack(model)
        if stack is None:
            raise ValueError(
                f"Distillation.for_blocks: {type(model).__name__} has no list of repeated blocks; "
                f"give the layers to match as Distillation(features={{student: teacher}})."
            )
        path, blocks = stack
        picked = sorted({*range(0, len(blocks), every), len(blocks) - 1})
        kwargs.setdefault("feature_loss", "relative")
        return cls(features={f"{path}.{i}": f"{path}.{i}" for i in picked}, **kwargs)


@dataclass(frozen=True)
class Regularization:
    """Penalties added to the loss.

    Attributes:
        l1: L1 on weights (tensors of two or more dims).
        l2: L2 on weights.
        group_lasso: sum over the channel groups that ``Prune`` would remove of the L2 norm of
            each channel's coupled weights (sparsity training before pruning; needs the
            dependency graph, built from the first batch).
        bn_l1: L1 on BatchNorm scales (network slimming).
    """

    l1: float = 0.0
    l2: float = 0.0
    group_lasso: float = 0.0
    bn_l1: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "group_lasso", "bn_l1"):
            check_fraction(
                "Regularization",
                name,
                getattr(self, name),
                high=1e6,
                hint="Penalties are weights >= 0 (a negative one rewards large weights).",
            )


@dataclass(frozen=True)
class TrainOptions:
    """Less common training settings.

    Attributes:
        precision: ``"fp32"`` or ``"bf16"`` (autocast on the device the model is on).
        accumulate: micro-batches per optimizer step.
        clip_grad_norm: clip the gradient norm to this (``None``: no clipping).
        eval_every: evaluate every this many optimizer steps (and at the end).
        patience: stop after this many evaluations without improvement (``None``: never).
        checkpoint_every: checkpoint every this many optimizer steps (with ``checkpoint_dir``).
        verbose: progress bar; ``None`` shows it only on a terminal.
        diverge: stop a run whose loss diverges: checked every 10 optimizer steps from step
            20, when the mean loss of the last 10 steps is above ``diverge`` times the mean of
            the first 10, ``fit`` puts back the weights the model had before it and raises a
            ``ValueError`` (a loss that is not finite stops it at once, as before). It keeps a
            CPU copy of the model's state for that; ``None`` turns the check and the copy off
            (a loss meant to rise, or a model whose copy does not fit). A run whose first
            losses are not positive is not checked.
        strategy: ``"ddp"`` or ``"fsdp"`` under ``torchrun``. Each process trains on one of
            each group of ``WORLD_SIZE`` consecutive batches (a last, smaller group is
            skipped), so one step sees the global batch; from a ``DataLoader`` over a
            map-style dataset each process loads only its own batches (other iterables are
            read whole by every process), and a loader whose sampler is a
            ``DistributedSampler`` is taken as this process's share, every batch trained on.
            With ``"fsdp"`` a copy of the model is sharded (parameters, gradients and
            optimizer state across the processes) and trained; afterwards its full weights are
            copied into the model you passed, on every process (FSDP2 shards a module in place
            and has no way back, so the model you hold is never sharded; on an accelerator it
            waits on the CPU meanwhile).
            Checkpoints hold full weights and optimizer state either way (gathered to process
            0, which writes them; every process reads them on resume, so ``checkpoint_dir``
            must be a directory all processes see).
    """

    precision: str = "fp32"
    accumulate: int = 1
    clip_grad_norm: float | None = None
    eval_every: int | None = None
    patience: int | None = None
    checkpoint_every: int = 100
    verbose: bool | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    diverge: float | None = 10.0

    def __post_init__(self) -> None:
        check_choice("TrainOptions", "precision", self.precision, ("fp32", "bf16"))
        check_choice("TrainOptions", "strategy", self.strategy, ("ddp", "fsdp"))
        check_int("TrainOptions", "accumulate", self.accumulate, low=1)
        check_int("TrainOptions", "checkpoint_every", self.checkpoint_every, low=1)
        if self.clip_grad_norm is not None:
            check_fraction(
                "TrainOptions",
                "clip_grad_norm",
                self.clip_grad_norm,
                high=float("inf"),
                low_inclusive=False,
                hint="It is the largest gradient norm kept; None turns clipping off.",
            )
        if self.eval_every is not None:
            check_int("TrainOptions", "eval_every", self.eval_every, low=1)
        if self.patience is not None:
            check_int("TrainOptions", "patience", self.patience, low=0)
        if self.verbose is not None:
            check_type("TrainOptions", "verbose", self.verbose, bool)
        if self.diverge is not None:
            check_fraction(
                "TrainOptions",
                "diverge",
                self.diverge,
                low=1.0,
                high=float("inf"),
                low_inclusive=False,
                hint="It is how many times its first losses the loss may grow to; None turns "
                "the check off.",
            )


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        steps: optimizer steps taken (including before a resume).
        history: ``{"step", "loss"}`` per step and ``{"step", "metric"}`` per evaluation.
        best_metric: the best evaluation (``None`` without ``evaluate``).
        stopped_early: whether early stopping ended training (the best weights were restored).
        notes: what the run did that the caller should know (a corrupt checkpoint passed over
            on resume).
    """

    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]


@dataclass
class TrainState:
    """Where a training run is: what a checkpoint holds beside the weights, the optimizer and
    the scheduler, and what a resumed run starts from.

    Attributes:
        step: optimizer steps taken.
        epoch: the epoch the run is in.
        position: batches of the epoch's sequence read so far (under torchrun: of the
            global sequence, every process's batches counted).
        history: ``{"step", "loss"}`` per step and ``{"step", "metric"}`` per evaluation.
        best_metric: the best evaluation so far.
        epoch_rng: every RNG state at the start of the epoch (it replays the data order).
        rng: every RNG state at ``position`` (CPU and, where used, CUDA generators).
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    epoch_rng: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The state as plain values and tensors (what ``torch.load(weights_only=True)``
        reads back)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "history": [dict(h) for h in self.history],
            "best_metric": self.best_metric,
            "epoch_rng": self.epoch_rng,
            "rng": self.rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the state :meth:`state_dict` gave (extra keys, such as a checkpoint's
        optimizer state, are ignored)."""
        self.step = int(state["step"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.best_metric = state.get("best_metric")
        self.epoch_rng, self.rng = state.get("epoch_rng"), state.get("rng")


class _RankBatches(Sampler[list[int]]):
    """A loader's batch sampler, keeping one process's share: of each group of ``world``
    consecutive batches (after the first ``skip``), the ``rank``-th; a last, partial group is
    dropped. Only index lists pass through it, so the other processes' batches (and skipped
    ones, on resume) are never loaded. ``read`` counts the index lists it read.

    The skip runs when :meth:`start` is called or the first batch is asked for, whichever
    comes first: the loader's own iterator draws from the RNG when it is created, the sampler
    when its first index is read, and resuming must draw in the order of the run it resumes
    (which read the skipped batches)."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world
        self.skip = self.read = 0
        self._it: Iterator[list[int]] | None = None
        self._pending = 0

    def __iter__(self) -> Iterator[list[int]]:
        self._it, self._pending, self.read = iter(self.batches), self.skip, 0
        return self._mine(self._it)

    def start(self) -> None:
        """Skip the batches before the position now."""
        while self._pending and self._it is not None:
            self._pending -= 1
            if next(self._it, None) is None:
                self._pending = 0
                break
            self.read += 1

    def _mine(self, it: Iterator[list[int]]) -> Iterator[list[int]]:
        self.start()
        group: list[list[int]] = []
        for b in it:
            self.read += 1
            group.append(b)
            if len(group) == self.world:
                yield group[self.rank]
                group = []

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0) // self.world


class _Epoch:
    """The batches one process trains on in one epoch; ``consumed``: batches of the epoch's
    sequence read up to the last one handed out (every process's counted); ``read``: whether
    the data yielded any batch (``source.read`` counts what was read)."""

    def __init__(self, it: Iterator[Any], skip: int, group: int, source: Any) -> None:
        self._it, self.consumed, self._group, self._source = it, skip, group, source

    def __iter__(self) -> Iterator[Any]:
        for batch in self._it:
            self.consumed += self._group
            yield batch

    @property
    def read(self) -> bool:
        return self._source.read > 0


class _Batches:
    """Where each process's batches come from.

    Under torchrun the batches of ``data`` come in groups of one per process, counted from
    where the epoch (or the resumed run) starts; a process trains on its batch of each group,
    so every process steps together, checkpoints the same position and skips a last, partial
    group. A ``DataLoader`` over a map-style dataset gives each process only its own batches
    (:class:`_RankBatches`: the others are never loaded, and on resume the batches before the
    position are skipped by index, not loaded); other iterables are read whole by every
    process. A loader whose sampler is a ``DistributedSampler`` is already this process's
    share: every batch of it is trained on, and its epoch is set each epoch."""

    def __init__(self, data: Iterable[Any], dist: _Distributed) -> None:
        self.data, self.rank, self.world = data, dist.rank, dist.world
        self.sharded = isinstance(getattr(data, "sampler", None), DistributedSampler)
        self.share: _RankBatches | None = None
        self.loader: Any = None
        self.read = 0
        if type(data) is DataLoader and not self.sharded and data.batch_sampler is not None:
            if not isinstance(data.dataset, IterableDataset):
                self.share = _RankBatches(data.batch_sampler, self.rank, self.world)
                self.loader = _with_batch_sampler(data, self.share)

    def epoch(self, epoch: int, skip: int) -> _Epoch:
        """This process's batches of ``epoch``, after the first ``skip`` of the sequence."""
        if self.share is not None:
            self.share.skip = skip
            it = iter(self.loader)
            self.share.start()
            return _Epoch(it, skip, self.world, self.share)
        if self.sharded:
            self.data.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        self.read = 0
        it = iter(self.data)
        for _ in range(skip):
            if next(it, None) is not None:
                self.read += 1
        group = 1 if self.sharded else self.world
        return _Epoch(self._mine(it, group), skip, group, self)

    def _mine(self, it: Iterator[Any], world: int) -> Iterator[Any]:
        group: list[Any] = []
        for batch in it:
            self.read += 1
            group.append(batch)
            if len(group) == world:
                yield group[self.rank if world > 1 else 0]
                group = []


def _with_batch_sampler(data: DataLoader, batch_sampler: Sampler[list[int]]) -> DataLoader:
    """``data`` with another batch sampler, its other settings kept."""
    kw: dict[str, Any] = dict(
        batch_sampler=batch_sampler,
        num_workers=data.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=data.pin_memory,
        timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
        multiprocessing_context=data.multiprocessing_context,
        generator=data.generator,
        persistent_workers=data.persistent_workers,
        pin_memory_device=data.pin_memory_device,
    )
    if data.num_workers > 0:
        kw["prefetch_factor"] = data.prefetch_factor
    if hasattr(data, "in_order"):
        kw["in_order"] = data.in_order
    return DataLoader(data.dataset, **kw)


def _readable_checkpoint(
    directory: Any, model: nn.Module, result: TrainResult
) -> tuple[Path | None, Any, Any]:
    """The newest checkpoint that reads back whole, with its weights and state; one that is
    truncated or fails its checksum is passed over with a note (and a warning)."""
    corrupt = []
    for ckpt in checkpoints_newest_first(directory):
        try:
            weights, state = read_checkpoint(ckpt, model)
        except CorruptCheckpoint as e:
            corrupt.append(str(e))
            continue
        for why in corrupt:
            note = f"resume: {why}; resumed from {ckpt.name} instead"
            result.notes.append(note)
            warnings.warn(note, stacklevel=3)
        return ckpt, weights, state
    if corrupt:
        raise ValueError(
            "resume: no checkpoint in the directory reads back whole: " + "; ".join(corrupt)
        )
    return None, None, None


def _split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: ``(x, y)`` pairs, dicts (targets under ``labels``), or
    inputs alone."""
    if isinstance(batch, dict):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _token_mask(inputs: Any, model: nn.Module) -> torch.Tensor | None:
    """The real tokens of a batch whose inputs carry an ``attention_mask`` with padding
    (:meth:`~nnslim.base.inputs.Inputs.token_mask`), else ``None``."""
    if not isinstance(inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return None
    return Inputs(kwargs=dict(inputs)).token_mask(model)


def _device_type(model: nn.Module) -> str:
    """Where the model computes (its first parameter's device type; ``"cpu"`` without any):
    what ``torch.autocast`` needs."""
    p = next(iter(model.parameters()), None)
    return p.device.type if p is not None else "cpu"


def _call(model: nn.Module, inputs: Any) -> Any:
    inp = as_inputs(inputs)
    if inp is None:
        raise ValueError("a batch holds no inputs")
    return inp.call(model)


class Trainer:
    """Fine-tune any ``nn.Module``, optionally distilling from the uncompressed model.

    Args:
        loss: ``"cross_entropy"``, ``"mse"``, a callable ``(outputs, targets) -> loss``, or
            ``None``: cross-entropy for integer targets, MSE for float ones, and a Hugging Face
            output's own ``.loss`` for dict batches with ``labels``.
        optimizer: an optimizer class (default ``torch.optim.SGD``) or a callable
            ``params -> optimizer``.
        lr: learning rate (for an optimizer class).
        scheduler: a callable ``optimizer -> LR scheduler``, stepped every optimizer step.
        teacher: the model to distil from (kept in eval mode, never updated).
        distillation: how to distil (see :class:`Distillation`).
        regularization: penalties (see :class:`Regularization`).
        evaluate: ``model -> float`` (higher is better) for evaluation and early stopping.
        options: see :class:`TrainOptions`.

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Linear(4, 2)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
        >>> result = nnslim.Trainer(lr=0.1, options=nnslim.TrainOptions(verbose=False)).fit(model, data)
        >>> result.steps
        4
    """

    def __init__(
        self,
        loss: str | Callable[..., torch.Tensor] | None = None,
        optimizer: Any = torch.optim.SGD,
        lr: float = 0.01,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        teacher: nn.Module | None = None,
        distillation: Distillation | None = None,
        regularization: Regularization | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        options: TrainOptions | None = None,
    ) -> None:
        if isinstance(loss, str):
            check_choice("Trainer", "loss", loss, ("cross_entropy", "mse"))
        elif loss is not None and not callable(loss):
            raise TypeError(
                f"Trainer(loss=...): expected a name or a callable, got {type(loss).__name__}."
            )
        check_fraction("Trainer", "lr", lr, low=0.0, high=1e3, low_inclusive=False)
        if not callable(optimizer):
            raise TypeError(
                f"Trainer(optimizer=...): expected an optimizer class such as torch.optim.AdamW "
                f"or a callable params -> optimizer, got {type(optimizer).__name__} "
                f"({optimizer!r:.40})."
            )
        for name, value, kind in (
            ("distillation", distillation, Distillation),
            ("regularization", regularization, Regularization),
            ("options", options, TrainOptions),
        ):
            if value is not None:
                check_type("Trainer", name, value, kind, hint=f"Write {name}={kind.__name__}(...).")
        if teacher is not None:
            check_type("Trainer", "teacher", teacher, nn.Module)
        for name, fn in (("scheduler", scheduler), ("evaluate", evaluate)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"Trainer({name}=...): expected a callable, got {type(fn).__name__}."
                )
        self.loss = loss
        self.optimizer = optimizer
        self.lr = lr
        self.scheduler = scheduler
        self.teacher = teacher
        self.distillation = distillation or Distillation()
        self.regularization = regularization or Regularization()
        self.evaluate = evaluate
        self.options = options or TrainOptions()

    # -- the loop -------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> TrainResult:
        """Train ``model`` in place on ``data`` (an iterable of batches, re-iterated per epoch).
        A model given in eval mode is trained in train mode; every module's train/eval flag
        comes back as it was given afterwards.

        With ``checkpoint_dir``, model, optimizer, scheduler, RNG states and position are saved
        atomically every ``options.checkpoint_every`` steps and at the end; ``resume=True``
        continues from the newest checkpoint and reaches the same weights as an uninterrupted
        run (same data order, same thread count).

        Raises:
            ValueError: an empty loader, a NaN/Inf loss (the model keeps its last good
                weights; the last good checkpoint stays on disk), a checkpoint that does not
                fit.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer.fit: expected an nn.Module, got {type(model).__name__}.")
        check_int("Trainer.fit", "epochs", epochs, low=1)
        o = self.options
        dist = _Distributed.setup(model, o.strategy)
        # the edit record (with the float dtype each quantized layer computes in) is taken
        # before FSDP swaps the module classes
        record = with_float_dtypes(_record_of(model), model) if checkpoint_dir is not None else None
        if record is not None and record.get("unsaveable"):
            raise ValueError(
                f"Trainer.fit: checkpoint_dir needs a model nnslim.save can write, and this one "
                f"cannot be: {record['unsaveable']}. Register the module classes with "
                f"nnslim.register_class, or train without checkpoint_dir."
            )
        # the weights to put back if the loss diverges (on the CPU: not the device's memory)
        before = (
            {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if o.diverge is not None
            else None
        )
        net = dist.wrap(model)
        trained = net if dist.sharded else model  # FSDP trains a sharded copy
        diverged = False
        try:
            return self._fit(
                trained,
                net,
                dist,
                data,
                epochs,
                max_steps,
                _Checkpoints(checkpoint_dir, record),
                resume,
            )
        except _Diverged:
            diverged = True
            raise
        finally:
            dist.unwrap(model, net)
            if diverged and before is not None:
                model.load_state_dict(before)
            if dist.sharded:
                # FSDP's copy lives in reference cycles (module <-> hooks <-> state) holding
                # its shards and the group's work handles: free them now, not at the next
                # collection (or at exit, where destroying them aborts the process)
                net = trained = None
                gc.collect()

    def _fit(
        self,
        model: nn.Module,
        net: nn.Module,
        dist: _Distributed,
        data: Iterable[Any],
        epochs: int,
        max_steps: int | None,
        ckpts: _Checkpoints,
        resume: bool,
    ) -> TrainResult:
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Trainer.fit: the model has no trainable parameters.")
        opt = (
            self.optimizer(params, lr=self.lr)
            if isinstance(self.optimizer, type)
            else self.optimizer(params)
        )
        sched = self.scheduler(opt) if self.scheduler is not None else None
        result = TrainResult()
        state = TrainState()
        group_lasso = _GroupLasso(model, self.regularization.group_lasso)
        if self.regularization.group_lasso:
            it = iter(data)
            first = next(it, None)
            if first is None:
                raise ValueError("Trainer.fit: the data yielded no batch; pass a non-empty loader.")
            group_lasso.setup(_split(first)[0])
            if it is data:  # a one-shot iterator: put the batch back, it is trained on too
                data = itertools.chain([first], it)
        if resume:
            resume = self._resume(ckpts.directory, model, opt, sched, dist, state, result)
        features = _FeatureTaps(
            model, self.teacher, self.distillation.features, self.distillation.feature_loss
        )
        if self.teacher is not None:
            self.teacher.eval()
        bar = _progress(self.options.verbose, max_steps, dist.rank)
        evaluation = _Evaluation(self, model, state) if self.evaluate is not None else None
        saving = _Saving(ckpts, dist, model, opt, sched) if ckpts.directory is not None else None
        batches = _Batches(data, dist)
        divergence = _Divergence(self.options.diverge, state.history)
        # where a checkpoint written at the end resumes: after the last epoch, or (stopped by
        # max_steps) at the batch after the last step, with the RNG state of that moment
        end: tuple[int, int, Any, Any] | None = None
        # the model comes back in the modes it was given in (an evaluation or a transform
        # after fit() sees the model as it handed it over)
        modes = contextlib.ExitStack()
        modes.enter_context(preserve_modes(model))
        if not model.training:  # a model in train mode keeps its modules' modes (a BatchNorm
            net.train()  # frozen with .eval() for fine-tuning stays frozen)
        # a resumed run that already made max_steps has nothing to train (and keeps its
        # checkpoint as it is)
        finished = max_steps is not None and state.step >= max_steps
        done = False
        try:
            for epoch in range(state.epoch, epochs if not finished else state.epoch):
                resuming = resume and epoch == state.epoch
                if resuming and state.epoch_rng is not None:
                    set_rng_state(state.epoch_rng)
                epoch_rng = rng_state()
                skip = state.position if resuming and state.rng is not None else 0
                mine = batches.epoch(epoch, skip)
                if resuming and state.rng is not None:
                    set_rng_state(state.rng)
                micro = 0
                for batch in mine:
                    loss = self._loss(net, model, batch, features, group_lasso)
                    if not torch.isfinite(loss):
                        raise ValueError(
                            f"Trainer: the loss is {loss.item()} at step {state.step + 1}; "
                            f"stopped before updating the weights{_where_ckpt(ckpts.directory)}. "
                            f"Lower the learning rate or check the data."
                        )
                    (loss / self.options.accumulate).backward()
                    micro += 1
                    if micro % self.options.accumulate:
                        continue
                    self._step(model, params, opt, sched, dist, loss, state, ckpts.directory)
                    divergence.check(state.history[-1]["loss"], dist, ckpts.directory)
                    post = {"loss": f"{float(loss.detach()):.4g}"}
                    if evaluation is not None and evaluation.due(state.step):
                        done = evaluation.run(result)
                        post["metric"] = f"{state.history[-1]['metric']:.4g}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                    state.epoch, state.position = epoch, mine.consumed
                    if saving is not None and state.step % self.options.checkpoint_every == 0:
                        saving.save(state, epoch_rng)
                    if done or (max_steps is not None and state.step >= max_steps):
                        if not result.stopped_early:
                            end = (epoch, mine.consumed, epoch_rng, rng_state())
                        done = True
                        break
                if not mine.read:
                    raise ValueError(
                        "Trainer.fit: the data yielded no batch; pass a non-empty loader."
                    )
                resume = False
                if done:
                    break
            if evaluation is not None and not result.stopped_early:
                evaluation.run(result)
            if result.stopped_early and evaluation is not None:
                evaluation.restore_best()
            if saving is not None and not finished:
                state.epoch, state.position, e_rng, rng = end or (
                    epochs,
                    0,
                    rng_state(),
                    rng_state(),
                )
                saving.save(state, e_rng, rng)
        finally:
            modes.close()
            features.close()
            bar.close()
            dist.barrier()
        result.steps, result.history, result.best_metric = (
            state.step,
            state.history,
            state.best_metric,
        )
        return result

    def _resume(
        self,
        directory: str | os.PathLike[str] | None,
        model: nn.Module,
        opt: Any,
        sched: Any,
        dist: _Distributed,
        state: TrainState,
        result: TrainResult,
    ) -> bool:
        """Load the newest readable checkpoint into the model, optimizer, scheduler and
        ``state``; ``False`` if there is none yet (a fresh start)."""
        if directory is None:
            raise ValueError("Trainer.fit(resume=True) needs checkpoint_dir=.")
        ckpt, weights, saved = _readable_checkpoint(directory, model, result)
        if ckpt is None:
            return False
        _check_same_setup(saved, opt, sched, ckpt)
        if sched is not None and saved.get("scheduler") is not None:
            sched.load_state_dict(saved["scheduler"])
        dist.load(model, opt, weights, saved["optimizer"])
        state.load_state_dict(saved)
        return True

    def _step(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        opt: torch.optim.Optimizer,
        sched: Any,
        dist: _Distributed,
        loss: torch.Tensor,
        state: TrainState,
        directory: Any,
    ) -> None:
        """One optimizer step on the accumulated gradients (refused if any is not finite on
        any process), then the scheduler, the sparsity masks and the bookkeeping."""
        if not dist.all_true(_grads_finite(params)):
            message = (
                f"Trainer: a gradient is NaN or Inf at step {state.step + 1} "
                f"({_nonfinite_grads(model)}) although the loss ({float(loss.detach()):.4g}) is "
                f"finite; stopped before updating the weights{_where_ckpt(directory)}. Look for "
                f"operations with infinite derivatives (sqrt or log at 0, division by a zero "
                f"norm), or lower the learning rate."
            )
            opt.zero_grad(set_to_none=True)
            raise ValueError(message)
        if self.options.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.options.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        apply_masks(model)
        state.step += 1
        state.history.append({"step": state.step, "loss": float(loss.detach())})

    # -- pieces ---------------------------------------------------------------------------------
    def _loss(
        self,
        net: nn.Module,
        model: nn.Module,
        batch: Any,
        features: _FeatureTaps,
        lasso: _GroupLasso,
    ) -> torch.Tensor:
        inputs, targets = _split(batch)
        o = self.options
        with torch.autocast(_device_type(net), dtype=torch.bfloat16, enabled=o.precision == "bf16"):
            outputs = _call(net, inputs)
            main = first_tensor(outputs)
            d = self.distillation
            task = self._task_loss(outputs, main, targets)
            total = (
                task
                if task is not None
                else torch.zeros((), device=main.device if main is not None else "cpu")
            )
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = first_tensor(_call(self.teacher, inputs))
                kind = d.output_loss
                if kind == "auto":
                    kind = "relative" if is_hidden_state(outputs) else "kl"
                real = _token_mask(inputs, model)  # padded positions are matched nowhere
                kd = self._kd(main, t_out, kind, real) + d.feature_weight * features.loss(real)
                total = kd if task is None else (1 - d.alpha) * task + d.alpha * kd
            elif task is None:
                raise ValueError(
                    "Trainer: the batch has no targets and there is no teacher; give (inputs, "
                    "targets) batches or a teacher to distil from."
                )
        total = total.float() + self._penalty(model) + lasso.penalty()
        return total

    def _task_loss(
        self, outputs: Any, main: torch.Tensor | None, targets: Any
    ) -> torch.Tensor | None:
        if callable(self.loss) and not isinstance(self.loss, str):
            return self.loss(outputs, targets) if targets is not None else None
        hf_loss = getattr(outputs, "loss", None)
        if self.loss is None and isinstance(hf_loss, torch.Tensor):
            return hf_loss
        if targets is None or main is None:
            return None
        kind = self.loss or ("cross_entropy" if not targets.is_floating_point() else "mse")
        if kind == "cross_entropy":
            return F.cross_entropy(main.reshape(-1, main.shape[-1]).float(), targets.reshape(-1))
        return F.mse_loss(main.float(), targets.float())

    def _kd(
        self,
        student: torch.Tensor | None,
        teacher: torch.Tensor | None,
        kind: str,
        real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if student is None or teacher is None:
            return torch.zeros(())
        if student.shape != teacher.shape:
            raise ValueError(
                f"Distillation: the student's output has shape {tuple(student.shape)} but the "
                f"teacher's has {tuple(teacher.shape)}; distil into a model whose output keeps "
                f"the teacher's shape (prune inside it, not its output width)."
            )
        if kind == "mean_cosine":
            s, tt = _mean_pooled(student, real), _mean_pooled(teacher, real)
            if not len(s):  # every sequence padding alone
                return torch.zeros((), device=student.device)
            return (1 - F.cosine_similarity(s, tt, dim=-1)).mean()
        student, teacher = real_tokens(student, real), real_tokens(teacher, real)
        s = student.reshape(-1, student.shape[-1]).float()
        tt = teacher.reshape(-1, teacher.shape[-1]).float()
        if kind == "kl":
            t = self.distillation.temperature
            return (
                F.kl_div(F.log_softmax(s / t, -1), F.softmax(tt / t, -1), reduction="batchmean")
                * t
                * t
            )
        if kind == "cosine":
            return (1 - F.cosine_similarity(s, tt, dim=-1)).mean()
        return _squared_error(s, tt, relative=kind == "relative")

    def _penalty(self, model: nn.Module) -> torch.Tensor:
        r = self.regularization
        total = torch.zeros(())
        if r.l1 or r.l2:
            # weight matrices, and a packed sparse layer's kept weights (1-D ``values``)
            packed = {
                id(m.values)
                for m in model.modules()
                if getattr(type(m), "nnslim_packed_sparse", False)
            }
            for p in model.parameters():
                if p.requires_grad and (p.dim() >= 2 or id(p) in packed):
                    if r.l1:
                        total = total + r.l1 * p.abs().sum()
                    if r.l2:
                        total = total + r.l2 * p.pow(2).sum()
        if r.bn_l1:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    total = total + r.bn_l1 * m.weight.abs().sum()
        return total


def _mean_pooled(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Each sequence's mean over its real tokens, ``(batch, features)``: ``x`` a
    ``(batch, tokens, features)`` output (a 2-D one is returned as it is, pooled already; one
    whose leading dims are not the mask's is averaged over all its positions). A sequence
    with no real token is left out."""
    if x.dim() == 2:
        return x.float()
    if x.dim() != 3:
        raise ValueError(
            f"Distillation(output_loss='mean_cosine'): the output has shape {tuple(x.shape)}; "
            f"it pools a (batch, tokens, features) output over its tokens. Use 'cosine' or "
            f"'relative' for other outputs."
        )
    if not per_token(x, real):
        return x.float().mean(1)
    keep = real.any(1).to(x.device)  # a sequence of padding alone has no embedding
    w = real.to(device=x.device, dtype=torch.float32)[keep][..., None]
    return (x.float()[keep] * w).sum(1) / w.sum(1)


def _squared_error(s: torch.Tensor, t: torch.Tensor, *, relative: bool) -> torch.Tensor:
    """The mean squared error of ``s`` against the teacher's ``t``; ``relative``: over ``t``'s
    mean square (scale-free)."""
    err = F.mse_loss(s, t)
    return err / (t.pow(2).mean() + 1e-12) if relative else err


def _check_same_setup(state: dict[str, Any], opt: Any, sched: Any, path: Any) -> None:
    """Refuse a checkpoint written with another optimizer or scheduler (before loading)."""
    saved = (state.get("optimizer_class"), state.get("scheduler_class", "?"))
    now = (type(opt).__name__, type(sched).__name__ if sched is not None else None)
    if saved[0] is None:  # written by an older nnslim: nothing recorded to compare
        return
    if saved != now:
        raise ValueError(
            f"Trainer.fit(resume=True): the checkpoint at {path} was written with optimizer "
            f"{saved[0]} and scheduler {saved[1]}, this run has {now[0]} and {now[1]}; use the "
            f"optimizer and scheduler of the interrupted run."
        )


@dataclass
class _Checkpoints:
    """Where checkpoints go, and the model's edit record to write with them."""

    directory: str | os.PathLike[str] | None
    record: dict[str, Any] | None


class _Evaluation:
    """Evaluation every ``eval_every`` steps and at the end, keeping the best weights; early
    stopping after ``patience`` evaluations without improvement."""

    def __init__(self, trainer: Trainer, model: nn.Module, state: TrainState) -> None:
        self.evaluate = trainer.evaluate
        self.every, self.patience = trainer.options.eval_every, trainer.options.patience
        self.model, self.state = model, state
        self.best: dict[str, torch.Tensor] | None = None
        self.bad = 0

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0  # type: ignore[operator]

    def run(self, result: TrainResult) -> bool:
        """Evaluate; ``True`` when training should stop (``result.stopped_early``)."""
        with preserve_modes(self.model), torch.no_grad():
            self.model.eval()
            metric = float(self.evaluate(self.model))  # type: ignore[misc]
        state = self.state
        state.history.append({"step": state.step, "metric": metric})
        if state.best_metric is None or metric > state.best_metric:
            state.best_metric = metric
            self.best, self.bad = copy.deepcopy(self.model.state_dict()), 0
            return False
        self.bad += 1
        if self.patience is not None and self.bad >= self.patience:
            result.stopped_early = True
            return True
        return False

    def restore_best(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best)


@dataclass
class _Saving:
    """Checkpoints of the model, optimizer, scheduler and :class:`TrainState`."""

    ckpts: _Checkpoints
    dist: _Distributed
    model: nn.Module
    opt: Any
    sched: Any

    def save(self, state: TrainState, epoch_rng: Any, rng: Any = None) -> None:
        """Gather full weights and optimizer state (every process calls), write on process 0."""
        dist, opt, sched = self.dist, self.opt, self.sched
        weights, optimizer = dist.full_state(self.model, opt)
        error: Exception | None = None
        if dist.rank == 0:
            try:
                saved = state.state_dict()
                saved.update(
                    epoch_rng=epoch_rng,
                    rng=rng_state() if rng is None else rng,
                    optimizer=optimizer,
                    optimizer_class=type(opt).__name__,
                    scheduler=sched.state_dict() if sched is not None else None,
                    scheduler_class=type(sched).__name__ if sched is not None else None,
                )
                save_checkpoint(
                    self.ckpts.directory,
                    state.step,
                    self.model,
                    saved,
                    weights=weights,
                    record=self.ckpts.record,
                )
            except Exception as e:  # the other processes must hear of it, not wait for rank 0
                error = e
        if not dist.all_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError(
                "Trainer: writing the checkpoint failed on process 0 (its error says why); "
                "stopped here too."
            )


class _FeatureTaps:
    """Forward hooks capturing matched student/teacher features."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        pairs: dict[str, str],
        kind: str = "mse",
    ) -> None:
        self.kind = kind
        self.handles: list[Any] = []
        self.s: dict[str, torch.Tensor] = {}
        self.t: dict[str, torch.Tensor] = {}
        self.pairs = dict(pairs)
        if not pairs:
            return
        if teacher is None:
            raise ValueError("Distillation(features=...) needs a teacher.")
        for sp, tpath in pairs.items():
            for model, store, path in ((student, self.s, sp), (teacher, self.t, tpath)):
                try:
                    mod = model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"Distillation(features=...): no module {path!r}.") from None

                def hook(
                    _m: nn.Module, _a: Any, out: Any, store: dict = store, key: str = sp
                ) -> None:
                    store[key] = first_tensor(out)

                self.handles.append(mod.register_forward_hook(hook))

    def loss(self, real: torch.Tensor | None = None) -> torch.Tensor:
        """The matched pairs' loss; ``real``: the batch's real tokens (per-token features are
        compared there only)."""
        total = torch.zeros(())
        for key in self.pairs:
            s, t = self.s.get(key), self.t.get(key)
            if s is None or t is None:
                who = (
                    f"the student's {key!r}" if s is None else f"the teacher's {self.pairs[key]!r}"
                )
                raise ValueError(
                    f"Distillation(features=...): {who} did not run in this forward (or "
                    f"returned no tensor); match modules that both models run on every batch."
                )
            if s.shape != t.shape:
                raise ValueError(
                    f"Distillation(features=...): {key!r} has shape {tuple(s.shape)} but the "
                    f"teacher's {self.pairs[key]!r} has {tuple(t.shape)}; match layers whose width "
                    f"pruning kept (block outputs in the residual stream)."
                )
            s, t = real_tokens(s, real), real_tokens(t, real)
            err = _squared_error(s.float(), t.detach().float(), relative=self.kind == "relative")
            total = total + (err / len(self.pairs) if self.kind == "relative" else err)
        # this step's features only: none is reused by a later step, and none is held
        self.s.clear()
        self.t.clear()
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _GroupLasso:
    """Group lasso over the channel groups of the dependency graph (built lazily)."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.model = model
        self.weight = weight
        self.groups: list[list[tuple[torch.Tensor, int]]] | None = None
        self.example: Any = None

    def setup(self, example: Any) -> None:
        from ..graph.trace import trace

        g = trace(self.model, example)
        named = dict(self.model.named_modules())
        self.groups = []
        for info in g.groups(ignored=g.output_layers()):
            parts = []
            for path, kind in info.members:
                m = named.get(path)
                if getattr(type(m), "nnslim_packed_sparse", False):
                    continue  # its weight is rebuilt per call: no tensor to hold on to
                w = getattr(m, "weight", None)
                if not isinstance(w, torch.Tensor) or w.dim() < 1 or kind not in ("out", "in"):
                    continue
                dim = 0 if kind == "out" or w.dim() == 1 else 1
                if is_hf_conv1d(m) and w.dim() == 2:
                    dim = 1 - dim
                parts.append((w, dim))
            if parts:
                self.groups.append(parts)

    def penalty(self) -> torch.Tensor:
        if not self.weight:
            return torch.zeros(())
        if self.groups is None:
            raise ValueError(
                "Regularization(group_lasso=...) is set up by Trainer.fit; this is a bug"
            )
        total = torch.zeros(())
        for parts in self.groups:
            n = min(w.shape[d] for w, d in parts)
            sq = torch.zeros(n, device=parts[0][0].device)
            for w, d in parts:
                sq = sq + w.transpose(0, d).reshape(w.shape[d], -1)[:n].pow(2).sum(1)
            total = total + sq.clamp_min(1e-12).sqrt().sum()
        return self.weight * total


def _progress(verbose: bool | None, total: int | None, rank: int) -> Any:
    """A tqdm bar on process 0 (by default only on a terminal); disabled, it does nothing."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if verbose is None else verbose
    return tqdm(total=total, desc="fine-tune", unit="step", disable=not show or rank != 0)


class _Distributed:
    """torch.distributed under torchrun: process group, DDP/FSDP wrapping, batch sharding."""

    def __init__(self, rank: int, world: int, enabled: bool, strategy: str) -> None:
        self.rank, self.world, self.enabled, self.strategy = rank, world, enabled, strategy
        self.device: torch.device | None = None  # where the caller's model was (FSDP)

    @classmethod
    def setup(cls, model: nn.Module, strategy: str) -> _Distributed:
        rank, world = rank_world()
        return cls(rank, world, world > 1, strategy)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # fully_shard changes the module in place, for good: the caller's model is left
            # plain (off the accelerator meanwhile) and gets the trained weights in unwrap
            copy = copy_model(model)
            self.device = next((t.device for t in model.state_dict().values()), None)
            if self.device is not None and self.device.type != "cpu":
                model.to("cpu")
            fully_shard(copy)
            return copy
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    def full_state(
        self, model: nn.Module, opt: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """Full weights and optimizer state (keyed by parameter name) on process 0.

        Under FSDP every process must call this (the shards are gathered); the other processes
        get ``(None, None)``.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.sharded:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=options)
            optimizer = get_optimizer_state_dict(model, opt, options=options)
            return (weights, optimizer) if self.rank == 0 else (None, None)
        if self.rank != 0:
            return None, None
        options = StateDictOptions(full_state_dict=True)
        return model.state_dict(), get_optimizer_state_dict(model, opt, options=options)

    def load(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        weights: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
    ) -> None:
        """Load full weights and optimizer state (every process calls; FSDP shards them)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        by_position = any(
            isinstance(p, int) for g in optimizer.get("param_groups", []) for p in g["params"]
        )
        if not by_position:
            # torch's full-state path finds the device from the optimizer's own tensors and
            # fails on optimizers that hold none (plain SGD: "Expected device to be set"); with
            # no tensor state there is nothing to distribute, only the groups' settings
            stateful = any(
                isinstance(t, torch.Tensor) and t.dim() > 0
                for per_param in optimizer.get("state", {}).values()
                for t in per_param.values()
            )
            try:
                set_optimizer_state_dict(
                    model, opt, optimizer, options=options if stateful else StateDictOptions()
                )
            except (KeyError, ValueError, RuntimeError) as e:
                raise ValueError(
                    f"Trainer.fit(resume=True): the checkpoint's optimizer state does not fit "
                    f"this {type(opt).__name__} ({type(e).__name__}: {e}); use the optimizer and "
                    f"scheduler of the interrupted run."
                ) from e
        elif not self.sharded:  # an older checkpoint: optimizer state keyed by position
            opt.load_state_dict(optimizer)
        else:
            raise ValueError(
                "Trainer.fit(resume=True): this checkpoint keys the optimizer state by position "
                "(written by an older nnslim) and cannot be sharded by FSDP; resume it with "
                "strategy='ddp' or on one process."
            )
        # weights last: an optimizer state that does not fit leaves the model untouched
        if self.sharded:
            set_model_state_dict(model, weights, options=options)
        else:
            model.load_state_dict(weights, strict=True)

    def unwrap(self, model: nn.Module, net: nn.Module) -> None:
        """After FSDP: the sharded copy's full weights into the caller's ``model`` (tied
        parameters stay tied), on every process, on the device it came from."""
        if not self.sharded:
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
        missing = [n for n, _ in model.named_parameters() if n not in full]
        if missing:  # never left half-trained without saying so
            raise RuntimeError(
                f"Trainer.fit: FSDP's full state dict lacks the parameters {missing[:5]}; the "
                f"model keeps its weights from before fit. Train it with strategy='ddp'."
            )
        if self.device is not None and self.device.type != "cpu":
            model.to(self.device)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in full:
                    t.copy_(full[name])

    def all_ok(self, ok: bool) -> bool:
        """Process 0's ``ok``, on every process (a collective under torchrun)."""
        if not self.enabled:
            return ok
        import torch.distributed as dist

        flag = [ok]
        dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one all-reduce under torchrun)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only (each process on its own device, set at start)
        cuda = dist.get_backend() == "nccl"
        t = torch.tensor([1 if flag else 0], device="cuda" if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _where_ckpt(checkpoint_dir: Any) -> str:
    return f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir else ""


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this process (FSDP), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient on this process is finite (one reduction: the largest magnitude,
    which cannot overflow and which a NaN propagates to)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


def _nonfinite_grads(model: nn.Module) -> str:
    """The parameters with a NaN/Inf gradient on this process, for the error."""
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
    ]
    if not bad:
        return "on another process"
    return "in " + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


class _Diverged(ValueError):
    """The loss diverged (see ``TrainOptions.diverge``)."""


class _Divergence:
    """The loss of the first ``WINDOW`` steps against the last ``WINDOW``'s."""

    WINDOW = 10

    def __init__(self, factor: float | None, history: list[dict[str, float]]) -> None:
        self.factor = factor
        self.first: list[float] = []
        self.last: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.steps = 0
        for h in history:  # a resumed run: the losses before it
            if "loss" in h:
                self._add(h["loss"])

    def _add(self, loss: float) -> None:
        if len(self.first) < self.WINDOW:
            self.first.append(loss)
        self.last.append(loss)
        self.steps += 1

    def check(self, loss: float, dist: Any, directory: Any) -> None:
        self._add(loss)
        w = self.WINDOW
        if self.factor is None or self.steps < 2 * w or self.steps % w:
            return
        a, b = sum(self.first) / w, sum(self.last) / w
        ok = not (a > 0 and b > self.factor * a)
        if dist.all_true(ok):
            return
        raise _Diverged(
            f"Trainer: the loss diverged: its mean over steps {self.steps - w + 1}-{self.steps} "
            f"is {b:.4g}, {b / a:.3g}x its mean over the first {w} steps ({a:.4g}) (on "
            f"this process or another); stopped, and the model's weights from before fit() "
            f"were put back"
            + (
                f" (checkpoints this run wrote, the last ones after the rise, are in {directory})"
                if directory
                else ""
            )
            + ". Lower the learning rate or clip the "
            "gradients (TrainOptions(clip_grad_norm=...)); TrainOptions(diverge=None) turns "
            "this check off."
        )
