"""The block runner's input capture, shared by calibration and streamed compression."""

import pytest
import torch
from torch import nn

from nnslim.base.inputs import as_inputs
from nnslim.core.calibrate import inputs_of


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * scale


def test_inputs_of_stops_the_forward_at_the_module_before_or_after_it_runs():
    block = Counting()
    after = nn.Linear(3, 3)
    seen = []
    after.register_forward_hook(lambda *a: seen.append(1))
    model = nn.Sequential(nn.Linear(3, 3), block, after)
    batches = [as_inputs(torch.randn(2, 3)) for _ in range(3)]
    got = inputs_of(model, block, batches)
    assert len(got) == 3 and block.calls == 0 and not seen  # stopped before the block
    with torch.no_grad():
        assert torch.equal(got[1][0][0], model[0](batches[1].args[0]))
    inputs_of(model, block, batches, run=True)
    assert block.calls == 3 and not seen  # the block ran, nothing after it


def test_a_batch_that_does_not_fit_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="calibration batch 1"):
        inputs_of(model, model[1], [as_inputs(torch.randn(2, 3)), as_inputs(torch.randn(2, 5))])
