"""OWL: outlier-weighted per-block sparsity, for Wanda and SparseGPT."""

import copy

import pytest
import torch
from torch import nn

import nnslim
from nnslim.transforms.allocation import OWL, owl_ratios


def _layers(n_blocks=4, outlier_block=2):
    torch.manual_seed(0)
    layers, norms, blocks = {}, {}, {}
    for b in range(n_blocks):
        for name in ("a", "b"):
            p = f"{b}.{name}"
            layers[p] = nn.Linear(32, 32)
            n = torch.ones(32)
            if b == outlier_block:
                n[:3] = 50.0  # a few input channels far larger: outliers of |w| * ||x||
            elif b == 0:
                n[:1] = 20.0
            norms[p], blocks[p] = n, str(b)
    return layers, norms, blocks


def test_blocks_with_more_outliers_are_pruned_less_and_the_mean_is_the_target():
    layers, norms, blocks = _layers()
    ratios, outliers = owl_ratios(layers, norms, blocks, 0.6, OWL())
    per_block = {blocks[p]: r for p, r in ratios.items()}
    assert outliers["2"] > outliers["0"] > outliers["1"] == outliers["3"]
    assert per_block["2"] < per_block["0"] < per_block["1"] == per_block["3"]
    assert sum(per_block.values()) / 4 == pytest.approx(0.6)
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(2 * 0.08)
    # a wider spread, a wider range; equal outlier ratios: uniform
    wide, _ = owl_ratios(layers, norms, blocks, 0.6, OWL(spread=0.2))
    assert max(wide.values()) - min(wide.values()) == pytest.approx(0.4)
    flat = {p: torch.ones(32) for p in layers}
    same, _ = owl_ratios(layers, flat, blocks, 0.6, OWL())
    assert all(v == pytest.approx(0.6) for v in same.values())


@pytest.mark.parametrize("importance", ["wanda", "sparsegpt"])
def test_prune_with_owl_on_a_llama(importance):
    transformers = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=4)).eval()
    ids = [{"input_ids": torch.randint(0, 300, (2, 32))} for _ in range(4)]
    t = nnslim.Prune(
        structure="unstructured",
        ratio=0.5,
        importance=importance,
        allocation="owl",
        select="re:model\\.layers\\..*",
    )
    report = t.apply(model, calibration=ids)
    per_block: dict[str, list[float]] = {}
    for c in report.changes:
        block = ".".join(c.path.split(".")[:3])
        per_block.setdefault(block, []).append(c.details["sparsity"])
    assert len(per_block) == 4
    means = [sum(v) / len(v) for v in per_block.values()]
    assert max(means) - min(means) > 0.05  # not uniform
    assert sum(means) / 4 == pytest.approx(0.5, abs=0.01)
    assert any(n.startswith("OWL: 4 blocks pruned") for n in report.notes)


def test_owl_settings_round_trip_and_bad_requests():
    t = nnslim.Prune(
        structure="unstructured", ratio=0.5, importance="wanda", allocation=OWL(threshold=7.0)
    )
    back = nnslim.Transform.from_json(t.to_json())
    assert back == t and back.allocation.threshold == 7.0
    with pytest.raises(ValueError, match="structure='unstructured' and ratio="):
        nnslim.Prune(structure="2:4", allocation="owl")
    with pytest.raises(ValueError, match="structure='unstructured' and ratio="):
        nnslim.Prune(ratio=0.3, allocation="owl")
    with pytest.raises(ValueError, match="allocation"):
        nnslim.Prune(structure="unstructured", ratio=0.3, allocation="outliers")
    with pytest.raises(ValueError, match="spread"):
        OWL(spread=0.7)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration"):
        nnslim.Prune(structure="unstructured", ratio=0.5, allocation="owl").apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
