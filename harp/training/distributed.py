"""torchrun support: one process per rank, gloo on CPU and nccl on GPU.

`torchrun --nproc_per_node=N harp train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; outside
torchrun everything here degrades to a single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (used for accuracy counts)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last forward)."""
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf.data, src=0)

    def weights_identical(self, model: nn.Module) -> bool:
        """Every rank holds bit-identical parameters and buffers."""
        if not self.enabled:
            return True
        digest = hashlib.sha256()
        for v in model.state_dict().values():
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        mine = torch.tensor(list(digest.digest()), dtype=torch.int64)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return all(torch.equal(g, gathered[0]) for g in gathered)


def world_size() -> int:
    """Processes in the current run (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def init_distributed(device: torch.device) -> DistContext:
    if launched_processes() <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    from ..errors import HarpError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):  # not "cuda:"
        raise HarpError(f"unknown device {name!r} (choose from auto, cpu, cuda, cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise HarpError(f"--device {name}: no CUDA device is available")
    if index:
        if int(index) >= torch.cuda.device_count():
            raise HarpError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if "LOCAL_RANK" in os.environ:  # every rank would share that one GPU
            raise HarpError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        return torch.device("cuda", int(index))
    if kind == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
