import os

import pytest
import torch
from hypothesis import settings

from tests.zoo import TinyCNN, TinyMLP

settings.register_profile("nnslim", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nnslim"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP().eval()


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()
