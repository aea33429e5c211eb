"""Table 1: a ResNet-style CNN on Fashion-MNIST, compressed, against torch-pruning used directly.

The CNN is trained once (3 epochs, cached in ``benchmarks/.cache``), then each row compresses a
copy: Prune to 50% MACs (+1 epoch of fine-tuning with distillation), Quantize int8, ShareWeights
16 clusters (+1 epoch fine-tuning the centroids), Factorize to 60% of the parameters (+1 epoch),
Prune + Quantize, and the peer: torch-pruning's MetaPruner with the same importance (group L2
magnitude), pruned to the same MACs, with the same fine-tune. Columns: test accuracy (10,000
images), MACs, bytes on disk (``nnslim.save``), CPU latency (batch 64, one thread, median) as a
ratio to the baseline in the same run.

    python benchmarks/real_fashion.py           # full data
    python benchmarks/real_fashion.py --quick   # 6,000 training images, 1,000 test images
    python benchmarks/real_fashion.py --recover 4   # issue 19's recovery recipe, 4 epochs each

With ``--recover E`` the table is the recovery recipe's instead (issue 19), every row given the
same E epochs of fine-tuning with distillation from the baseline: Prune to 50% MACs by the CNN
recipe of docs/training.rst (one epoch of group-lasso sparsity training, then ``compress`` in
E - 1 steps, one distilled epoch after each); the peer, torch-pruning's MetaPruner with the same
importance, given the same recipe (the same sparsity-trained start, the same steps, the same
epoch after each, bisected to the same MACs); Factorize to 60% of the parameters in E steps with
an epoch after each; and the baseline fine-tuned E epochs uncompressed (what the budget alone
gives).

The trained baseline is cached in ``benchmarks/.cache`` (``NNSLIM_BENCH_CACHE`` overrides).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import real_data as rd
import torch
import torch.nn.functional as F
from _common import print_table, write_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nnslim
from nnslim.base.inputs import Inputs
from nnslim.profiling import measure_latency

CACHE = Path(os.environ.get("NNSLIM_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class FashionNet(nn.Module):
    """A small ResNet for 1x28x28 images."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            correct += int((model(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum())
    return correct / len(x)


def trainer(
    loader: DataLoader, epochs: int, lr: float, teacher: nn.Module | None = None, **kwargs: Any
) -> nnslim.Trainer:
    """The benchmark's fine-tune: AdamW, a cosine schedule over ``epochs`` of ``loader``,
    distillation at T=4, alpha 0.7 from ``teacher``; ``kwargs`` to the Trainer."""
    return nnslim.Trainer(
        optimizer=torch.optim.AdamW,
        lr=lr,
        teacher=teacher,
        distillation=nnslim.Distillation(temperature=4.0, alpha=0.7),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs * len(loader)),
        options=nnslim.TrainOptions(verbose=False),
        **kwargs,
    )


def fit(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, teacher: nn.Module | None = None
) -> None:
    trainer(loader, epochs, lr, teacher).fit(model, loader, epochs=epochs)
    model.eval()


def baseline(data, quick: bool) -> FashionNet:
    xtr, ytr = data[0], data[1]
    path = CACHE / ("fashion_net-quick.safetensors" if quick else "fashion_net.safetensors")
    model = FashionNet()
    if path.exists():
        return nnslim.load(path, model).eval()
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True)
    t0 = time.perf_counter()
    fit(model, loader, epochs=3, lr=3e-3)
    print(f"trained the baseline in {time.perf_counter() - t0:.0f} s", flush=True)
    CACHE.mkdir(exist_ok=True)
    nnslim.save(model, path)
    return model


def tp_pruner(m: nn.Module, x: torch.Tensor, ratio: float, steps: int = 1) -> Any:
    """torch-pruning's MetaPruner on ``m``, group L2 magnitude, the classifier kept."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[m.fc],
    )


def tp_ratio(model: nn.Module, x: torch.Tensor, target_macs: float, iterations: int) -> float:
    """The MetaPruner ratio, bisected one-shot, whose model has at most ``target_macs`` of
    ``model``'s MACs (the last ratio tried if none does)."""
    base = nnslim.profile(model, x, memory=False).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        tp_pruner(m, x, mid).step()
        if nnslim.profile(m, x, memory=False).macs <= target_macs * base:
            best, hi = mid, mid
        else:
            lo = mid
    return best if best is not None else mid


