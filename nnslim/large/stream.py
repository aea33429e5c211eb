"""``nnslim.compress_checkpoint``: compress a model larger than memory, one block at a time.

The model is built on the ``meta`` device from its config. The weights of the modules before
the first block (embeddings) are read from the safetensors shards; calibration batches run up
to the first block, and their inputs are kept. Then, block by block, the block's weights are
read from the shards, the transform is applied to the block with its cached inputs as
calibration, the block's (already compressed) outputs become the next block's inputs, the
compressed tensors are written to a new sharded checkpoint, and the block goes back to
``meta``. Memory held at any time: about one block plus the calibration activations.

The output directory (``config.json``, ``model-*.safetensors``, ``model.safetensors.index.json``
and ``nnslim.json``, the record of structural edits) is written under a temporary name and
renamed at the end, so no half-written output ever looks complete, and the source is only read.
``nnslim.load(output, base)`` rebuilds the compressed model (``base`` may live on ``meta``).

Under ``torchrun`` the calibration batches are split across processes; each block's
statistics are summed over all processes (``torch.distributed``, gloo on CPU) before the
transform runs, so every process computes the same compressed block, and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.atomic import commit_dir, temp_dir_beside
from ..base.blocks import layer_stack
from ..base.distributed import rank_world
from ..base.inputs import Inputs, as_inputs
from ..base.modules import shared_parameters
from ..base.snapshot import no_rollback, preserved_state
from ..core.calibrate import (
    batch_tokens,
    block_outputs,
    calibration_loss,
    call_batch,
    collect_backward,
    inputs_of,
    reduce_across_processes,
)
from ..core.report import Report
from ..core.transform import Context, Transform
from ..io.save import recompute_buffers
from ..record.edits import RECORD_ATTR, describe, fingerprint
from ..transforms.auto import Auto, AutoTable, is_channel_candidate, measure_table, plan_note
from ..transforms.importance import as_importance

__all__ = ["ShardedCheckpoint", "checkpoint_table", "compress_checkpoint"]

RECORD_FILE = "nnslim.json"
INDEX = "model.safetensors.index.json"


@dataclass
class ShardedCheckpoint:
    """A Hugging Face directory of safetensors shards, read tensor by tensor.

    Raises:
        FileNotFoundError: no such directory, or a shard listed in the index is missing.
    """

    directory: Path
    weight_map: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> ShardedCheckpoint:
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"compress_checkpoint: no checkpoint directory at {os.fspath(root)!r}."
            )
        index = root / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = root / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(
                    f"compress_checkpoint: {os.fspath(root)!r} has neither {INDEX} nor "
                    f"model.safetensors; save the model with save_pretrained(safe_serialization=True)."
                )
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        missing = sorted({f for f in weight_map.values() if not (root / f).exists()})
        if missing:
            raise FileNotFoundError(
                f"compress_checkpoint: shard(s) {missing} listed in {INDEX} are missing from "
                f"{os.fspath(root)!r}; the checkpoint is incomplete."
            )
        return cls(root, weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each shard opened once)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise KeyError(n)
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(self.directory / f), "pt") as h:
                for k in keys:
                    out[k] = h.get_tensor(k)
        return out


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of repeated blocks to stream (:func:`layer_stack`)."""
    found = layer_stack(model)
    if found is None:
        raise ValueError("compress_checkpoint: the model has no list of repeated blocks to stream.")
    return found


def _retie(groups: list[list[tuple[nn.Module, str, str]]], ckpt: ShardedCheckpoint) -> None:
    """Share tied parameters again, keeping the one the checkpoint holds."""
    for owners in groups:
        keep = next((o for o in owners if o[2] in ckpt.weight_map), owners[0])
        p = keep[0]._parameters[keep[1]]
        for m, n, _ in owners:
            m._parameters[n] = p


