"""Pretraining speed and memory: fast paths vs their per-crop / loop oracles, steps per
teacher variant and allocator, the compact cache, and (with a GPU) the base preset.

Usage:
    python benchmarks/pretrain_bench.py                       # CPU sections
    python benchmarks/pretrain_bench.py --device cuda         # + the CUDA section
    python benchmarks/pretrain_bench.py --sections sampler,loss
    python benchmarks/pretrain_bench.py --device cuda --sections levers  # issue 13's
                                       # levers, one row each (benchmarks/levers_bench.py)
    python benchmarks/pretrain_bench.py --sections authors --authors-repo ~/src/VoCo
                                       # ours vs the authors' step (issue 13; see
                                       # benchmarks/authors_bench.py)

The memory and cache sections live in ``benchmarks/memory_bench.py``, the levers and
authors sections in ``levers_bench.py`` and ``authors_bench.py``. Every figure is the
median of ``--repeats`` repeats in this one run. Writes
``benchmarks/results/pretrain_bench_<device>.json`` and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import median_time

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


# ---------------------------------------------------------------- sections


def bench_sampler(repeats: int, device: str) -> dict:
    """16 + 2 crops of 96^3 -> 64^3 from a 384 x 384 x 96 volume (the authors' geometry)."""
    import numpy as np
    import torch

    from voco_core.config import make_pretrain_config
    from voco_core.data.sampling import VoCoCropSampler
    from voco_core.reference import per_crop_labels, per_crop_monai_crops

    config = make_pretrain_config("base", {"run": {"device": "cpu"}}, check_device=False)
    volume = torch.rand(1, 384, 384, 96, generator=torch.Generator().manual_seed(0))
    result = {"geometry": "384x384x96 volume, 16 base + 2 random crops of 96^3 -> 64^3"}
    for augment in (False, True):
        sampler = VoCoCropSampler(config, augment=augment)
        batch = sampler([volume.to(device)])
        boxes = np.concatenate([batch.base_boxes[0], batch.crop_boxes[0]])
        oracle_augment = config.augment if augment else None

        def fast(sampler=sampler):
            out = sampler([volume.to(device)], [np.random.default_rng(1)])
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        def oracle(boxes=boxes, batch=batch, oracle_augment=oracle_augment):
            per_crop_monai_crops(volume, boxes, 64, oracle_augment)
            per_crop_labels(batch.crop_boxes[0], batch.base_boxes[0])

        # Many repeats: single calls vary with first-touch page faults of fresh buffers.
        t_fast, t_oracle = median_time(fast, 4 * repeats), median_time(oracle, 2 * repeats)
        key = "augmented" if augment else "plain"
        result[key] = {
            "one_pass_s_per_volume": round(t_fast, 4),
            "per_crop_monai_s_per_volume": round(t_oracle, 4),
            "one_pass_crops_per_s": round(18 / t_fast, 1),
            "per_crop_monai_crops_per_s": round(18 / t_oracle, 1),
            "speedup": round(t_oracle / t_fast, 2),
        }
    return result


def bench_loss(repeats: int) -> dict:
    """Forward + backward at B = 2, m = 2, K = 16, D = 2048."""
    import torch

    from voco_core.losses import VoCoLoss
    from voco_core.reference import voco_loss_loop

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 2048), (2, 2, 2048), (2, 16, 2048), (2, 16, 2048)]
    inputs = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    labels = torch.zeros(2, 2, 16)
    labels[:, :, [0, 1, 4, 5]] = 0.25
    loss = VoCoLoss()

    def fast():
        loss(*inputs[:2], *inputs[2:], labels)["total"].backward()

    def oracle():
        voco_loss_loop(inputs[0], inputs[1], inputs[2], inputs[3], labels)["total"].backward()

    t_fast, t_oracle = median_time(fast, repeats), median_time(oracle, max(3, repeats // 2))
    return {"shape": "B=2, m=2, K=16, D=2048, forward + backward",
            "vectorised_ms": round(1000 * t_fast, 3), "loop_ms": round(1000 * t_oracle, 2),
            "speedup": round(t_oracle / t_fast, 1)}


def child_step(variant: str, steps: int, data: str) -> dict:
    """Run in a fresh process: ``steps`` tiny pretraining steps; per-step wall/user/sys."""
    from voco_core.config import make_pretrain_config
    from voco_core.train.pretrain import iter_pretrain

    allocator = os.environ.get("VOCO_BENCH_ALLOCATOR", "retain")
    config = make_pretrain_config("tiny", {"model": {"teacher": variant},
                                  "optim": {"total_steps": steps + 1},
                                  "run": {"device": "cpu", "tensorboard": False,
                                          "checkpoint_every": 10_000,
                                          "cpu_allocator": allocator}})
    walls, users, systems, last = [], [], [], None
    with tempfile.TemporaryDirectory() as run_dir:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for event in iter_pretrain(config, data, run_dir):
            now = resource.getrusage(resource.RUSAGE_SELF)
            if event.kind == "step" and event.step > 1:  # step 1 warms up
                walls.append(event.seconds_per_step)
                users.append(now.ru_utime - usage.ru_utime)
                systems.append(now.ru_stime - usage.ru_stime)
            usage, last = now, event
    return {"seconds_per_step": round(statistics.median(walls), 3),
            "user_s_per_step": round(statistics.median(users), 3),
            "system_s_per_step": round(statistics.median(systems), 3),
            "crops_per_s": round(13 / statistics.median(walls), 2),
            "peak_rss_gib": round(last.peak_memory_bytes / 2**30, 2)}


def bench_steps(steps: int, data: str) -> dict:
    """Each teacher variant x allocator set-up, each in a fresh process."""
    setups = {  # the default first: THP on, glibc told to keep freed memory (run.cpu_allocator)
        "thp+retain": {"THP_MEM_ALLOC_ENABLE": "1", "VOCO_BENCH_ALLOCATOR": "retain"},
        "thp": {"THP_MEM_ALLOC_ENABLE": "1", "VOCO_BENCH_ALLOCATOR": "system"},
        "no_thp": {"THP_MEM_ALLOC_ENABLE": "0", "VOCO_BENCH_ALLOCATOR": "system"},
    }
    if JEMALLOC.is_file():  # jemalloc that never returns freed pages
        setups["thp+jemalloc"] = {"THP_MEM_ALLOC_ENABLE": "1", "LD_PRELOAD": str(JEMALLOC),
                                  "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
                                  "VOCO_BENCH_ALLOCATOR": "system"}
    result: dict = {"preset": "tiny (13 crops of 40^3 per step, feature size 12), CPU",
                    "measured_steps": steps}
    for setup, extra_env in setups.items():
        for variant in ("full", "head", "none"):
            env = {**os.environ, **extra_env}
            command = [sys.executable, __file__, "--child-step", variant, "--steps", str(steps),
                       "--data", data]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            result[f"{variant}/{setup}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  step {variant}/{setup}: {result[f'{variant}/{setup}']}", file=sys.stderr)
    full = result["full/thp+retain"]["seconds_per_step"]
    head = result["head/thp+retain"]["seconds_per_step"]
    result["head_faster_than_full_percent"] = round(100 * (full / head - 1), 1)
    return result


def bench_adamw(repeats: int) -> dict:
    """One AdamW update (amsgrad) of the tiny backbone's parameters: the default
    (foreach) implementation against the fused kernel the trainers now build
    (``voco_core.train.common.adamw``), each on the same gradients, median of repeats."""
    import torch

    from voco_core.config import make_pretrain_config
    from voco_core.models import StudentTeacher

    config = make_pretrain_config("tiny", {"run": {"device": "cpu"}})
    params = [p for p in StudentTeacher(config.model).parameters() if p.requires_grad]
    optimizers = {}
    for name, options in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for copy in copies:
            copy.grad = torch.randn_like(copy)
        optimizers[name] = torch.optim.AdamW(copies, lr=1e-4, weight_decay=1e-5,
                                             amsgrad=True, **options)
    result = {"parameters": sum(p.numel() for p in params),
              "threads": torch.get_num_threads()}
    for name, optimizer in optimizers.items():
        result[name] = {"seconds_per_update": round(median_time(optimizer.step, repeats), 4)}
    result["speedup"] = round(result["foreach"]["seconds_per_update"]
                              / result["fused"]["seconds_per_update"], 2)
    return result


def bench_attention(repeats: int) -> dict:
    """A tiny training step (13 crops of 40^3, full teacher) with MONAI's window attention
    and with the memory-efficient one, alternating in one process (same load for both),
    glibc's freed memory retained as in training; plus the bytes autograd saves."""
    import torch

    from voco_core.attention import swap_window_attention, window_attention_backend
    from voco_core.config import make_pretrain_config
    from voco_core.losses import build_loss
    from voco_core.memory import (
        release_freed_memory,
        retain_freed_memory,
        saved_tensor_bytes,
    )
    from voco_core.models import StudentTeacher

    config = make_pretrain_config("tiny", {"run": {"device": "cpu"}})
    torch.manual_seed(0)
    model, loss_fn = StudentTeacher(config.model), build_loss(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    k, m = config.geometry.grid_size ** 2, config.geometry.num_random_crops
    crops = torch.rand(k + m, 1, 40, 40, 40, generator=g)
    labels = torch.rand(1, m, k, generator=g)

    def step():
        optimizer.zero_grad(set_to_none=True)
        student, teacher = model(crops)
        loss_fn(student[k:][None], teacher[k:][None], student[:k][None], teacher[:k][None],
                labels)["total"].backward()
        optimizer.step()

    # name -> (our class swapped in, its path): "sdpa" forces the GPU path on CPU
    variants = {"monai": (False, "auto"), "memory_efficient": (True, "auto"),
                "sdpa": (True, "sdpa")}
    saved = {}
    for name, (efficient, backend) in variants.items():
        swap_window_attention(model, efficient)
        with window_attention_backend(backend):
            saved[name] = round(saved_tensor_bytes(lambda: model(crops)) / 2**30, 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    retain_freed_memory()
    try:
        for round_ in range(repeats + 1):  # round 0 warms them up
            for name, (efficient, backend) in variants.items():
                swap_window_attention(model, efficient)
                with window_attention_backend(backend):
                    start = time.perf_counter()
                    step()
                if round_:
                    times[name].append(time.perf_counter() - start)
    finally:
        release_freed_memory()
    result = {"setup": "tiny step, 13 crops of 40^3, full teacher, one process, alternating",
              "threads": torch.get_num_threads(), "autograd_saved_gib": saved}
    for name, values in times.items():
        result[name] = {"seconds_per_step": round(statistics.median(values), 3),
                        "all": [round(v, 2) for v in values]}
    result["speed_ratio_monai_over_memory_efficient"] = round(
        result["monai"]["seconds_per_step"] / result["memory_efficient"]["seconds_per_step"], 3)
    return result


def bench_cuda(steps: int, data: str) -> dict:
    """base preset, bf16 autocast: s/step, crops/s, peak GPU memory, TFLOP/s, sampling share."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from voco_core.config import make_pretrain_config
    from voco_core.data.sampling import VoCoCropSampler
    from voco_core.losses import VoCoLoss
    from voco_core.models import StudentTeacher
    from voco_core.train.pretrain import iter_pretrain, voco_loss_on_batch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    result = {"device": torch.cuda.get_device_name(0)}
    for variant in ("full", "head"):
        config = make_pretrain_config("base", {"model": {"teacher": variant},
                                      "optim": {"total_steps": steps + 2},
                                      "run": {"device": "cuda", "tensorboard": False,
                                              "checkpoint_every": 10_000}})
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as run_dir:
            walls = [e.seconds_per_step for e in iter_pretrain(config, data, run_dir)
                     if e.kind == "step" and e.step > 2]
        result[variant] = {"seconds_per_step": round(statistics.median(walls), 3),
                           "crops_per_s": round(36 / statistics.median(walls), 1),
                           "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30,
                                                        2)}
    # FLOPs of one step's forward + backward (full teacher), and sampling on the device.
    config = make_pretrain_config("base", {"run": {"device": "cuda"}})
    model = StudentTeacher(config.model).cuda()
    sampler = VoCoCropSampler(config)
    volumes = [torch.rand(1, 384, 384, 96, device="cuda") for _ in range(2)]
    rngs = [np.random.default_rng(i) for i in range(2)]

    def sample():
        batch = sampler(volumes, rngs)
        torch.cuda.synchronize()
        return batch

    batch = sample()
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        voco_loss_on_batch(model, VoCoLoss(), batch)["total"].backward()
    flops = counter.get_total_flops()
    seconds = result["full"]["seconds_per_step"]
    result["flops_per_step"] = flops
    result["achieved_tflops"] = round(flops / seconds / 1e12, 1)
    result["sampling_ms"] = round(1000 * median_time(sample, 5), 2)
    result["sampling_percent_of_step"] = round(100 * result["sampling_ms"] / 1000 / seconds, 2)
    return result


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sections",
                        default="sampler,loss,steps,adamw,attention,memory,cache,cuda,authors")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="measured training steps")
    parser.add_argument("--data", help="phantom folder (default: made in a temp folder)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads here and in the child processes")
    parser.add_argument("--authors-repo", help="a checkout of Luffy03/VoCo for the authors "
                        "section (default: $VOCO_AUTHORS_REPO; without it the section skips)")
    parser.add_argument("--authors-geometry", metavar="VOLUMESxSIZE",
                        help="authors section: volumes per step x crop edge (default 1x40 "
                        "on CPU, 2x64 on CUDA; 16 base + 2 random crops per volume)")
    parser.add_argument("--authors-variants", help="our variants to time against theirs "
                        "(default full/ckpt,full/no_ckpt,head/ckpt,head/no_ckpt)")
    parser.add_argument("--levers-preset", choices=["tiny", "base"],
                        help="levers section's preset (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--levers-budget", type=float, default=420.0,
                        help="levers section: seconds after which the remaining rows skip")
    parser.add_argument("--child-step", help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:  # before torch starts its thread pool; children inherit it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.child_step:
        print(json.dumps(child_step(args.child_step, args.steps, args.data)))
        return
    if args.child_memory:
        from memory_bench import child_memory

        print(json.dumps(child_memory(args.child_memory, args.steps, args.data)))
        return

    import torch

    from authors_bench import bench_authors
    from authors_bench import summary as authors_summary
    from voco_core.data.phantoms import make_phantom_dataset

    if args.threads:
        torch.set_num_threads(args.threads)

    sections = set(args.sections.split(","))
    tmp = tempfile.TemporaryDirectory()
    needs_data = sections & {"steps", "cache", "cuda", "levers"}  # phantoms only where read
    data = args.data or (str(make_phantom_dataset(Path(tmp.name) / "ph", n=4, seed=0).parent)
                         if needs_data else None)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "repeats": args.repeats,
        "statistic": "median",
    }
    if "sampler" in sections:
        report["sampler"] = bench_sampler(args.repeats, args.device)
    if "loss" in sections:
        report["loss"] = bench_loss(args.repeats)
    if "steps" in sections and args.device == "cpu":
        report["steps"] = bench_steps(args.steps, data)
    if "attention" in sections:
        report["attention"] = bench_attention(args.repeats)
    if "adamw" in sections:
        report["adamw"] = bench_adamw(args.repeats)
    if "memory" in sections and args.device == "cpu":
        from memory_bench import bench_memory

        report["memory"] = bench_memory(args.steps)
    if "cache" in sections:
        from memory_bench import bench_cache

        report["cache"] = bench_cache(args.repeats, data)
    if "cuda" in sections and args.device == "cuda":
        report["cuda"] = bench_cuda(args.steps, data)
    if "levers" in sections:
        from levers_bench import bench_levers

        report["levers"] = bench_levers(args.device, args.levers_preset or (
            "base" if args.device == "cuda" else "tiny"), args.steps, data,
            budget_s=args.levers_budget)
    if "authors" in sections:
        volumes, crop_size = (map(int, args.authors_geometry.split("x"))
                              if args.authors_geometry else (None, None))
        report["authors"] = bench_authors(args.authors_repo, args.device, args.steps,
                                          variants=args.authors_variants, volumes=volumes,
                                          crop_size=crop_size)

    out = args.out or Path(__file__).parent / "results" / f"pretrain_bench_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    parts = []
    if "sampler" in report:
        s = report["sampler"]["augmented"]
        parts.append(f"sampler {s['speedup']}x per-crop MONAI ({s['one_pass_crops_per_s']} vs "
                     f"{s['per_crop_monai_crops_per_s']} crops/s)")
    if "loss" in report:
        parts.append(f"loss {report['loss']['speedup']}x loop")
    if "steps" in report:
        st = report["steps"]
        parts.append(f"tiny step full {st['full/thp+retain']['seconds_per_step']} s, head "
                     f"{st['head/thp+retain']['seconds_per_step']} s "
                     f"(+{st['head_faster_than_full_percent']}%)")
    if "attention" in report:
        a = report["attention"]
        parts.append(f"tiny step MONAI attention {a['monai']['seconds_per_step']} s vs "
                     f"memory-efficient {a['memory_efficient']['seconds_per_step']} s, SDPA "
                     f"{a['sdpa']['seconds_per_step']} s, saved "
                     f"{a['autograd_saved_gib']['monai']} -> "
                     f"{a['autograd_saved_gib']['memory_efficient']} GiB")
    if "adamw" in report:
        a = report["adamw"]
        parts.append(f"AdamW update fused {a['fused']['seconds_per_update']} s vs foreach "
                     f"{a['foreach']['seconds_per_update']} s ({a['speedup']}x)")
    if "memory" in report:
        m = {k: v["peak_rss_gib"] for k, v in report["memory"].items() if isinstance(v, dict)}
        parts.append(f"tiny on 4 heads: pretraining peak {m['pretrain/memory_efficient/retain']}"
                     f" GiB (MONAI attention {m['pretrain/monai/retain']}), finetuning 117 "
                     f"classes {m['finetune/memory_efficient/retain']} GiB")
    if "cache" in report:
        c = report["cache"]["base"]
        parts.append(f"cache {c['compact_fraction_of_float32']} of float32, max err "
                     f"{c['max_abs_error']}")
    if "cuda" in report and "skipped" not in report["cuda"]:
        parts.append(f"cuda base {report['cuda']['full']['seconds_per_step']} s/step, "
                     f"{report['cuda']['achieved_tflops']} TFLOP/s")
    if "levers" in report:
        from levers_bench import summary as levers_summary

        parts.append(levers_summary(report["levers"]))
    if "authors" in report:
        parts.append(authors_summary(report["authors"]))
    print("pretrain_bench: " + "; ".join(parts) + f" -> {out}")


if __name__ == "__main__":
    main()
