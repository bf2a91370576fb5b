"""Memory and cache sections of ``pretrain_bench.py`` (``--sections memory,cache``).

* ``memory``: peak resident memory of the tiny preset on 4 MRI-sized heads
  (:func:`make_brain_like`), each configuration in a fresh process (``pretrain_bench.py
  --child-memory``) so one peak does not hide another: pretraining per window attention
  x allocator, finetuning with a 117-class atlas per attention.
* ``cache``: bytes per volume and load time of the float32 disk cache vs the compact
  uint8 one, their largest difference, and what it does to the loss.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_time

PRETRAIN_BENCH = Path(__file__).with_name("pretrain_bench.py")
"""The script whose ``--child-memory`` runs one memory configuration."""

BRAIN_SHAPE = (181, 217, 181)
"""An MNI-sized head at 1 mm: the input behind the tiny preset's memory complaint."""


def make_brain_like(folder: Path, n: int = 4, classes: int = 117) -> Path:
    """``n`` 8-bit T1-like heads of :data:`BRAIN_SHAPE` at 1 mm and ``classes``-label
    atlases (13 sectors x 9 slabs), as a Decathlon-style folder (imagesTr/labelsTr)."""
    import nibabel as nib
    import numpy as np

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in BRAIN_SHAPE],
                       indexing="ij")
    angle = np.arctan2(grid[1], grid[0])
    for i in range(n):
        rng = np.random.default_rng(i)
        radius = np.sqrt((grid[0] / (0.75 + 0.02 * i)) ** 2 + (grid[1] / 0.85) ** 2
                         + (grid[2] / 0.8) ** 2)
        inside = radius < 1
        smooth = 40 + 210 * (0.5 + 0.5 * np.cos(3 * grid[0] + i) * np.cos(2 * grid[1]))
        image = np.clip(np.where(inside, smooth + rng.normal(0, 3, BRAIN_SHAPE), 0), 0, 255)
        sector = np.floor((angle + np.pi) / (2 * np.pi) * 13).clip(0, 12)
        slab = np.floor((grid[2] + 1) / 2 * 9).clip(0, 8)
        label = np.where(inside, (sector * 9 + slab) % (classes - 1) + 1, 0)
        for sub, values in (("imagesTr", image), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(values.astype(np.uint8), np.eye(4)),
                     folder / sub / f"head_{i:02d}.nii.gz")
    return folder


def child_memory(kind: str, steps: int, data: str) -> dict:
    """In a fresh process: tiny pretraining on the heads (``kind`` ``pretrain``; one
    step per head to load them all, then ``steps`` timed steps), or tiny finetuning
    with the 117-class atlas on 2 heads and one validation on a third (``finetune``,
    ``steps`` steps, the first untimed). Peak resident set and median s/step."""
    from voco_core.data.datalists import load_datalist

    if os.environ.get("VOCO_BENCH_ATTENTION") == "monai":  # the A/B: MONAI's attention
        import voco_core.models as models
        from voco_core.attention import swap_window_attention

        models.swap_window_attention = lambda model: swap_window_attention(model, False)
    allocator = os.environ.get("VOCO_BENCH_ALLOCATOR", "retain")
    run = {"device": "cpu", "tensorboard": False, "checkpoint_every": 10_000,
           "cpu_allocator": allocator}
    with tempfile.TemporaryDirectory() as run_dir:
        if kind == "pretrain":
            from voco_core.config import make_pretrain_config
            from voco_core.train.pretrain import iter_pretrain

            # volumes load lazily, one per step: time the steps after all are cached
            warmup = len(list((Path(data) / "imagesTr").glob("*.nii.gz")))
            config = make_pretrain_config("tiny", {"data": {"cache": "memory"}, "run": run,
                                          "optim": {"total_steps": steps + warmup}})
            events = list(iter_pretrain(config, str(Path(data) / "imagesTr"), run_dir))
        else:
            from voco_core.config import make_finetune_config
            from voco_core.train.finetune import iter_finetune

            entries = load_datalist(data, require_labels=True)
            config = make_finetune_config("tiny", {
                # the file's 1 mm grid, as the recorded memory figures were measured
                "data": {"num_classes": 117, "spacing": None},
                "train": {"total_steps": steps, "val_every": steps, "warmup_steps": 1},
                "run": run})
            events = list(iter_finetune(config, entries[:2], run_dir,
                                        validation=entries[2:3]))
            warmup = 1
    steps_s = [e.seconds_per_step for e in events if e.kind == "step" and e.step > warmup]
    return {"seconds_per_step": round(statistics.median(steps_s), 3) if steps_s else None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  / 2**20, 2)}