def _release_memory() -> None:
    """Give freed memory back to the system between blocks.

    glibc keeps freed blocks in its arenas; without trimming, the resident size grows by a
    fraction of a block with every block (fragmentation), even though nothing is kept.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory (MB); ``None`` where ``resource`` does not exist
    (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Writer:
    """Writes tensors into numbered shards under a temporary directory.

    A shard is written as soon as the pending tensors reach ``shard_bytes`` (``save_file``
    briefly holds a second copy of them), so the writer holds about that much at any time.
    """

    def __init__(self, tmp: Path, shard_bytes: int) -> None:
        self.tmp = tmp
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.pending[k] = v.detach().to("cpu").contiguous()
            self.size += v.numel() * v.element_size()
            if self.size >= self.shard_bytes:
                self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.tmp / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> dict[str, str]:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / name, self.tmp / final)
            weight_map.update({k: final for k in keys})
        return weight_map


def compress_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    transform: Transform,
    calibration: Iterable[Any],
    *,
    model_class: Any = None,
    shard_size_mb: int = 128,
    progress: bool | None = None,
) -> Report:
    """Compress a Hugging Face checkpoint block by block into a new sharded checkpoint.

    Args:
        source: a directory written by ``save_pretrained`` (config and safetensors shards).
            It is only read.
        output: the new directory (must not exist).
        transform: applied to each block with the block's calibration inputs (Quantize with
            RTN or GPTQ, Factorize, Prune with unstructured/N:M sparsity, ShareWeights...).
            With a refit (``Prune(refit=True)``, ``Factorize(refit=True)``) the blocks'
            inputs in the uncompressed model are carried beside the compressed ones (twice
            the calibration activations in memory), so that each layer is refit toward the
            uncompressed model's outputs as in memory.
        calibration: batches of model inputs (``{"input_ids": ...}`` dicts or tensors).
        model_class: the transformers class (default: ``AutoModelForCausalLM``).
        shard_size_mb: each block is written to a shard of its own as soon as it is done; the
            tensors outside the blocks go to shards of at most about this size (a larger
            tensor gets a shard of its own).
        progress: a progress bar per block with time left (default: on a terminal).

    Returns:
        A report with one step per block, and notes with the peak resident memory and the time
        per block.

    Raises:
        FileNotFoundError: missing checkpoint or shard. ValueError: a config that does not
        match the weights; an existing output directory. OSError: a failed write (the output
        is removed; the source is untouched).
    """
    src, out = Path(source), Path(output)
    for t in _leaves(transform):
        if getattr(t, "allocation", "uniform") != "uniform":
            raise ValueError(
                f"compress_checkpoint: {type(t).__name__}(allocation='owl') sets each block's "
                f"ratio from the outliers of every block, measured before any is pruned; a "
                f"checkpoint compressed block by block sees one at a time. Give per-layer "
                f"ratios (select={{name: ratio}}) or allocation='uniform'."
            )
    auto = _auto_of(transform)
    if out.exists():
        raise ValueError(
            f"compress_checkpoint: {os.fspath(out)!r} exists; choose a new output directory."
        )
    opened = _Opened.of(src, model_class, calibration)
    ckpt, config, model = opened.ckpt, opened.config, opened.model
    blocks_path, blocks, world, rank = opened.blocks_path, opened.blocks, opened.world, opened.rank
    base = fingerprint(describe(model))  # not the states: they would keep every module alive
    report = Report(f"compress_checkpoint[{type(transform).__name__}]", transform.to_dict())
    t_start = time.perf_counter()
    plans: list[Transform] = [transform] * len(blocks)
    if auto is not None:
        plan = auto.plan
        if plan is None:  # the search: every block measured first, then one global choice
            table = _measure_blocks(auto, opened, progress)
            plan = table.allocate(auto._target.fraction)
            report.note(plan_note(auto, table, plan))
        plans = _plans_per_block(auto, plan, blocks_path, len(blocks))
    tmp = temp_dir_beside(out)  # after removing what runs killed mid-write left (kill -9)
    writer = _Writer(tmp, shard_size_mb * 2**20)
    entries: list[dict[str, Any]] = []
    try:
        cached = opened.block_inputs()
        masks = opened.token_masks()
        # a refit fits toward the uncompressed model's outputs: the blocks' inputs as the
        # uncompressed blocks compute them are carried beside the compressed stream's
        ref: list[Any] | None = list(cached) if _refits(transform) else None
        bar = _progress_bar(progress, rank, len(blocks))
        per_block = []
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            path = f"{blocks_path}.{i}"
            step, done, cached, ref = _compress_block(
                plans[i], block, path, cached, masks, ckpt, world, ref
            )
            report.steps.append(step)
            entries += done
            if rank == 0:
                writer.add({f"{path}.{n}": t for n, t in block.state_dict().items()})
                writer.flush()  # a shard per block: nothing of it stays in memory
            block.to("meta")
            del step
            _release_memory()
            per_block.append(time.perf_counter() - t0)
            bar.update(1)
        bar.close()
        if rank == 0:
            aliases = _write_rest(model, blocks_path, opened.ties, ckpt, writer)
            record = {
                "format": 1,
                "base": base,
                "entries": entries,
                "unsaveable": "",
                "aliases": aliases,
            }
            _finish(tmp, out, writer, config, record)
        _barrier(world)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak = _peak_rss_mb()
    if peak is not None:
        report.note(f"peak resident memory {peak:.0f} MB")
    report.note(
        f"{len(blocks)} blocks in {time.perf_counter() - t_start:.1f} s, "
        f"{sum(per_block) / len(per_block):.2f} s per block"
    )
    return report


def checkpoint_table(
    source: str | os.PathLike[str],
    auto: Auto,
    calibration: Iterable[Any],
    *,
    model_class: Any = None,
    progress: bool | None = None,
) -> AutoTable:
    """:class:`~nnslim.Auto`'s table for a checkpoint larger than memory, measured block by
    block: every block's layers with their candidates, costs and estimated losses, one block
    in memory at a time. ``table.allocate(f)`` (or ``table.front()``) then gives plans for as
    many budgets as you like without reading the checkpoint again; pass one as
    ``Auto(plan=..., candidates=...)`` to :func:`compress_checkpoint`, which is what
    ``compress_checkpoint(source, output, Auto(target=...), calibration)`` does in one call.

    The estimates are the in-memory search's (K-FAC, the model's own calibration loss; tested
    equal): a forward pass over the blocks keeps each block's inputs (in a temporary directory,
    ``TMPDIR``: one block's calibration activations per block), the model's tail (final norm,
    head, loss) gives the loss's gradient at the last block's output, and a backward pass over
    the blocks in reverse runs each block again on its inputs, the gradient flowing back
    through it, gathering its layers' statistics. Each block is read twice (three times with
    :func:`compress_checkpoint`, which then applies the plan). Budgets in bytes only (MACs and
    latency need the whole model's forward); the layers outside the blocks (embeddings, LM
    head) stay as they are and count in the total.

    Raises:
        ValueError: a MACs or latency target; a checkpoint without a list of blocks; the
            errors of :func:`compress_checkpoint`.
    """
    check = _auto_of(auto)
    if check is None:
        raise ValueError(
            f"checkpoint_table: give an nnslim.Auto (its candidates, method and select), not "
            f"{type(auto).__name__}."
        )
    opened = _Opened.of(Path(source), model_class, calibration)
    return _measure_blocks(check, opened, progress)


def _auto_of(transform: Transform) -> Auto | None:
    """The Auto to stream, if ``transform`` is one (Auto inside a Compose is refused)."""
    if isinstance(transform, Auto):
        if transform.target is not None and transform._target.metric != "param_bytes":
            raise ValueError(
                "compress_checkpoint: a streamed Auto searches a bytes budget "
                "(target={'bytes': f}); MACs and latency need the whole model's forward, "
                "which a checkpoint larger than memory never runs."
            )
        for c in transform.candidates:
            t = transform._transform(c)
            if is_channel_candidate(t) and as_importance(t.importance).needs_grad:
                raise ValueError(
                    f"compress_checkpoint: the channel candidate {c!r} ranks channels by "
                    f"gradients of the model's loss, which a block alone does not have; give "
                    f"it an importance from the weights or activations (importance='wanda', "
                    f"'magnitude'), or prune in memory."
                )
        return transform
    if any(isinstance(t, Auto) for t in _leaves(transform)):
        raise ValueError(
            "compress_checkpoint: give Auto alone, not inside a Compose (its plan spans every "
            "block; put the other transforms in a pass of their own)."
        )
    return None


@dataclass
class _Opened:
    """A checkpoint opened for streaming: the meta skeleton, the layers outside the blocks
    materialized, and this process's calibration batches."""

    ckpt: ShardedCheckpoint
    config: Any
    model: nn.Module
    blocks_path: str
    blocks: nn.ModuleList
    ties: list[list[tuple[nn.Module, str, str]]]
    batches: list[Inputs]
    rank: int
    world: int
    _first: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None

    @classmethod
    def of(cls, src: Path, model_class: Any, calibration: Iterable[Any]) -> _Opened:
        ckpt = ShardedCheckpoint.open(src)
        config, model = _skeleton(src, model_class)
        blocks_path, blocks = _blocks(model)
        rank, world = rank_world(backend="gloo")
        mine = _batches_of_this_process(calibration, rank, world)
        ties = shared_parameters(model)  # on the fresh skeleton, before any materialization
        return cls(ckpt, config, model, blocks_path, blocks, ties, mine, rank, world)

    def materialize_outside(self) -> None:
        """Read everything outside the blocks from the checkpoint (ties kept)."""
        for p, m in _outside_blocks(self.model, self.blocks_path):
            _materialize_shallow(m, f"{p}." if p else "", self.ckpt)
        _retie(self.ties, self.ckpt)

    def block_inputs(self) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The calibration batches' inputs to block 0 (the float model's: computed once, then
        kept). Computing them materializes everything outside the blocks and runs the
        calibration up to block 0; the outside goes back to meta while the blocks stream (it
        is read again to be written, one module at a time)."""
        if self._first is None:
            self.materialize_outside()
            self._first = inputs_of(self.model, self.blocks[0], self.batches)
            self.model.to("meta")
        return self._first

    def token_masks(self) -> list[torch.Tensor | None]:
        """Each calibration batch's real tokens (a padded batch's ``attention_mask``), which
        the blocks' own inputs no longer carry as such."""
        return [b.token_mask(self.model) for b in self.batches]

    def materialize_block(self, i: int) -> nn.Module:
        block = self.blocks[i]
        _materialize_block(block, f"{self.blocks_path}.{i}", self.ckpt)
        return block

    def outside_bytes(self) -> float:
        """The weight bytes outside the blocks, a tied tensor once (from the meta skeleton:
        shapes and dtypes as the checkpoint will be materialized)."""
        seen: set[int] = set()
        total = 0
        for _, m in _outside_blocks(self.model, self.blocks_path):
            for t in m._parameters.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return float(total)