def peer_torch_pruning(model: nn.Module, x: torch.Tensor, target_macs: float) -> nn.Module:
    """torch-pruning's MetaPruner, group L2 magnitude, bisected to the same MACs."""
    m = copy.deepcopy(model)
    tp_pruner(m, x, tp_ratio(model, x, target_macs, 10)).step()
    return m


#: group-lasso weight of the sparsity-training epoch (the penalty sums each channel group's L2
#: norm over the groups Prune would remove)
LASSO = 5e-4


def peer_iterative(
    model: nn.Module, x: torch.Tensor, target_macs: float, steps: int, tune
) -> nn.Module:
    """torch-pruning's MetaPruner in ``steps`` steps to ``target_macs`` (its final ratio bisected
    one-shot, which prunes the same channel counts), ``tune(model)`` after each step."""
    m = copy.deepcopy(model)
    p = tp_pruner(m, x, tp_ratio(model, x, target_macs, 12), steps)
    for _ in range(steps):
        p.step()
        tune(m)
    return m


def recovery(args, base, train, example, row) -> None:
    """Issue 19's recovery rows: every compressed row gets ``args.recover`` distilled epochs."""
    epochs = args.recover
    if epochs < 2:
        raise SystemExit("--recover needs at least 2 epochs (one of sparsity training, one step)")
    lr = 1e-3

    # the loop's evaluate is a readout on training images only: at this tolerance it decides
    # nothing (no step is undone), so the test images stay unseen
    xtr, ytr = train.dataset.tensors

    # for Prune(refit=True): 4 x 64 training images (200,704 pixels, the rows of a 3x3
    # convolution's least squares)
    calibration = [xtr[i * 64 : (i + 1) * 64] for i in range(4)]

    def want(name: str) -> bool:
        return not args.only or any(t in name for t in args.only.split(","))

    def looped(transform, target, start, steps):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        result = nnslim.compress(
            start,
            transform,
            evaluate=lambda m: accuracy(m, xtr[-2000:], ytr[-2000:]),
            target=target,
            tolerance=1.0,
            example_inputs=example,
            trainer=trainer(train, 1, lr, base),
            train_data=train,
            steps=steps,
            calibration=calibration,
        )
        if not result.reached:
            print(f"  note: the loop stopped short of {target}", flush=True)
        return result.model.eval(), time.perf_counter() - t0

    def tune(m):
        torch.manual_seed(0)
        fit(m, train, 1, lr, teacher=base)

    row("baseline (fp32)", copy.deepcopy(base))
    # the CNN recipe: one distilled epoch of group-lasso sparsity training, then pruning in
    # epochs - 1 steps with a distilled epoch after each
    t0 = time.perf_counter()
    sparse = copy.deepcopy(base)
    torch.manual_seed(0)
    trainer(train, 1, lr, base, regularization=nnslim.Regularization(group_lasso=LASSO)).fit(
        sparse, train
    )
    sparse.eval()
    lasso_s = time.perf_counter() - t0
    row(f"after 1 epoch of group-lasso sparsity training ({LASSO:g})", copy.deepcopy(sparse))
    name = f"Prune 50% MACs, recipe ({epochs} epochs: lasso + {epochs - 1} steps)"
    pruned = None
    if want(name) or want("peer"):
        pruned, s = looped(nnslim.Prune(macs=0.5), {"macs": 0.5}, sparse, epochs - 1)
        row(name, pruned, s + lasso_s)
    # the same, each step's layers reading the pruned channels refit by least squares
    name = f"Prune 50% MACs + refit, recipe ({epochs} epochs: lasso + {epochs - 1} steps)"
    refit = None
    if want(name):
        refit, s = looped(nnslim.Prune(macs=0.5, refit=True), {"macs": 0.5}, sparse, epochs - 1)
        row(name, refit, s + lasso_s)
    # the peer bisected to the MACs of nnslim's best prune row that ran (the refit one)
    name = f"peer: torch-pruning MetaPruner, same recipe and MACs ({epochs} epochs)"
    if pruned is not None and want(name):
        t0 = time.perf_counter()
        macs = nnslim.profile(refit if refit is not None else pruned, example, memory=False).macs
        target = macs / nnslim.profile(base, example, memory=False).macs
        peer = peer_iterative(copy.deepcopy(sparse), example, target, epochs - 1, tune)
        row(name, peer, time.perf_counter() - t0 + lasso_s)
    name = f"Factorize 60% params, {epochs} steps with a distilled epoch each"
    if want(name):
        f, s = looped(nnslim.Factorize(params=0.6), {"params": 0.6}, copy.deepcopy(base), epochs)
        row(name, f, s)
    # the same, each step's convolutions (their Tucker chain's last factor) and the
    # classifier refit by least squares to the unfactorized model's outputs
    name = f"Factorize 60% params + refit, {epochs} steps with a distilled epoch each"
    if want(name):
        f, s = looped(
            nnslim.Factorize(params=0.6, refit=True), {"params": 0.6}, copy.deepcopy(base), epochs
        )
        row(name, f, s)
    name = f"reference: baseline + {epochs} distilled epochs, uncompressed"
    if want(name):
        ref = copy.deepcopy(base)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        fit(ref, train, epochs, lr=lr, teacher=base)
        row(name, ref, time.perf_counter() - t0)


