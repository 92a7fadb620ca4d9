"""Tiny AION + ADyT models for tests/test_attach.py, and the rank process of its DDP test.

Run as a script (`python tests/ddp_worker.py RANK WORLD INIT_FILE OUT`), one process per rank:
it joins a gloo group through a file store, trains `Net` under DDP with `surgeon.attach` on the
shared `SCHEDULE` (gradient accumulation with `no_sync`), and `torch.save`s its buffers,
parameters, the number of `all_reduce` calls made inside each optimizer step, and the AION EMAs
of a control run without attach to OUT. `reference_run` is the same training in one process.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.nn import AionResidual, attach
from surgeon.nn.adyt import ADyT

D, T, B = 16, 3, 2  # hidden size, tokens per sequence, sequences per rank and micro-batch
SCHEDULE = (1, 3, 2)  # micro-batches accumulated into each optimizer step
LR = 0.1


class Block(nn.Module):
    """Pre-norm residual block: `x + α·fc(ADyT(x))`, AION reading the branch's input."""

    def __init__(self, d: int, gamma: float, smoothing: float, beta: float) -> None:
        super().__init__()
        self.norm = ADyT(d, smoothing=smoothing)
        self.fc = nn.Linear(d, d)
        self.res = AionResidual(alpha0=0.5, beta=beta, ema_gamma=gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm(x)  # (..., d)
        return self.res(x, self.fc(xn), xn)


class Net(nn.Module):
    """`layers` blocks in sequence and a linear head to one output per token."""

    def __init__(
        self,
        d: int = D,
        layers: int = 3,
        gamma: float = 0.5,
        smoothing: float = 0.5,
        beta: float = 0.3,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d, gamma, smoothing, beta) for _ in range(layers)))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))  # (..., 1)


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def union_batches(world: int) -> list[list[torch.Tensor]]:
    """For each step of SCHEDULE, its micro-batches of the union over ranks: (world·B, T, D);
    rank r's share of one is rows r·B … (r+1)·B."""
    gen = torch.Generator().manual_seed(1234)
    return [[torch.randn(world * B, T, D, generator=gen) for _ in range(k)] for k in SCHEDULE]


def shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * B : (rank + 1) * B]


def state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def reference_run(world: int) -> dict[str, dict[str, torch.Tensor]]:
    """The DDP training in one process: every micro-batch of the union, each rank's share
    forwarded on its own (AION's α depends on the batch it sees, as on that rank), the loss
    averaged over ranks as DDP averages gradients, one optimizer step per SCHEDULE entry."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    handle = attach(model, opt)
    for micro in union_batches(world):
        for batch in micro:
            for rank in range(world):
                loss = loss_fn(model(shard(batch, rank))) / (len(micro) * world)
                loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    return state(model)


def _train_ddp(rank: int, world: int, use_attach: bool) -> tuple[Net, list[int]]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    # No buffer sync in the forward: whatever makes the ranks' EMAs agree must be attach's doing
    # (newer torch renames broadcast_buffers; both leave the equal initial buffers alone).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        ddp = DDP(model, forward_sync_buffers=False)
    else:
        ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    handle = attach(ddp, opt) if use_attach else None

    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    per_step = []
    for micro in union_batches(world):
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = loss_fn(ddp(shard(batch, rank))) / len(micro)
                loss.backward()
        calls[0] = 0
        dist.all_reduce = counting_all_reduce
        try:
            opt.step()
        finally:
            dist.all_reduce = real_all_reduce
        per_step.append(calls[0])
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return model, per_step


def run_ranks(commands: list[list[str]], cwd: Path, timeout: float) -> None:
    """Start one process per command (rank r runs commands[r]) with OMP_NUM_THREADS=1 and the
    repository and tests importable; wait for all, kill the rest if one hangs, and fail with the
    log of a rank that did not exit 0."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(cwd), str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"


def main(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, per_step = _train_ddp(rank, world, use_attach=True)
        control, _ = _train_ddp(rank, world, use_attach=False)
        result: dict[str, Any] = state(model)
        result["all_reduce_per_step"] = per_step
        result["control_ratio_ema"] = [b.res.ratio_ema.clone() for b in control.blocks]
        torch.save(result, Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