class _BlockAtItsPath(nn.Module):
    """One block under the module path it has in the model (so ``select``/``exclude`` and
    the table's paths are the model's)."""

    def __init__(self, path: str, block: nn.Module) -> None:
        super().__init__()
        head, _, last = path.rpartition(".")
        holder: nn.Module = self
        for part in head.split(".") if head else []:
            child = nn.Module()
            holder.add_module(part, child)
            holder = child
        holder.add_module(last, block)
        self._block = [block]  # not a submodule twice

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._block[0](*args, **kwargs)


def _measure_blocks(auto: Auto, opened: _Opened, progress: bool | None) -> AutoTable:
    """Auto's table, block by block: the statistics the in-memory search gathers in one
    forward and backward pass of the whole model, gathered in a forward pass over the blocks
    (each block's inputs kept on disk), the loss's gradient at the last block's output from
    the model's tail, and a backward pass over the blocks in reverse (each block run again on
    its inputs, the gradient flowing back through it); each block's candidates are measured
    on its statistics."""
    table = AutoTable("bytes", opened.outside_bytes(), {}, {})
    n = len(opened.blocks)
    bar = _progress_bar(progress, opened.rank, 2 * n)
    bar.set_description("measure blocks")
    probe = dataclasses.replace(auto, target={"bytes": 1.0}, plan=None)
    channels = any(is_channel_candidate(c) for c in auto.candidates)
    with tempfile.TemporaryDirectory(prefix="nnslim-auto-") as tmp:
        cached = opened.block_inputs()
        masks = opened.token_masks()  # each batch's real tokens (the blocks' inputs lost them)
        tuple_out = False
        for i in range(n):  # forward: each block's inputs kept
            block = opened.materialize_block(i)
            torch.save(cached, Path(tmp) / f"{i}.pt")
            with torch.no_grad():
                outs = [block(*a, **k) for a, k in cached]
            tuple_out = isinstance(outs[0], (tuple, list))
            cached = [((o[0] if tuple_out else o, *a[1:]), k) for o, (a, k) in zip(outs, cached)]
            del outs
            block.to("meta")
            _release_memory()
            bar.update(1)
        grads = _final_grads(opened, [a[0] for a, _ in cached], tuple_out)
        del cached
        for i in reversed(range(n)):  # backward: each block's statistics
            path = f"{opened.blocks_path}.{i}"
            block = opened.materialize_block(i)
            ins = torch.load(Path(tmp) / f"{i}.pt", weights_only=False)
            batches = [Inputs(a, k, tokens=t) for (a, k), t in zip(ins, masks, strict=True)]
            held = _BlockAtItsPath(path, block)
            ctx = Context(batches[0], batches)
            left = Report(transform="Auto")
            layers = probe._layers(held, ctx, left)
            with contextlib.ExitStack() as stack:
                if opened.world > 1:
                    stack.enter_context(reduce_across_processes())
                stats, grads = collect_backward(
                    block, ins, layers, grads, in_fisher=channels, masks=masks
                )
                if layers:
                    part = measure_table(probe, held, ctx, batches, layers, "param_bytes", stats)
                    table.total += part.total
                    table.options.update(part.options)
                    table.unavailable.update(part.unavailable)
                    table.groups.update(part.groups)
                else:
                    from ..profiling.profiler import profile

                    table.total += profile(held, batches[0], memory=False).param_bytes
            table.left.update({s.path: s.reason for s in left.skips})
            del held, ins, batches, stats
            block.to("meta")
            _release_memory()
            bar.update(1)
    bar.close()
    # the options in the blocks' order (the backward pass met them last to first)
    table.options = dict(
        sorted(table.options.items(), key=lambda kv: _in_block(kv[0], opened.blocks_path)[0])
    )
    table.groups = dict(
        sorted(table.groups.items(), key=lambda kv: _in_block(kv[0], opened.blocks_path)[0])
    )
    for p, m in _outside_blocks(opened.model, opened.blocks_path):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            table.left[p] = "outside the blocks: a streamed search changes the blocks' layers"
    if not table.options and not table.groups:
        raise ValueError(
            "checkpoint_table: no layer of the blocks to choose a setting for after select/exclude."
        )
    return table


