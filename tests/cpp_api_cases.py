"""Python side of tests/test_cpp_api.py: the models, data and training loop of
tests/cpp/test_ddp.cpp rebuilt in Python, run under python/torchlane/ddp.py with tests/dist.py."""

import torch
import torch.distributed as dist
from torch import nn

IN, HIDDEN, OUT, GLOBAL_BATCH, STEPS, LR = 6, 10, 3, 12, 4, 0.1
BUCKET_CAP_MB = 0.0002


class Net(nn.Module):
    def __init__(self, hidden=HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(IN, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, OUT)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def init_params(module, offset):
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            v = torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.7 + i + offset) * 0.5
            p.copy_(v.reshape(p.shape))


def batch(step):
    x = torch.sin(torch.arange(GLOBAL_BATCH * IN, dtype=torch.float32) * 0.31 + step)
    y = torch.cos(torch.arange(GLOBAL_BATCH * OUT, dtype=torch.float32) * 0.17 + 2 * step)
    return x.reshape(GLOBAL_BATCH, IN), y.reshape(GLOBAL_BATCH, OUT)


def losses_case(rank, world_size):
    """rank 0's losses of the C++ program's `replica` case, under torchlane's Python DDP."""
    import torchlane

    net = Net()
    init_params(net, 0.1 * rank)
    ddp = torchlane.DistributedDataParallel(net, bucket_cap_mb=BUCKET_CAP_MB)
    local = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        rows = slice(rank * local, (rank + 1) * local)
        loss = torch.nn.functional.mse_loss(ddp(x[rows]), y[rows])
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(p.grad * LR)
                p.grad.zero_()
    dist.barrier()
    return losses


def mismatch_case(rank, world_size):
    """The message torchlane's Python DDP raises for the C++ program's `mismatch` case."""
    import torchlane

    net = Net(HIDDEN + 1 if rank == 1 else HIDDEN)
    try:
        torchlane.DistributedDataParallel(net, bucket_cap_mb=BUCKET_CAP_MB)
    except RuntimeError as e:
        return str(e)
    return None


# The optimizers of the C++ program's checkpoint cases (make_optimizer in tests/cpp/test_ddp.cpp).
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
}


def checkpoint_case(rank, world_size, kind, path, mode):
    """The C++ program's ckpt:<kind>:<mode> under torchlane's Python DDP and checkpoint.py.
    mode "save": trains steps 0-1, saves step 2 into the directory `path`, trains steps 2-3;
    mode "resume": loads the checkpoint file `path` and trains from its step to step 4.
    Returns the final parameters (name -> tensor) and, for "resume", the loaded step."""
    import torchlane
    from torchlane import checkpoint

    net = Net()
    init_params(net, 0.1 * rank + (5.0 if mode == "resume" else 0.0))
    ddp = torchlane.DistributedDataParallel(net, bucket_cap_mb=BUCKET_CAP_MB)
    opt = OPTIMIZERS[kind](net.parameters())
    start = 0
    if mode == "resume":
        info = checkpoint.load(path, ddp, opt)
        start = info.step
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    for step in range(start, 4):
        if step == 2 and mode == "save":
            checkpoint.save(path, ddp, opt, 2, data_position=2)
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        opt.step()
    dist.barrier()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, start
