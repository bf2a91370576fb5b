"""Throughput levers of issue 13, one row each, in one process (``pretrain_bench.py
--sections levers``): the real trainer (``iter_pretrain``) on the same phantoms,
cumulative from the state before the issue to everything on.

Per row: median s/step and crops/s over the measured steps (after ``WARM_STEPS``),
the largest per-step peak memory the events report, the share of the measured wall
time the GPU ran no kernel (torch.profiler's CUDA kernel time, one stream), and
achieved TFLOP/s and share of the device's bf16 peak from the step's model FLOPs
(FlopCounterMode on one forward + backward without gradient checkpointing, so
recomputation is not counted as useful work). On a CPU the rows run too (a smoke
test of every path with ``--preset tiny``), without the GPU columns.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

WARM_STEPS = 2
"""Steps not measured: the first builds cuDNN plans, the compiled row compiles."""

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peak by device name fragment (vendor data sheets, SXM)."""


def rows(cache_dir: str) -> dict[str, dict]:
    """Row name -> config overrides, each adding one lever to the row before it.
    ``_attention`` is the window attention's path (``auto``: SDPA on a GPU, the
    chunks on CPU)."""
    before = {"model": {"teacher": "full"}, "data": {"num_workers": 0, "cache": "none"}}
    head = {**before, "model": {"teacher": "head"}}
    auto = {**head, "optim": {"batch_size": "auto"}}
    fed = {**auto, "data": {"num_workers": 6, "cache": "compact", "cache_dir": cache_dir}}
    return {
        "before: full teacher, preset batch + checkpointing, loading in process,"
        " MONAI attention": {**before, "_attention": "monai"},
        "+ SDPA window attention": before,
        "+ head teacher": head,
        "+ batch_size auto": auto,
        "+ 6 loader workers, compact cache": fed,
        "+ run.compile": {**fed, "run": {"compile": True}},
    }


def model_flops(config, device) -> float:
    """FLOPs of one optimizer step's forward + backward (all micro-batches), counted
    without gradient checkpointing."""
    from dataclasses import replace

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from voco_core.models import StudentTeacher
    from voco_core.train.common import amp_dtype, autocast

    model = StudentTeacher(replace(config.model, gradient_checkpointing=False),
                      config.data.image_channels).to(device)
    per_volume = config.num_base_crops + config.geometry.num_random_crops
    size = config.geometry.input_size
    volumes = config.optim.batch_size * config.optim.grad_accum
    crops = torch.randn(per_volume, config.data.image_channels, size, size, size, device=device)
    with autocast(device, amp_dtype(config.optim.amp, device)), \
            FlopCounterMode(display=False) as counter:
        student, _ = model(crops)  # the loss is negligible next to the Swin
        student.float().square().mean().backward()
    return float(counter.get_total_flops()) * volumes


def gpu_kernel_seconds(profile) -> float:
    """Sum of the CUDA kernels' own time in a torch.profiler run (seconds)."""
    total = 0.0
    for event in profile.key_averages():
        value = getattr(event, "self_device_time_total", None)
        if value is None:
            value = getattr(event, "self_cuda_time_total", 0.0)
        total += float(value or 0.0)
    return total / 1e6