def _in_block(path: str, blocks_path: str) -> tuple[int, str]:
    """``(block index, path inside the block)`` of a layer under ``blocks_path``, or
    ``(-1, path)`` outside the blocks."""
    head = path[len(blocks_path) + 1 :].split(".", 1) if path.startswith(blocks_path + ".") else []
    if len(head) == 2 and head[0].isdigit():
        return int(head[0]), head[1]
    return -1, path


def _outside_blocks(model: nn.Module, blocks_path: str) -> Iterable[tuple[str, nn.Module]]:
    """``(path, module)`` of every module outside the list of blocks (the root included)."""
    for p, m in model.named_modules():
        if p != blocks_path and not p.startswith(blocks_path + "."):
            yield p, m


def _materialize_block(block: nn.Module, path: str, ckpt: ShardedCheckpoint) -> None:
    """Read block ``path``'s tensors from the checkpoint (those still on meta)."""
    prefix = f"{path}."
    for sub_path, sub in block.named_modules():
        _materialize_shallow(sub, f"{prefix}{sub_path}." if sub_path else prefix, ckpt)


def _final_grads(
    opened: _Opened, finals: list[torch.Tensor], tuple_out: bool
) -> list[torch.Tensor]:
    """Per calibration batch, the gradient of the calibration loss (what :func:`collect`
    differentiates) at the last block's output: the model runs with every block passing its
    input through and the last returning the stored final hidden state, so only its tail
    (final norm, head, loss) computes."""
    opened.materialize_outside()
    blocks = opened.blocks
    saved = list(blocks)
    current: list[torch.Tensor] = []
    try:
        for i, b in enumerate(saved):
            blocks[i] = _PassThrough(b, current if i == len(saved) - 1 else None, tuple_out)
        grads = []
        with preserved_state(opened.model), torch.enable_grad():
            for i, batch in enumerate(opened.batches):
                h = finals[i].detach().requires_grad_(True)
                current[:] = [h]
                with batch_tokens(batch, opened.model):  # the loss over its real tokens
                    out = call_batch(opened.model, batch, i)
                    loss = calibration_loss(out, batch.targets, sample=i)
                (g,) = torch.autograd.grad(loss, [h])
                grads.append(g.detach())
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
        opened.model.to("meta")
    return grads


