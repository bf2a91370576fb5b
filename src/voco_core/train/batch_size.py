"""``optim.batch_size: auto``: micro-batch, accumulation and checkpointing for the device.

The volumes per optimizer step stay the preset's (``batch_size x grad_accum`` of
:func:`~voco_core.config.make_pretrain_config` for the run's preset: tiny 1, base 2, huge 2):
the loss is averaged over them and the learning rate was set for them, so they are
part of the recipe. What auto chooses is how a step is computed:

1. From the device's free memory and one probe forward + backward of one volume's
   ``K + m`` crops (the run's model, precision and crop size), the bytes that do not
   depend on the micro-batch (weights, gradients, AdamW state) and those of each
   volume (activations).
2. The largest micro-batch that divides the volumes per step and fits in
   :data:`HEADROOM` of the free memory (with the v2 loss at least 2 volumes, its
   inter-volume pairs), without gradient checkpointing (it costs about
   30% of a step, docs/benchmarks.md); with checkpointing only when not even one
   volume fits without it; ``grad_accum`` makes up the rest.

On a CPU (or MPS) there is no free-memory figure to size against: auto is the
preset's own split and checkpointing setting, as before. Under DDP every rank
probes its own GPU and all take the smallest micro-batch (and checkpointing if any
rank needs it), so the ranks step together.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from voco_core.config import PretrainConfig
from voco_core.distributed import DistContext
from voco_core.errors import VoCoConfigError

HEADROOM = 0.85
"""Share of the free memory a run may plan to use: the allocator's fragmentation,
cuDNN workspaces and the prefetched volumes take the rest."""

GIB = 2**30


@dataclass(frozen=True)
class MemoryProbe:
    """What one probe step measured on a device (bytes)."""

    free: int
    """Free device memory before the probe model was built."""
    fixed: int
    """Weights (student and teacher), gradients and AdamW state: independent of the
    micro-batch."""
    per_volume: int
    """Peak activations of one volume's ``K + m`` crops, forward + backward."""

    def fits(self, volumes: int) -> bool:
        return self.fixed + volumes * self.per_volume <= HEADROOM * self.free


