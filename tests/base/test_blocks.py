"""Repeated blocks (``nnslim.base.blocks``): one notion for calibration, streaming and
ShareWeights."""

from torch import nn

from nnslim.base.blocks import block_lists, block_of, layer_stack


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()])


def test_block_lists_are_every_module_list_and_sequential():
    paths = [p for p, _ in block_lists(Net())]
    assert paths == ["layers", "layers.0", "layers.1", "layers.2", "heads", "mixed"]


def test_block_of_is_the_outermost_list_item_holding_a_path():
    named = dict(Net().named_modules())
    assert block_of("layers.1.0", named) == "layers.1"
    assert block_of("embed", named) is None
    assert block_of("layers.1", named) is None  # the block itself holds no deeper path


def test_layer_stack_is_the_longest_list_of_one_class():
    path, stack = layer_stack(Net())
    assert path == "layers" and len(stack) == 3  # mixed is longer but of two classes
    assert layer_stack(nn.Linear(2, 2)) is None