class _PassThrough(nn.Module):
    """A block that returns its input, or (the last) the hidden state it is given."""

    def __init__(self, block: nn.Module, given: list[torch.Tensor] | None, tuple_out: bool):
        super().__init__()
        for k, v in vars(block).items():  # plain attributes a model's forward reads
            if not k.startswith("_") and k != "training" and isinstance(v, (str, int, bool)):
                setattr(self, k, v)
        self._given, self._tuple = given, tuple_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = self._given[0] if self._given else x
        return (y,) if self._tuple else y


def _plans_per_block(auto: Auto, plan: dict[str, str], blocks_path: str, n: int) -> list[Any]:
    """Auto with each block's part of ``plan`` (paths relative to the block)."""
    parts: list[dict[str, str]] = [{} for _ in range(n)]
    outside = []
    for p, name in plan.items():
        i, inner = _in_block(p, blocks_path)
        if 0 <= i < n:
            parts[i][inner] = name
        else:
            outside.append(p)
    if outside:
        raise ValueError(
            f"compress_checkpoint: Auto(plan=...) names {sorted(outside)[:3]}, outside the "
            f"blocks ({blocks_path}.N); a streamed plan changes the blocks' layers only."
        )
    return [dataclasses.replace(auto, target=None, plan=part) for part in parts]