@dataclass(frozen=True)
class BatchChoice:
    """The split auto chose, and why (one line for the CLI, the GUI and the run log)."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    reason: str

    def line(self) -> str:
        per_step = self.batch_size * self.grad_accum
        return (f"optim.batch_size auto: {self.batch_size} volume(s) per micro-batch x "
                f"{self.grad_accum} accumulation = {per_step} per step, gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'} "
                f"({self.reason})")


def smallest_micro_batch(config: PretrainConfig, per_step: int) -> int:
    """The v2 loss pairs each volume with its neighbour *in the micro-batch*: auto keeps
    2 volumes per micro-batch for it (when a step has 2), so splitting a step never
    turns the inter-volume term into a comparison of a volume with itself."""
    return 2 if config.loss.variant == "v2" and per_step >= 2 else 1


def choose_split(per_step: int, plain: MemoryProbe | None,
                 checkpointed: Callable[[], MemoryProbe | None],
                 smallest: int = 1) -> BatchChoice:
    """The largest micro-batch of at least ``smallest`` volumes dividing ``per_step``
    that fits, preferring no checkpointing. ``plain``: the probe without checkpointing
    (None: it ran out of memory); ``checkpointed``: runs the probe with checkpointing,
    called only when needed. :class:`VoCoConfigError` when not even ``smallest``
    volumes fit."""
    for probe, checkpointing in ((plain, False), (None, True)):
        if checkpointing:
            probe = checkpointed()
        if probe is None:
            continue
        fitting = [b for b in range(per_step, smallest - 1, -1)
                   if per_step % b == 0 and probe.fits(b)]
        if fitting:
            size = fitting[0]
            return BatchChoice(size, per_step // size, checkpointing, _reason(probe, size))
    measured = (f": one volume needs {plain.per_volume / GIB:.1f} GiB + "
                f"{plain.fixed / GIB:.1f} GiB of weights and optimizer state"
                if plain is not None else "")
    free = f" of {plain.free / GIB:.1f} GiB free" if plain is not None else ""
    volumes = "one volume does" if smallest == 1 else f"{smallest} volumes (loss v2) do"
    raise VoCoConfigError(
        f"optim.batch_size = 'auto': {volumes} not fit in the device's memory{free}, "
        f"even with gradient checkpointing{measured}; free the GPU or choose a smaller "
        "preset or geometry.input_size")


def _reason(probe: MemoryProbe, size: int) -> str:
    return (f"{probe.free / GIB:.1f} GiB free; measured {probe.per_volume / GIB:.2f} GiB "
            f"per volume + {probe.fixed / GIB:.2f} GiB fixed; {size} volume(s) use "
            f"{(probe.fixed + size * probe.per_volume) / GIB:.1f} GiB")


def probe_cuda_memory(config: PretrainConfig, device: torch.device,
                      checkpointing: bool) -> MemoryProbe | None:
    """One forward + backward of one volume's ``K + m`` crops through a fresh model
    built like the run's (``checkpointing`` set), measured with CUDA's allocator
    statistics; ``None`` when even that runs out of memory. Everything it allocated
    is freed before it returns."""
    from voco_core.models import StudentTeacher
    from voco_core.train.common import amp_dtype, autocast

    o = config.optim
    crops_per_volume = config.num_base_crops + config.geometry.num_random_crops
    size = config.geometry.input_size
    torch.cuda.empty_cache()
    free = int(torch.cuda.mem_get_info(device)[0])
    start = torch.cuda.memory_allocated(device)
    model = crops = None
    try:
        model = StudentTeacher(replace(config.model, gradient_checkpointing=checkpointing),
                          config.data.image_channels).to(device)
        weights = torch.cuda.memory_allocated(device) - start
        trainable = sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad)
        moments = 3 if o.amsgrad else 2  # AdamW's exp_avg, exp_avg_sq (+ max_exp_avg_sq)
        crops = torch.randn(crops_per_volume, config.data.image_channels, size, size, size,
                            device=device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(device, amp_dtype(o.amp, device)):
            student, _ = model(crops)
            loss = student.float().square().mean()
        loss.backward()
        # The peak includes the gradients backward allocates: counted in `fixed`.
        peak = torch.cuda.max_memory_allocated(device) - before - trainable
        return MemoryProbe(free=free, fixed=weights + trainable * (1 + moments),
                           per_volume=max(int(peak), 1))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, crops
        gc.collect()
        torch.cuda.empty_cache()


def resolve_batch_size(
    config: PretrainConfig, device: torch.device, dist_ctx: DistContext | None = None,
    probe: Callable[[PretrainConfig, torch.device, bool], MemoryProbe | None] = probe_cuda_memory,
) -> tuple[PretrainConfig, str]:
    """``config`` with ``optim.batch_size: auto`` replaced by the chosen numbers
    (``batch_size``, ``grad_accum``, ``model.gradient_checkpointing``) and the line
    that says what was chosen and why; other configs come back as they are, with "".
    ``probe`` measures a device (tests pass a fake one)."""
    if config.optim.batch_size != "auto":
        return config, ""
    batch_size, grad_accum = config.preset_split()
    if device.type != "cuda":
        choice = BatchChoice(batch_size, grad_accum, config.model.gradient_checkpointing,
                             f"{device.type}: the {config.preset} preset's split, no "
                             "free-memory figure to size against")
    else:
        per_step = batch_size * grad_accum
        choice = choose_split(per_step, probe(config, device, False),
                              lambda: probe(config, device, True),
                              smallest_micro_batch(config, per_step))
        choice = _agree_over_ranks(choice, per_step, device, dist_ctx)
    chosen = replace(config,
                     optim=replace(config.optim, batch_size=choice.batch_size,
                                   grad_accum=choice.grad_accum),
                     model=replace(config.model,
                                   gradient_checkpointing=choice.gradient_checkpointing))
    return chosen.validate(check_device=False), choice.line()


def _agree_over_ranks(choice: BatchChoice, per_step: int, device: torch.device,
                      dist_ctx: DistContext | None) -> BatchChoice:
    """Under DDP: the smallest micro-batch of all ranks, checkpointing if any needs it."""
    if dist_ctx is None or not dist_ctx.active:
        return choice
    import torch.distributed as dist

    values = torch.tensor([-choice.batch_size, int(choice.gradient_checkpointing)],
                          device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    size, checkpointing = -int(values[0]), bool(values[1])
    if (size, checkpointing) == (choice.batch_size, choice.gradient_checkpointing):
        return choice
    return BatchChoice(size, per_step // size, checkpointing,
                       f"the tightest of {dist_ctx.world_size} ranks; this rank: {choice.reason}")
