"""Our pretraining step against the authors' (issue 13), in one process.

The authors' ``VoCoHead`` (Luffy03/VoCo ``models/voco_head.py``) and their
``WarmupCosineSchedule`` (``optimizers/lr_scheduler.py``) are loaded from a copy of
their public repository kept outside this one (``--authors-repo PATH`` or
``VOCO_AUTHORS_REPO``); nothing of theirs is copied here. Their step is rebuilt as
their ``voco_train.py`` runs it: AdamW(lr 1e-4, amsgrad), ``autocast(enabled=amp)``
with a ``GradScaler`` on CUDA, ``loss = pos + neg + b_loss``, their five ``.item()`` calls
and the print in their forward every step, the scheduler stepped every step, gradient
checkpointing on (their ``--use_checkpoint`` default). Ours is
``voco_core.train.pretrain._train_step``, the production step itself.

Both get the same crops (sampled once, outside the timed step: their sampling runs
in DataLoader workers), the same precision and device, and alternate step by step
so machine load hits both alike. Peak memory on CPU is the bytes autograd saves for
backward during one forward (:func:`voco_core.memory.saved_tensor_bytes`): the
resident set of one process holding every model cannot be split between them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

AUTHORS_FILES = ("models/voco_head.py", "optimizers/lr_scheduler.py", "voco_train.py")
REPO_ENV = "VOCO_AUTHORS_REPO"


def find_authors_repo(path: str | None) -> tuple[Path | None, str]:
    """The authors' checkout from ``path`` or ``$VOCO_AUTHORS_REPO``, else (None, why)."""
    path = path or os.environ.get(REPO_ENV)
    if not path:
        return None, (f"no copy of the authors' repository given (--authors-repo PATH or "
                      f"{REPO_ENV}; a checkout of https://github.com/Luffy03/VoCo)")
    root = Path(path).expanduser()
    missing = [f for f in AUTHORS_FILES if not (root / f).is_file()]
    if missing:
        return None, f"{root} lacks {', '.join(missing)}: not a checkout of Luffy03/VoCo"
    return root, ""


