"""torch.distributed glue for ``torchrun`` (DDP): NCCL on CUDA, gloo on CPU.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`setup_distributed` joins the
process group from it (or uses one the caller already initialised). Outside
``torchrun`` everything degrades to a world of one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when :func:`setup_distributed` created the process group (and must destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group described by the environment; pick this rank's device.

    On CUDA each rank uses ``cuda:LOCAL_RANK``; on CPU all ranks use the CPU (gloo).
    """
    if dist.is_available() and dist.is_initialized():
        context = DistContext(dist.get_rank(), dist.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        context = DistContext(dist.get_rank(), dist.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)
    else:
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    return context, device


def teardown_distributed(context: DistContext) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: list[float] | torch.Tensor, context: DistContext,
                    device: torch.device) -> list[float]:
    """Average a few numbers over ranks (for logging identical numbers on every rank),
    as host floats; a 1-D tensor on the device costs one device->host copy."""
    if not context.active:
        return values.tolist() if isinstance(values, torch.Tensor) else list(values)
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / context.world_size).tolist()


def any_rank(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop request on rank 0)."""
    if not context.active:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(context: DistContext) -> None:
    if context.active:
        dist.barrier()


def weights_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 of every tensor in the modules' state dicts (bit-exact identity check)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_strings(value: str, context: DistContext) -> list[str]:
    """``value`` from every rank, in rank order (all ranks must call this)."""
    if not context.active:
        return [value]
    values: list[str] = [""] * context.world_size
    dist.all_gather_object(values, value)
    return values
