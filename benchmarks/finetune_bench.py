"""Finetuning and inference speed/memory: one SwinUNETR training step and one
sliding-window segmentation of a phantom, on CPU (tiny preset) or CUDA (base preset,
bf16 autocast). Writes JSON and prints one line.

    python benchmarks/finetune_bench.py                       # CPU, tiny preset
    python benchmarks/finetune_bench.py --device cuda --preset base

Rows: seconds per finetuning step (median after a warm-up), peak memory of training,
segmentation seconds and peak memory for a 160 x 160 x 96 phantom (2.5 x 2.5 x 3 mm)
resampled to the preset's spacing, and the GPU memory still allocated after the
segmenter is released (the napari widget's promise: nothing held after a run).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB


def main() -> None:
    import torch

    from voco_core.config import make_finetune_config
    from voco_core.data.io import read_volume
    from voco_core.data.phantoms import make_phantom_dataset
    from voco_core.inference import load_segmenter, segment
    from voco_core.train.finetune import iter_finetune

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="default: tiny on CPU, base on CUDA")
    parser.add_argument("--steps", type=int, default=4, help="measured steps (after 1 warm-up)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "finetune_bench.json")
    args = parser.parse_args()
    preset = args.preset or ("base" if args.device == "cuda" else "tiny")
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "phantoms"
        make_phantom_dataset(data, n=3, seed=0)  # 160 x 160 x 96, 2.5 x 2.5 x 3 mm
        config = make_finetune_config(preset, {
            "train": {"total_steps": args.steps + 1, "val_every": 10_000},
            "run": {"device": args.device, "tensorboard": False, "checkpoint_every": 10_000}})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        walls = []
        for event in iter_finetune(config, data, Path(work) / "run",
                                   validation=[]):
            if event.kind == "step" and event.step > 1:
                walls.append(event.seconds_per_step)
        train_memory = peak_memory_gib(device)
        checkpoint = Path(work) / "run" / "checkpoints" / "last.pt"

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        record = read_volume(data / "imagesTr" / "phantom_000.nii.gz")
        segmenter = load_segmenter(checkpoint, args.device)
        segment(record, segmenter)  # warm-up (cuDNN/kernels)
        started = time.perf_counter()
        result = segment(record, segmenter)
        if device.type == "cuda":
            torch.cuda.synchronize()
        segment_seconds = time.perf_counter() - started
        segment_memory = peak_memory_gib(device)
        segmenter.release()
        del segmenter
        import gc

        gc.collect()
        after_release = (round(torch.cuda.memory_allocated(device) / 2**20, 1)
                         if device.type == "cuda" else None)

    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "preset": preset,
        "feature_size": config.model.feature_size, "roi_size": list(config.train.roi_size),
        "crops_per_step": config.train.samples_per_volume * config.train.batch_volumes,
        "amp": config.train.amp,
        "finetune_seconds_per_step": round(statistics.median(walls), 3),
        "finetune_peak_memory_gib": train_memory,
        "segment_input_shape": list(record.shape),
        "segment_seconds": round(segment_seconds, 2),
        "segment_peak_memory_gib": segment_memory,
        "segment_labels_shape": list(result.labels.shape),
        "gpu_memory_after_release_mib": after_release,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"finetune {preset} on {args.device}: {report['finetune_seconds_per_step']} s/step "
          f"({report['crops_per_step']} crops of {config.train.roi_size}), peak "
          f"{train_memory} GiB; segment {record.shape}: {report['segment_seconds']} s, peak "
          f"{segment_memory} GiB; after release {after_release} MiB -> {args.out}")


if __name__ == "__main__":
    main()