def auto_rows(base, train, example, row, epochs: int, only: str = "") -> None:
    """Issue 20's rows: ``nnslim.Auto`` at 0.15x the weight bytes, at 0.4x the MACs and at
    0.85x the latency (channels and low rank) against uniform settings at the same budget,
    each given the same distilled fine-tune (``epochs``).
    Auto's calibration: 8 training batches of 128 with their labels (its loss estimate
    differentiates the cross-entropy on them)."""
    calib = [b for _, b in zip(range(8), train)]
    full = nnslim.profile(base, example, memory=False)

    def tuned(name, transform) -> None:
        if only and not any(w in name for w in only.split(",")):
            return
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        try:
            report = transform.apply(m, example, calibration=calib)
        except ValueError as e:  # a budget Auto cannot reach is a result too
            print(f"  {name}: {str(e).splitlines()[0]}", flush=True)
            return
        plan = next((n for n in report.notes if n.startswith("Auto:")), "")
        if plan:
            print(f"  {plan}", flush=True)
        torch.manual_seed(0)
        fit(m, train, epochs, lr=1e-3, teacher=base)
        p = nnslim.profile(m, example, memory=False)
        row(
            f"{name} ({p.param_bytes / full.param_bytes:.3f}x bytes, "
            f"{p.macs / full.macs:.2f}x MACs) + fine-tune",
            m,
            time.perf_counter() - t0,
        )

    row("baseline (fp32)", copy.deepcopy(base))
    cands = ("int8", "palette-16", "palette-8", "rank-0.5", "rank-0.25")
    tuned("uniform ShareWeights 16 clusters", nnslim.ShareWeights(clusters=16))
    tuned("uniform ShareWeights 8 clusters", nnslim.ShareWeights(clusters=8))
    tuned("Auto at 0.15x bytes", nnslim.Auto(target={"bytes": 0.15}, candidates=cands))
    tuned("uniform Prune to 0.4x MACs", nnslim.Prune(macs=0.4))
    tuned("Auto at 0.4x MACs", nnslim.Auto(target={"macs": 0.4}, candidates=cands))
    channels = (*cands, "channels-0.25", "channels-0.5")
    tuned(
        "Auto at 0.4x MACs with channel candidates",
        nnslim.Auto(target={"macs": 0.4}, candidates=channels),
    )
    # a latency budget (the eager forward on the 64 example images, one thread with
    # OMP_NUM_THREADS=1): channels and low rank are what make this CNN faster; the smallest
    # latency this search reaches is 0.80 (the residual stream's channels stay whole)
    tuned("uniform Prune to 0.6x MACs (latency comparison)", nnslim.Prune(macs=0.6))
    timed = ("rank-0.5", "rank-0.25", "channels-0.25", "channels-0.5")
    tuned(
        "Auto at 0.85x latency with channel candidates",
        nnslim.Auto(target={"latency": 0.85}, candidates=timed),
    )


