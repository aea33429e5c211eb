"""Where each process's batches come from (``nnslim.train.trainer._Batches``), and the
training state a checkpoint holds (``TrainState``)."""

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import nnslim
from nnslim.train.trainer import TrainState, _Batches, _Distributed


class Counting(Dataset):
    """Twenty items; remembers which it was asked for."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        return torch.tensor([float(i)])


def _process(rank, world=2):
    return _Distributed(rank, world, enabled=False, strategy="ddp")


def _items(batches):
    return [b.flatten().long().tolist() for b in batches]


def test_each_process_loads_only_its_own_batches_of_a_loader():
    seen = {}
    for rank in (0, 1):
        data = Counting()
        loader = DataLoader(data, batch_size=3)  # 7 batches: 3 groups of 2 and one left
        epoch = _Batches(loader, _process(rank)).epoch(0, 0)
        seen[rank] = _items(epoch)
        assert sorted(data.loaded) == sorted(i for b in seen[rank] for i in b)
        assert epoch.consumed == 6 and epoch.read
    assert seen[0] == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    assert seen[1] == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]  # the partial group is not trained


def test_a_resumed_epoch_skips_to_its_position_by_index_without_loading():
    data = Counting()
    loader = DataLoader(data, batch_size=2)
    epoch = _Batches(loader, _process(0, 1)).epoch(0, 4)
    assert _items(epoch) == [[8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19]]
    assert min(data.loaded) == 8  # batches 0-3 were never loaded
    assert epoch.consumed == 10


def test_a_shuffled_loader_gives_the_processes_one_order_and_resumes_in_it():
    def order(rank, world, skip):
        torch.manual_seed(0)
        loader = DataLoader(Counting(), batch_size=2, shuffle=True)
        return _items(_Batches(loader, _process(rank, world)).epoch(0, skip))

    one = order(0, 1, 0)
    assert order(0, 2, 0) == one[0::2] and order(1, 2, 0) == one[1::2]
    assert order(0, 1, 3) == one[3:]  # the same permutation, after the position


def test_other_iterables_are_read_whole_by_every_process():
    batches = [torch.tensor([float(i)]) for i in range(5)]
    epoch = _Batches(batches, _process(1)).epoch(0, 0)
    assert _items(epoch) == [[1], [3]]
    assert epoch.consumed == 4


def test_a_loader_already_sharded_by_a_distributed_sampler_is_trained_whole():
    data = Counting()
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=5, sampler=sampler)
    batches = _Batches(loader, _process(1))
    first = _items(batches.epoch(0, 0))
    again = _items(batches.epoch(3, 0))
    assert sampler.epoch == 3
    assert len(first) == len(again) == 2  # all 10 items of this process's share
    assert first != again  # the epoch reshuffles


def test_train_state_round_trips_through_its_state_dict():
    state = TrainState(step=7, epoch=1, position=12, best_metric=0.5)
    state.history.append({"step": 7, "loss": 0.25})
    state.rng = {"torch": torch.get_rng_state()}
    copy = TrainState()
    copy.load_state_dict({**state.state_dict(), "optimizer": {}})
    assert copy == state
    copy.history[0]["loss"] = 1.0
    assert state.history[0]["loss"] == 0.25  # not shared


def test_a_checkpoint_holds_the_train_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = DataLoader(
        [(torch.randn(4), torch.tensor(i % 2)) for i in range(12)], batch_size=4, shuffle=True
    )
    options = nnslim.TrainOptions(verbose=False, checkpoint_every=2)
    nnslim.Trainer(lr=0.1, options=options).fit(model, data, max_steps=2, checkpoint_dir=tmp_path)
    from nnslim.train.checkpoint import latest_checkpoint

    saved = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    state = TrainState()
    state.load_state_dict(saved)
    assert (state.step, state.epoch, state.position) == (2, 0, 2)
    assert [h["step"] for h in state.history] == [1, 2]
    assert state.rng is not None and state.epoch_rng is not None