def _leaves(transform: Transform) -> list[Transform]:
    """``transform`` and, for a ``Compose``, the transforms inside it."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [t for s in inner for t in _leaves(s)]
    return [transform]


def _skeleton(src: Path, model_class: Any) -> tuple[Any, nn.Module]:
    """The checkpoint's config and its model on the meta device, in eval mode, no KV cache."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src))
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    build = getattr(model_class, "from_config", None) or model_class
    with torch.device("meta"):
        model = build(config)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return config, model


def _batches_of_this_process(calibration: Iterable[Any], rank: int, world: int) -> list[Inputs]:
    """This process's share of the calibration batches (every ``world``-th from ``rank``)."""
    batches = [as_inputs(b) for b in calibration]
    if not batches:
        raise ValueError("compress_checkpoint: calibration yielded no batch.")
    if len(batches) < world:
        raise ValueError(
            f"compress_checkpoint: {len(batches)} calibration batches for {world} processes; "
            f"give every process at least one batch (more batches, or fewer processes)."
        )
    return batches[rank::world]


def _progress_bar(progress: bool | None, rank: int, total: int) -> Any:
    """A tqdm bar on process 0 (by default only on a terminal); disabled, it does nothing."""
    import sys

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc="compress blocks", unit="block", disable=not show or rank != 0)


def _refits(transform: Transform) -> bool:
    """Whether any step of ``transform`` refits toward the uncompressed model's outputs."""
    return any(getattr(t, "refit", False) is True for t in _leaves(transform))


Cached = list[tuple[tuple[Any, ...], dict[str, Any]]]


def _compress_block(
    transform: Transform,
    block: nn.Module,
    path: str,
    cached: Cached,
    masks: list[torch.Tensor | None],
    ckpt: ShardedCheckpoint,
    world: int,
    ref: Cached | None = None,
) -> tuple[Report, list[dict[str, Any]], Cached, Cached | None]:
    """Load one block, transform it on its cached inputs (``masks``: each batch's real
    tokens): ``(its report, its edit record's entries with model-level paths, the inputs of
    the next block, and with ``ref`` (this block's inputs in the uncompressed model) the next
    block's there)``."""
    _materialize_block(block, path, ckpt)
    calib = [Inputs(a, k, tokens=t) for (a, k), t in zip(cached, masks, strict=True)]
    ref_after = None
    if ref is not None:  # before the transform changes the block
        calib = [
            dataclasses.replace(b, original=Inputs(a, k, tokens=b.tokens))
            for b, (a, k) in zip(calib, ref, strict=True)
        ]
        ref_after = block_outputs(block, ref)
    step = _apply_block(transform, block, calib, world)
    step.transform = f"{path}: {step.transform}"
    rec = block.__dict__.pop(RECORD_ATTR, None) or {"entries": []}
    if rec.get("unsaveable"):
        raise ValueError(
            f"compress_checkpoint: block {path} cannot be recorded: {rec['unsaveable']}"
        )
    entries = [
        {"transform": e["transform"], "ops": [_prefix_op(op, path) for op in e["ops"]]}
        for e in rec["entries"]
    ]
    return step, entries, block_outputs(block, cached), ref_after


def _finish(tmp: Path, out: Path, writer: _Writer, config: Any, record: dict[str, Any]) -> None:
    """Write the shard index, the config and the edit record, then move ``tmp`` to ``out``."""
    weight_map = writer.finish()
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(str(tmp))
    (tmp / RECORD_FILE).write_text(json.dumps(record))
    commit_dir(tmp, out)