def standard(row, tuned, base, example, train, tune_epochs, rows) -> None:
    """The one-epoch rows (the table of 2026-11-29)."""
    row("baseline (fp32)", copy.deepcopy(base))
    pruned = tuned("Prune 50% MACs + fine-tune (distilled)", nnslim.Prune(macs=0.5), True)
    tuned("Quantize int8", nnslim.Quantize(scheme="int8"), False)
    tuned("ShareWeights 16 clusters + centroid fine-tune", nnslim.ShareWeights(clusters=16), True)
    tuned("Factorize 60% params + fine-tune", nnslim.Factorize(params=0.6), True)
    both = copy.deepcopy(pruned)
    nnslim.Quantize(scheme="int8").apply(both, example)
    row("Prune 50% MACs + fine-tune, then int8", both)
    t0 = time.perf_counter()
    peer = peer_torch_pruning(
        copy.deepcopy(base), example, target_macs=rows[1]["macs"] / rows[0]["macs"]
    )
    torch.manual_seed(0)
    fit(peer, train, tune_epochs, lr=1e-3, teacher=base)
    row(
        "peer: torch-pruning MetaPruner (same importance, MACs, fine-tune)",
        peer,
        time.perf_counter() - t0,
    )
    # the compressed rows had one more epoch (distilled) than the baseline: this row shows what
    # that epoch alone gives, so "accuracy lost" can be read against it too
    ref = copy.deepcopy(base)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    fit(ref, train, tune_epochs, lr=1e-3, teacher=base)
    row("reference: baseline + the same fine-tune, uncompressed", ref, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recover", type=int, default=0, metavar="EPOCHS")
    parser.add_argument("--auto", action="store_true", help="issue 20's rows (nnslim.Auto)")
    parser.add_argument(
        "--only", default="", help="with --auto or --recover: rows whose name has one of these"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = rd.fashion_mnist()
    if data is None:
        print(f"skipped: {rd.MISSING}")
        sys.exit(0)
    xtr, ytr, xte, yte = data
    if args.quick:
        xtr, ytr, xte, yte = xtr[:6000], ytr[:6000], xte[:1000], yte[:1000]
    torch.manual_seed(0)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True)
    tune_epochs = 1
    base = baseline((xtr, ytr), args.quick)
    example = xte[:64]
    rows = []
    lat_inputs = Inputs((xte[:64],))

    def row(name: str, model: nn.Module, seconds: float = 0.0) -> None:
        model.eval()
        prof = nnslim.profile(model, example, memory=False)
        with tempfile.TemporaryDirectory() as d:
            nnslim.save(model, os.path.join(d, "m.safetensors"))
            size = os.path.getsize(os.path.join(d, "m.safetensors"))
        lat = measure_latency(
            model, lat_inputs, warmup=3, repeat=10 if args.quick else 30, threads=1
        ).median_ms
        rows.append(
            {
                "variant": name,
                "accuracy": accuracy(model, xte, yte),
                "macs": prof.macs,
                "bytes": size,
                "latency_ms": lat,
                "seconds": seconds,
            }
        )
        print(f"  {name}: {rows[-1]['accuracy']:.4f}", flush=True)

    def tuned(name, transform, finetune: bool, teacher: bool = True, calibration=None):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        transform.apply(m, example, calibration=calibration)
        if finetune:
            torch.manual_seed(0)
            fit(m, train, tune_epochs, lr=1e-3, teacher=base if teacher else None)
        row(name, m, time.perf_counter() - t0)
        return m

    if args.auto:
        auto_rows(base, train, example, row, tune_epochs, args.only)
    elif args.recover:
        recovery(args, base, train, example, row)
    else:
        standard(row, tuned, base, example, train, tune_epochs, rows)
    b = rows[0]
    print_table(
        ["variant", "accuracy", "MACs", "bytes on disk", "latency (bs64, 1 thread)"],
        [
            [
                r["variant"],
                f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - b['accuracy']):+.2f})",
                f"{r['macs'] / 1e6:.2f}M ({r['macs'] / b['macs']:.2f}x)",
                f"{r['bytes'] / 1024:.0f} kB ({r['bytes'] / b['bytes']:.2f}x)",
                f"{r['latency_ms']:.2f} ms ({r['latency_ms'] / b['latency_ms']:.2f}x)",
            ]
            for r in rows
        ],
        title=f"Fashion-MNIST ({len(xtr)} train / {len(xte)} test images)",
    )
    name = "real_fashion" + ("-quick" if args.quick else "")
    name += f"-recover{args.recover}" if args.recover else ""
    name += "-auto" if args.auto else ""
    name += "-only-" + args.only.replace(",", "_").replace(" ", "_") if args.only else ""
    print(f"wrote {write_json(name, {'rows': rows, 'recovery_epochs': args.recover})}")


if __name__ == "__main__":
    main()
