"""Auto's channel search on CNNs whose channel groups share layers (issue 20): how many
coupled groups the search prices, how many are linked in chains, the smallest reachable MACs,
and whether the plan at a MACs budget costs what was predicted after applying it.

Models from torchvision with ``weights=None`` (structure only: the estimates are on random
weights and random calibration images, so this measures what the search can reach, not
accuracy): ResNet-50 (bottlenecks: a 3x3 convolution between two pruned 1x1 groups),
VGG-11 with BatchNorm (a plain chain), MobileNetV2 (inverted residuals). Candidates
``channels-0.25`` and ``channels-0.5``, budget ``{"macs": 0.6}`` (or the smallest reachable,
if higher). Run it on another checkout (``PYTHONPATH=<checkout>``) to compare versions; a
version without chains reports none.

    python benchmarks/auto_chains.py            # writes benchmarks/results/auto_chains.json
    PYTHONPATH=<older checkout> python benchmarks/auto_chains.py --json auto_chains-before
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time
from pathlib import Path

import torch
import torchvision
from _common import print_table, write_json

import nnslim

MODELS = {
    "resnet50": torchvision.models.resnet50,
    "vgg11_bn": torchvision.models.vgg11_bn,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
}
CANDIDATES = ("channels-0.25", "channels-0.5")


def run(name: str, size: int, budget: float) -> dict:
    torch.manual_seed(0)
    model = MODELS[name](weights=None).eval()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(4, 3, size, size, generator=g), torch.randint(0, 1000, (4,), generator=g))
        for _ in range(2)
    ]
    x = data[0][0]
    auto = nnslim.Auto(target={"macs": budget}, candidates=CANDIDATES)
    t = time.perf_counter()
    table = auto.table(model, data, x)
    seconds = time.perf_counter() - t
    chains = table.chains() if hasattr(table, "chains") else [[r] for r in table.groups]
    smallest = table.smallest()
    fraction = max(budget, smallest * 1.0001)
    plan = table.allocate(fraction)
    pruned = copy.deepcopy(model)
    try:
        nnslim.Auto(plan=plan, candidates=CANDIDATES).apply(pruned, x, calibration=data)
        before = nnslim.profile(model, x, memory=False).macs
        measured: float | str = nnslim.profile(pruned, x, memory=False).macs / before
    except (ValueError, RuntimeError) as e:  # an older version's failure, recorded
        measured = f"failed: {str(e)[:120]}"
    left = sum(1 for why in table.unavailable.values() if any("shares" in w for w in why.values()))
    return {
        "model": name,
        "groups": len(table.groups),
        "in_chains": sum(len(c) for c in chains if len(c) > 1),
        "longest_chain": max((len(c) for c in chains), default=0),
        "left_sharing": left,
        "smallest": smallest,
        "budget": fraction,
        "predicted": table.cost_of(plan) / table.total,
        "measured": measured,
        "groups_pruned": sum(1 for v in plan.values() if v.startswith("channels")),
        "table_s": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=64, help="calibration image side")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--json", default="auto_chains", help="results/<name>.json")
    args = ap.parse_args()
    rows = [run(m, args.size, args.budget) for m in args.models.split(",")]
    headers = [
        "model",
        "groups searched",
        "in chains",
        "longest chain",
        "left (sharing)",
        "smallest MACs",
        "budget",
        "predicted",
        "measured",
        "groups pruned",
        "table s",
    ]
    print_table(
        headers,
        [
            [
                r["model"],
                r["groups"],
                r["in_chains"],
                r["longest_chain"],
                r["left_sharing"],
                f"{r['smallest']:.3f}",
                f"{r['budget']:.3f}",
                f"{r['predicted']:.4f}",
                r["measured"] if isinstance(r["measured"], str) else f"{r['measured']:.4f}",
                r["groups_pruned"],
                f"{r['table_s']:.0f}",
            ]
            for r in rows
        ],
        title="Auto channel search (MACs budget, random weights)",
    )
    root = Path(nnslim.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    write_json(args.json, {"nnslim_commit": commit, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
