"""Scripts the training tests run in subprocesses (resume after a kill; torchrun)."""

import json
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nnslim


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def make_data(batch_size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(2)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def resume_main(ckpt, out, kill_at, strategy="ddp"):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = make_model()
    data = make_data()

    def evaluate(m):
        if kill_at and trainer_steps[0] + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        trainer_steps[0] += 1
        return 0.0

    trainer_steps = [0]
    resume = os.path.exists(os.path.join(ckpt, "latest"))
    if resume:
        from nnslim.train.checkpoint import latest_checkpoint

        trainer_steps[0] = int(latest_checkpoint(ckpt).name.split("-")[1])
    opts = nnslim.TrainOptions(verbose=False, checkpoint_every=1, eval_every=1, strategy=strategy)
    trainer = nnslim.Trainer(
        optimizer=torch.optim.AdamW,
        lr=0.01,
        evaluate=evaluate,
        options=opts,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5),
    )
    trainer.fit(model, data, epochs=3, checkpoint_dir=ckpt, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: v for k, v in model.state_dict().items()}, out)


def ddp_main(out, strategy="ddp"):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = make_model()
    model[2].p = 0.0  # no dropout: ranks draw different masks than one process would
    data = make_data(batch_size=8)
    opts = nnslim.TrainOptions(verbose=False, strategy=strategy)
    held = list(model.parameters())
    nnslim.Trainer(lr=0.1, options=opts).fit(model, data, epochs=2)
    # after fit the model is a plain module again, with the full weights on every rank, in
    # the parameter objects it had (a sharded copy trained; FSDP never touched this model)
    assert type(model) is nn.Sequential, type(model)
    assert all(a is b for a, b in zip(held, model.parameters(), strict=True))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    if strategy == "fsdp":  # the sharded copy is freed by fit, not left to a later collection
        import gc

        from torch.distributed.fsdp import FSDPModule

        assert not any(isinstance(o, FSDPModule) for o in gc.get_objects())
    model(torch.randn(2, 8))
    state = model.state_dict()
    if strategy == "fsdp":  # every rank holds the same full weights
        import torch.distributed as dist

        for v in state.values():
            other = v.clone()
            dist.broadcast(other, 0)
            assert torch.equal(other, v)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "resume":
        resume_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
    elif cmd in ("ddp", "fsdp"):
        ddp_main(sys.argv[2], cmd)  # nnslim ends the process group it started, at exit
    print(json.dumps({"ok": True}))
