import pytest
import torch

from nnslim.base.inputs import Inputs, as_inputs, calibration_batches, first_tensor, run_model
from tests.zoo import TinyMLP


def test_forms():
    x = torch.randn(2, 3)
    assert as_inputs(x).args == (x,)
    assert as_inputs((x, x)).args == (x, x)
    assert as_inputs({"input_ids": x}).kwargs == {"input_ids": x}
    assert as_inputs(None) is None


def test_calibration_cuts_labels_off_for_single_input_models():
    m = TinyMLP()
    batches = calibration_batches(m, [(torch.randn(2, 16), torch.tensor([0, 1]))])
    assert len(batches[0].args) == 1


def test_device_mismatch_is_clear():
    m = TinyMLP().to("meta")
    # meta models accept any device; a CPU model with meta inputs is a mismatch
    with pytest.raises(ValueError, match="are on meta but TinyMLP is on cpu"):
        run_model(TinyMLP(), Inputs((torch.randn(2, 16, device="meta"),)))
    del m


def test_first_tensor_of_structures():
    t = torch.ones(1)
    assert first_tensor({"a": None, "b": (t,)}) is t
    assert first_tensor([None, t]) is t