def _load_module(name: str, file: Path):
    """Import one of their files by path, under a name that cannot shadow ours."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_authors(root: Path):
    return (_load_module("voco_authors_head", root / "models" / "voco_head.py"),
            _load_module("voco_authors_lr_scheduler", root / "optimizers" / "lr_scheduler.py"))


# ---------------------------------------------------------------- the two steps


class AuthorsStep:
    """Their model, optimiser, scheduler and scaler; ``__call__`` is one step of their
    ``train()`` loop minus the data loading (their ``.item()`` calls included)."""

    def __init__(self, head_module, scheduler_module, feature_size: int, device, amp_dtype,
                 use_checkpoint: bool = True):
        import torch

        args = argparse.Namespace(in_channels=1, feature_size=feature_size, spatial_dims=3,
                                  dropout_path_rate=0.0, use_checkpoint=use_checkpoint)
        model = head_module.VoCoHead(args)
        # Their projection head is built for feature size 48 (in_dim=1152 = 24 * 48
        # hard-coded); at other sizes it is rebuilt with their class at 24 * feature_size.
        if 24 * feature_size != 1152:
            for net in (model.student, model.teacher):
                net.proj_head = head_module.projection_head(in_dim=24 * feature_size,
                                                            hidden_dim=2048, out_dim=2048)
        self.model = model.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, amsgrad=True)
        self.scheduler = scheduler_module.WarmupCosineSchedule(self.optimizer, warmup_steps=5000,
                                                               t_total=250_000)
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        # voco_train.py: GradScaler() whenever amp is on (always, on CUDA)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype is not None else None
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def inputs(self, batch):
        """Our batch in their layout: ``img`` = random sub-volumes ``(B*m, 1, S, S, S)``,
        ``crops`` = base crops ``(B*K, 1, S, S, S)`` (MetaTensors: their forward calls
        ``as_tensor()``), ``labels`` ``(B, m, K)``. Same voxels, same order."""
        from monai.data import MetaTensor

        return (MetaTensor(batch.random_crops.flatten(0, 1)),
                MetaTensor(batch.base_crops.flatten(0, 1)), batch.labels)

    def forward(self, img, crops, labels):
        with contextlib.redirect_stdout(io.StringIO()):  # their forward prints every step
            return self.model(img, crops, labels)

    def __call__(self, batch) -> float:
        import torch

        self.model.train()
        img, crops, labels = self.inputs(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            pos, neg, b_loss = self.forward(img, crops, labels)
            loss = pos + neg + b_loss
            logged = [loss.item()]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        logged += [loss.item(), pos.item(), neg.item(), b_loss.item()]
        return logged[0]


class OurStep:
    """Our model, loss, optimiser and scheduler as :func:`iter_pretrain` builds them;
    ``__call__`` runs the production ``_train_step`` on a fixed batch."""

    def __init__(self, config, device):
        import torch

        from voco_core.distributed import DistContext
        from voco_core.losses import build_loss
        from voco_core.models import StudentTeacher
        from voco_core.train.common import amp_dtype, warmup_cosine

        o = config.optim
        self.config, self.device = config, torch.device(device)
        self.model = StudentTeacher(config.model).to(self.device)
        self.loss_fn = build_loss(config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay,
                                           amsgrad=o.amsgrad)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(o.warmup_steps, o.total_steps, o.min_lr / o.lr))
        self.dtype = amp_dtype(o.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.dist_ctx = DistContext()
        self.steps = 0
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def __call__(self, batch) -> float:
        from voco_core.train.pretrain import _train_step

        # The sampler hands back the prepared batch: crops are drawn outside the timing.
        _, values = _train_step(self.model, self.model, self.loss_fn, lambda volumes, rngs: batch,
                                itertools.repeat([None] * batch.labels.shape[0]), self.params,
                                self.optimizer, self.scheduler, self.scaler, self.config,
                                self.steps, self.dist_ctx, self.device, self.dtype)
        self.steps += 1
        return float(values[0])


def our_config(feature_size: int, teacher: str, checkpointing: bool, device: str,
               amp: str, volumes: int, crop_size: int):
    """The base preset's geometry (16 base + 2 random crops of 96^3 per 384 x 384 x 96
    volume, the authors') resized to ``crop_size``^3, ``volumes`` per step, at
    ``feature_size``, with their 2048-wide head."""
    from voco_core.config import make_pretrain_config

    return make_pretrain_config("base", {
        "geometry": {"input_size": crop_size},
        "model": {"feature_size": feature_size, "teacher": teacher,
                  "gradient_checkpointing": checkpointing},
        "optim": {"amp": amp, "batch_size": volumes},
        "run": {"device": device}}, check_device=False)


def make_batch(config, device, seed: int = 0):
    """One step's crops from ``batch_size`` random volumes of the preset's size."""
    import numpy as np
    import torch

    from voco_core.data.sampling import VoCoCropSampler

    g = torch.Generator().manual_seed(seed)
    size = config.data.target_size
    volumes = [torch.rand(1, *size, generator=g).to(device)
               for _ in range(config.optim.batch_size)]
    rngs = [np.random.default_rng([seed, b]) for b in range(len(volumes))]
    return VoCoCropSampler(config)(volumes, rngs)


def saved_gib(forward) -> float:
    from voco_core.memory import saved_tensor_bytes

    return round(saved_tensor_bytes(forward) / 2**30, 3)


# ---------------------------------------------------------------- the section


CPU_GEOMETRY = (1, 40)
"""(volumes per step, crop edge) on CPU: 1 x 18 crops of 40^3. The authors' 2 x 18 crops
of 64^3 at feature size 12 went past 20 GB resident (OOM-killed on a 23 GB machine);
their code fixes 16 base crops per volume, so volumes and crop size are what can shrink."""
CUDA_GEOMETRY = (2, 64)
"""The authors' (and the base preset's): 2 volumes x 18 crops of 64^3 per step."""


def bench_authors(repo: str | None, device: str, steps: int, feature_size: int | None = None,
                  variants: str | None = None, volumes: int | None = None,
                  crop_size: int | None = None) -> dict:
    """Alternate their step and each of ours on the same crops; see the module docstring.

    CPU: feature size 12, fp32, :data:`CPU_GEOMETRY`. CUDA: the base preset (feature
    size 48, :data:`CUDA_GEOMETRY`), bf16 autocast for both (their GradScaler kept, as
    their code creates it whenever amp is on).
    """
    root, why = find_authors_repo(repo)
    if root is None:
        print(f"pretrain_bench: authors section skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    import torch

    from voco_core.memory import release_freed_memory, retain_freed_memory

    on_cuda = device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        why = "--device cuda but no CUDA device"
        print(f"pretrain_bench: authors section skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    feature_size = feature_size or (48 if on_cuda else 12)
    default_volumes, default_crop = CUDA_GEOMETRY if on_cuda else CPU_GEOMETRY
    volumes, crop_size = volumes or default_volumes, crop_size or default_crop
    amp_dtype, amp = (torch.bfloat16, "bf16") if on_cuda else (None, "off")
    head_module, scheduler_module = load_authors(root)

    torch.manual_seed(0)
    setups = {"authors": lambda: AuthorsStep(head_module, scheduler_module, feature_size,
                                             device, amp_dtype)}
    wanted = (variants or "full/ckpt,full/no_ckpt,head/ckpt,head/no_ckpt").split(",")
    for name in wanted:
        teacher, ckpt = name.split("/")
        setups[f"ours/{name}"] = (lambda t=teacher, c=ckpt: OurStep(
            our_config(feature_size, t, c == "ckpt", device, amp, volumes, crop_size), device))
    runners = {name: build() for name, build in setups.items()}
    config = our_config(feature_size, "full", True, device, amp, volumes, crop_size)
    batch = make_batch(config, device)
    crops_per_step = batch.base_crops.shape[:2].numel() + batch.random_crops.shape[:2].numel()

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    result: dict = {
        "setup": (f"feature size {feature_size}, {config.optim.batch_size} volumes x "
                  f"({config.num_base_crops} base + {config.geometry.num_random_crops} random)"
                  f" crops of {config.geometry.input_size}^3 per step, "
                  f"{'bf16 autocast' if on_cuda else 'fp32'}, {device}, one process, "
                  "steps alternating, the first round discarded"),
        "authors_repo_commit": _head_commit(root),
        "authors_step": "their voco_train.py step: VoCoHead (use_checkpoint=True), AdamW "
                        "amsgrad lr 1e-4, WarmupCosineSchedule, 5 .item() per step, the "
                        "'labels and logits' print in their forward (to a buffer)"
                        + (", GradScaler" if on_cuda else ""),
        "threads": torch.get_num_threads(), "crops_per_step": crops_per_step,
        "glibc_freed_memory_retained": False,
    }
    # Memory: bytes kept for backward by one forward (CPU); the CUDA peak per step below.
    memory = {}
    if not on_cuda:
        authors = runners["authors"]
        memory["authors"] = saved_gib(lambda: authors.forward(*authors.inputs(batch)))
        for name, runner in runners.items():
            if name.startswith("ours/"):
                from voco_core.train.pretrain import voco_loss_on_batch

                memory[name] = saved_gib(lambda r=runner: voco_loss_on_batch(
                    r.model, r.loss_fn, batch))
    # Both run under the allocator set-up our CPU training uses (one process: shared).
    result["glibc_freed_memory_retained"] = (not on_cuda) and retain_freed_memory()
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    try:
        for round_ in range(steps + 1):  # round 0 warms every implementation up
            for name, runner in runners.items():
                sync()
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                losses[name] = runner(batch)
                sync()
                if round_:
                    times[name].append(time.perf_counter() - start)
                if on_cuda:
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                print(f"  authors round {round_} {name}: {time.perf_counter() - start:.2f} s",
                      file=sys.stderr)
    finally:
        if result["glibc_freed_memory_retained"]:
            release_freed_memory()
    for name, values in times.items():
        median = statistics.median(values)
        row = {"parameters": runners[name].parameters,
               "median_s_per_step": round(median, 3),
               "mean_s_per_step": round(statistics.mean(values), 3),
               "crops_per_s": round(crops_per_step / median, 3),
               "all_s": [round(v, 2) for v in values], "last_loss": round(losses[name], 4)}
        if on_cuda:
            row["peak_gpu_memory_gib"] = round(peaks[name] / 2**30, 2)
        else:
            row["autograd_saved_gib"] = memory[name]
        result[name] = row
    theirs = result["authors"]["crops_per_s"]
    result["ours_over_authors_crops_per_s"] = {
        name: round(result[name]["crops_per_s"] / theirs, 3) for name in runners
        if name.startswith("ours/")}
    result["target"] = "ours >= 1.3x the authors' crops/s" + (
        "" if on_cuda else " at feature size 12 on CPU")
    return result


def _head_commit(root: Path) -> str | None:
    """The checkout's commit when it is a git work tree (else None: a plain copy)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def summary(section: dict) -> str:
    """The section's part of pretrain_bench's one summary line."""
    if "skipped" in section:
        return f"authors skipped ({section['skipped']})"
    ratios = section["ours_over_authors_crops_per_s"]
    best = max(ratios, key=ratios.get)
    return (f"authors {section['authors']['crops_per_s']} crops/s, ours "
            f"{section[best]['crops_per_s']} ({best}, {ratios[best]}x; target 1.3x)")