def bench_memory(steps: int) -> dict:
    """Peak resident memory of the tiny preset on 4 MRI-sized heads: pretraining per
    window attention x allocator, finetuning (117 classes) per attention."""
    result: dict = {"input": f"4 uint8 heads of {' x '.join(map(str, BRAIN_SHAPE))} at 1 mm, "
                             "117-class atlases; tiny presets, data.cache memory (pretraining)",
                    "measured_steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(make_brain_like(Path(tmp) / "heads"))
        runs = [("pretrain", attention, allocator)
                for attention in ("memory_efficient", "monai")
                for allocator in ("retain", "system")]
        runs += [("finetune", attention, "retain") for attention in ("memory_efficient", "monai")]
        for kind, attention, allocator in runs:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "VOCO_BENCH_ATTENTION": attention,
                   "VOCO_BENCH_ALLOCATOR": allocator}
            command = [sys.executable, str(PRETRAIN_BENCH), "--child-memory", kind,
                       "--steps", str(steps), "--data", data]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"pretrain_bench: memory child {kind} failed:\n{out.stderr}")
            key = f"{kind}/{attention}/{allocator}"
            result[key] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  memory {key}: {result[key]}", file=sys.stderr)
    return result


def bench_cache(repeats: int, data: str) -> dict:
    """Bytes per volume and load time: float32 (.pt, PersistentDataset) vs compact uint8."""
    import numpy as np
    import torch

    from voco_core.config import make_pretrain_config
    from voco_core.data.datalists import load_datalist
    from voco_core.data.sampling import PretrainDataset, VoCoCropSampler
    from voco_core.losses import VoCoLoss
    from voco_core.models import StudentTeacher
    from voco_core.train.pretrain import voco_loss_on_batch

    entries = load_datalist(data)
    result = {}
    for preset in ("tiny", "base"):
        with tempfile.TemporaryDirectory() as tmp:
            datasets = {}
            for cache in ("disk", "compact"):
                config = make_pretrain_config(preset, {"data": {"cache": cache,
                                                       "cache_dir": f"{tmp}/{cache}"},
                                              "run": {"device": "cpu"}}, check_device=False)
                datasets[cache] = PretrainDataset(entries, config)
                for index in range(len(entries)):
                    datasets[cache][index]  # fill the cache
            sizes = {c: sum(p.stat().st_size for p in Path(f"{tmp}/{c}").iterdir()) / len(entries)
                     for c in datasets}
            loads = {c: median_time(lambda d=datasets[c]: [d[i] for i in range(len(d))],
                                    repeats) / len(entries) for c in datasets}
            errors = [float((datasets["compact"][i] - datasets["disk"][i]).abs().max())
                      for i in range(len(entries))]
            mean_errors = [float((datasets["compact"][i] - datasets["disk"][i]).abs().mean())
                           for i in range(len(entries))]
            row = {
                "target_size": list(config.data.target_size),
                "float32_bytes_per_volume": int(sizes["disk"]),
                "compact_bytes_per_volume": int(sizes["compact"]),
                "compact_fraction_of_float32": round(sizes["compact"] / sizes["disk"], 4),
                "float32_load_ms": round(1000 * loads["disk"], 2),
                "compact_load_ms": round(1000 * loads["compact"], 2),
                "max_abs_error": round(max(errors), 6),
                "mean_abs_error": round(statistics.mean(mean_errors), 6),
                "max_abs_error_hu_ct_window": round(max(errors) * 425.0, 3),
            }
            if preset == "tiny":  # what the error does to the loss: same crops, same model
                torch.manual_seed(0)
                tiny = make_pretrain_config("tiny", {"run": {"device": "cpu"}})
                model = StudentTeacher(tiny.model).eval()
                losses = {}
                for cache, dataset in datasets.items():
                    batch = VoCoCropSampler(tiny, augment=False)(
                        [dataset[0]], [np.random.default_rng(0)])
                    with torch.no_grad():
                        losses[cache] = float(voco_loss_on_batch(model, VoCoLoss(), batch)["total"])
                row["loss_float32"] = round(losses["disk"], 6)
                row["loss_compact"] = round(losses["compact"], 6)
                row["loss_abs_difference"] = round(abs(losses["disk"] - losses["compact"]), 7)
            result[preset] = row
    return result