def run_row(overrides: dict, preset: str, device: str, steps: int, data: str) -> dict:
    import torch

    from voco_core.attention import window_attention_backend
    from voco_core.config import load_pretrain_config, make_pretrain_config, merge
    from voco_core.train.pretrain import iter_pretrain

    overrides = dict(overrides)
    attention = overrides.pop("_attention", "auto")
    config = make_pretrain_config(preset, merge(overrides, {
        "optim": {"total_steps": WARM_STEPS + steps},
        "run": {"device": device, "tensorboard": False, "checkpoint_every": 10_000}}))
    cuda = device.startswith("cuda")
    started = time.perf_counter()
    walls, rates, peaks, message, busy, measured_wall = [], [], [], "", None, None
    with tempfile.TemporaryDirectory() as run_dir, window_attention_backend(attention):
        events = iter_pretrain(config, data, run_dir)
        try:
            for event in events:
                if event.kind == "start":
                    message = event.message
                if event.kind == "step" and event.step >= WARM_STEPS:
                    break
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            profiling = (torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA]) if cuda
                else contextlib.nullcontext())
            with profiling as prof:
                for event in events:
                    if event.kind == "step":
                        walls.append(event.seconds_per_step)
                        rates.append(event.crops_per_second)  # the trainer's own count
                        peaks.append(event.peak_memory_bytes)
                if cuda:
                    torch.cuda.synchronize()
            measured_wall = time.perf_counter() - t
            if cuda:
                busy = gpu_kernel_seconds(prof)
        finally:
            events.close()
        chosen = load_pretrain_config(Path(run_dir) / "config.yaml")  # what auto chose, if asked
    row = {"seconds_per_step": round(statistics.median(walls), 3),
           "crops_per_s": round(statistics.median(rates), 1),
           "measured_steps": len(walls),
           "peak_memory_gib": round(max(peaks) / 2**30, 2),
           "batch_size": chosen.optim.batch_size, "grad_accum": chosen.optim.grad_accum,
           "gradient_checkpointing": chosen.model.gradient_checkpointing,
           "attention": attention, "row_seconds": round(time.perf_counter() - started, 1)}
    if message:
        row["start_message"] = message
    if busy is not None and measured_wall:
        row["gpu_idle_percent"] = round(100 * max(0.0, 1 - busy / measured_wall), 1)
    row["_config"] = chosen
    return row


def bench_levers(device: str, preset: str, steps: int, data: str,
                 budget_s: float = 420.0) -> dict:
    """Every row of :func:`rows` (those that fit in ``budget_s``; the rest say so)."""
    import torch

    result: dict = {"preset": preset, "device": device, "warm_steps": WARM_STEPS,
                    "rows": {}}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device"}
        name = torch.cuda.get_device_name(0)
        result["device_name"] = name
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        result["bf16_peak_tflops"] = peak
    else:
        peak = None
    started = time.perf_counter()
    flops_cache: dict = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, overrides in rows(cache_dir).items():
            if time.perf_counter() - started > budget_s:
                result["rows"][name] = {"skipped": f"over the section's {budget_s:.0f} s"}
                continue
            if "compile" in overrides.get("run", {}) and not device.startswith("cuda"):
                # measured: the tiny backbone's CPU compilation unfinished after 9.6 min
                result["rows"][name] = {"skipped": "run.compile is measured on CUDA only"}
                continue
            try:
                row = run_row(overrides, preset, device, steps, data)
            except Exception as err:  # a row that fails (e.g. compile) must not lose the rest
                result["rows"][name] = {"failed": f"{type(err).__name__}: {err}"[:300]}
                continue
            config = row.pop("_config")
            key = (config.optim.batch_size, config.optim.grad_accum, config.model.teacher)
            if device.startswith("cuda"):
                if key not in flops_cache:
                    flops_cache[key] = model_flops(config, torch.device(device))
                tflops = flops_cache[key] / row["seconds_per_step"] / 1e12
                row["achieved_tflops"] = round(tflops, 1)
                if peak:
                    row["percent_of_bf16_peak"] = round(100 * tflops / peak, 1)
            result["rows"][name] = row
            print(f"  levers: {name}: {row}", flush=True)
    names = [n for n, r in result["rows"].items() if "seconds_per_step" in r]
    if len(names) >= 2:
        first, last = result["rows"][names[0]], result["rows"][names[-1]]
        result["speedup_last_over_first"] = round(last["crops_per_s"] / first["crops_per_s"], 2)
    return result


def summary(result: dict) -> str:
    if "skipped" in result:
        return f"levers skipped ({result['skipped']})"
    done = {n: r for n, r in result["rows"].items() if "crops_per_s" in r}
    if not done:
        return "levers: no row finished"
    first, last = next(iter(done.items())), list(done.items())[-1]
    pct = last[1].get("percent_of_bf16_peak")
    return (f"levers ({result['preset']}, {result['device']}): {first[1]['crops_per_s']} -> "
            f"{last[1]['crops_per_s']} crops/s ({last[0]})"
            + (f", {pct}% of bf16 peak" if pct is not None else ""))