def _write_rest(
    model: nn.Module,
    blocks_path: str,
    ties: list[list[tuple[nn.Module, str, str]]],
    ckpt: ShardedCheckpoint,
    writer: _Writer,
) -> dict[str, str]:
    """Write the tensors outside the blocks, one module at a time; returns the tied aliases."""
    aliases: dict[str, str] = {}
    for owners in ties:
        keep = next((o for o in owners if o[2] in ckpt.weight_map), owners[0])
        aliases.update({o[2]: keep[2] for o in owners if o[2] != keep[2]})
    for p, m in _outside_blocks(model, blocks_path):
        prefix = f"{p}." if p else ""
        own = [
            (n, t)
            for n, t in [*m._parameters.items(), *m._buffers.items()]
            if t is not None
            and n not in m._non_persistent_buffers_set
            and prefix + n not in aliases
        ]
        if not own:
            continue
        if all(prefix + n in ckpt.weight_map for n, _ in own):
            values = ckpt.read(prefix + n for n, _ in own)
            tensors = {prefix + n: values[prefix + n].to(t.dtype) for n, t in own}
        else:  # parameters the checkpoint lacks, buffers computed at construction
            _materialize_shallow(m, prefix, ckpt)
            tensors = {prefix + n: getattr(m, n) for n, _ in own}
        writer.add(tensors)
        del tensors
        for n, _ in own:  # back to meta: one module's tensors held at a time
            if n in m._parameters:
                m._parameters[n] = nn.Parameter(m._parameters[n].to("meta"), requires_grad=False)
            else:
                m._buffers[n] = m._buffers[n].to("meta")
    return aliases


def _materialize_shallow(m: nn.Module, prefix: str, ckpt: ShardedCheckpoint) -> None:
    """Materialize a module's own tensors (not its children's), if still on meta."""
    own = list(m._parameters.items()) + list(m._buffers.items())
    if not own or all(t is None or t.device.type != "meta" for _, t in own):
        return
    names = {n: f"{prefix}{n}" for n, t in own if t is not None}
    present = {n: k for n, k in names.items() if k in ckpt.weight_map}
    values = ckpt.read(present.values())
    for n, t in own:
        if t is None:
            continue
        if n in present:
            v = values[present[n]]
            if v.shape != t.shape:
                raise ValueError(
                    f"compress_checkpoint: the checkpoint does not match the config ({prefix}{n}: "
                    f"checkpoint {tuple(v.shape)}, model {tuple(t.shape)}); use the config saved "
                    f"with the weights."
                )
            new = v.to(t.dtype)
        else:
            new = torch.zeros(t.shape, dtype=t.dtype)
        if n in m._parameters:
            m._parameters[n] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            m._buffers[n] = new
    absent = [n for n in names if n not in present and n in m._buffers]
    if absent:
        recompute_buffers(m, absent)


def _apply_block(transform: Transform, block: nn.Module, calib: list[Inputs], world: int) -> Report:
    # no rollback: a failure discards the whole output, so each replaced layer's original
    # weights are freed as soon as its replacement is in place
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_rollback())
        if world > 1:
            stack.enter_context(reduce_across_processes())
        return transform.apply(block, calib[0], calibration=calib)


def _prefix_op(op: dict[str, Any], prefix: str) -> dict[str, Any]:
    op = dict(op)
    op["path"] = f"{prefix}.{op['path']}" if op["path"] else prefix
    if "target" in op:
        op["target"] = f"{prefix}.{op['target']}"
    if "spec" in op:
        op["spec"] = _prefix_spec(op["spec"], prefix)
    if "tensors" in op:
        op["tensors"] = {k: _prefix_tie(v, prefix) for k, v in op["tensors"].items()}
    return op


def _prefix_tie(spec: Any, prefix: str) -> Any:
    if isinstance(spec, dict) and "tie" in spec:
        return {**spec, "tie": f"{prefix}.{spec['tie']}"}
    return spec


def _prefix_spec(spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    spec = dict(spec)
    for key in ("ref", "alias"):
        if key in spec:
            spec[key] = f"{prefix}.{spec[key]}" if spec[key] else prefix
    if "children" in spec:
        spec["children"] = {
            n: (None if c is None else _prefix_spec(c, prefix)) for n, c in spec["children"].items()
        }
    if "tensors" in spec:
        spec["tensors"] = {k: _prefix_tie(v, prefix) for k, v in spec["tensors"].items()}
    return spec


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
