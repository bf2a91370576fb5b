"""The ``voco`` command line.

Every expected failure (bad file, bad flag value, a full disk, an output folder
another run is writing to) ends with one line on stderr, ``voco: error: <message>``,
and exit status 1; usage errors exit with 2 (argparse's convention). No traceback
for either. Training stopped by Ctrl-C or SIGTERM writes a checkpoint, prints
``stopped at step N/M; checkpoint ... (resume with --resume RUN)`` and exits with
130 or 143 (128 + the signal number).

Also runnable as ``python -m voco_core.cli`` (what ``torchrun`` needs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from voco_core import __version__
from voco_core.errors import VoCoConfigError, VoCoError


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _positive_ints(text: str) -> tuple[int, ...]:
    """``1,2,4,8``: increasing whole numbers >= 1."""
    values = tuple(_positive_int(part) for part in text.split(","))
    if list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing numbers, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _cmd_make_phantoms(args: argparse.Namespace) -> int:
    from voco_core.data.phantoms import make_phantom_dataset

    if min(args.shape) < 16:
        raise VoCoConfigError(f"--shape: each size must be at least 16 voxels, got {args.shape}")
    if args.spacing and args.style != "classic":
        raise VoCoConfigError(f"--spacing: not with --style {args.style}, whose subjects each "
                              "take their voxel size from their own field of view and scan range")
    start = time.perf_counter()
    dataset_json = make_phantom_dataset(
        args.out, n=args.n, seed=args.seed, shape=tuple(args.shape),
        spacing=tuple(args.spacing) if args.spacing else None, overwrite=args.overwrite,
        style=args.style,
    )
    style = "" if args.style == "classic" else f"{args.style} "
    print(
        f"wrote {args.n} {style}phantoms of shape {tuple(args.shape)} to {args.out} "
        f"({dataset_json.name}, imagesTr/, labelsTr/) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from voco_core.data.io import read_volume

    summary = read_volume(args.file).describe()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"file         {summary['file']}")
    kind = "Labels" if summary["kind"] == "label map" else "Image"
    print(f"opens as     {kind} ({summary['kind_reason']})")
    print(f"shape        {' x '.join(map(str, summary['shape']))} voxels ({summary['dtype']})")
    print(f"channels     {summary['channels']}")
    print(f"spacing      {' x '.join(f'{s:g}' for s in summary['spacing_mm'])} mm")
    print(f"extent       {' x '.join(f'{s:g}' for s in summary['extent_mm'])} mm")
    print(f"orientation  {summary['orientation']}")
    print(
        f"intensity    min {summary['intensity_min']:g}, max {summary['intensity_max']:g}, "
        f"mean {summary['intensity_mean']:.4g}"
    )
    if "label_voxels" in summary:
        print(f"labels       {summary['label_voxels']}")
    return 0


def _flag_overrides(args: argparse.Namespace, steps_section: str) -> dict:
    """``--set``, ``--steps`` (``<steps_section>.total_steps``) and ``--device`` as one
    nested override dict (later flags win)."""
    from voco_core.config import merge, parse_override

    flags: dict = {}
    for text in args.set or []:
        flags = merge(flags, parse_override(text))
    if args.steps is not None:
        flags = merge(flags, {steps_section: {"total_steps": args.steps}})
    if args.device is not None:
        flags = merge(flags, {"run": {"device": args.device}})
    return flags


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from voco_core.plan import plan_pretrain

    plan = plan_pretrain(preset=args.preset, config_file=args.config, resume=args.resume,
                         overrides=_flag_overrides(args, "optim"), out=args.out,
                         overwrite=args.overwrite)
    return _run(plan, args.data)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from voco_core.plan import plan_continue, plan_finetune

    if args.continue_from is not None:
        for flag, value in (("--resume", args.resume), ("--pretrained", args.pretrained),
                            ("--preset", args.preset), ("--config", args.config)):
            if value is not None:
                raise VoCoConfigError(f"{flag} and --continue-from exclude each other: a "
                                      "continued run takes its parent's config and network")
        plan = plan_continue(args.continue_from, overrides=_flag_overrides(args, "train"),
                             out=args.out, overwrite=args.overwrite)
    else:
        plan = plan_finetune(preset=args.preset, config_file=args.config, resume=args.resume,
                             overrides=_flag_overrides(args, "train"), out=args.out,
                             pretrained=args.pretrained, overwrite=args.overwrite)
    return _run(plan, args.data)


class _StopOnSignals:
    """SIGTERM (what ``kill`` and SLURM send) and a first Ctrl-C set the trainer's stop
    flag: the step in progress finishes, a checkpoint is written and the loop ends with
    ``stopped``. A second Ctrl-C abandons the step (KeyboardInterrupt; the trainer still
    saves the steps completed). ``exit_code``: 128 + the signal number (130, 143)."""

    def __init__(self) -> None:
        import threading

        self.flag = threading.Event()
        self.signal: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _StopOnSignals:
        import signal

        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        import signal

        if self.flag.is_set() and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or number
        self.flag.set()
        print(f"\n{signal.Signals(number).name}: stopping after the current step and writing "
              "a checkpoint" + (" (Ctrl-C again to abandon the step)"
                                if number == signal.SIGINT else ""), file=sys.stderr)

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal else 1


def _run(plan, data) -> int:
    """Run a plan with a tqdm progress bar; print how it ended. Exit status 0 when it
    finished, 130/143 when Ctrl-C/SIGTERM stopped it (a checkpoint is written)."""
    from tqdm import tqdm

    from voco_core.run_folder import RunFolder
    from voco_core.train.child import iter_plan

    for note in plan.notes:
        print(note)
    folder = RunFolder(plan.run_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun: only rank 0 reports
    bar, last = None, None
    with _StopOnSignals() as signals:
        events = iter_plan(plan, data, stop=signals.flag)
        try:
            for event in events:
                last = event
                if not rank0:
                    continue
                if event.kind == "start":
                    print(_start_line(plan, event))
                    if event.message:
                        print(event.message)
                elif event.kind == "step":
                    if bar is None:  # created after the first step: earlier errors stay one line
                        bar = tqdm(total=event.total_steps, initial=event.step,
                                   unit="step", desc=plan.kind, dynamic_ncols=True)
                    else:  # (created with this step counted: no first tick of ~0 s)
                        bar.update(event.step - bar.n)
                    bar.set_postfix(_postfix(event))
                    for line in event.message.splitlines():  # one note per line
                        bar.write(f"step {event.step}: {line}")
                elif event.kind == "validation":
                    (bar.write if bar else print)(_validation_line(event))
                    if bar is not None:  # the bar shows this validation now, not at the next step
                        bar.set_postfix(_postfix(event))
        except KeyboardInterrupt:  # a second Ctrl-C: the trainer saved what it completed
            signals.signal = signals.signal or 2
        finally:
            if bar is not None:
                bar.close()
    if last is None or not rank0:
        return 0 if last is not None and last.kind == "done" else signals.exit_code
    if last.kind == "done":
        print(f"finished at step {last.step}/{last.total_steps}{_result(plan, last)}; "
              f"checkpoint {folder.last}; "
              f"{'loss curve' if plan.kind == 'pretrain' else 'curves'} "
              f"{folder.loss_figure if plan.kind == 'pretrain' else folder.curves_figure}")
        return 0
    from voco_core.checkpoint import saved_step

    step = saved_step(folder, last.step)  # after an abandoned step, what is on disk
    print(f"stopped at step {step}/{last.total_steps}{_result(plan, last)}; checkpoint "
          f"{folder.last} (resume with --resume {folder.root})")
    return signals.exit_code


def _start_line(plan, event) -> str:
    config = plan.config
    what = (f"pretraining ({config.preset} preset, teacher {config.model.teacher}, loss "
            f"{config.loss.variant})" if plan.kind == "pretrain"
            else f"finetuning ({config.preset} preset)")
    return (f"{what} from step {event.step} to {event.total_steps}; "
            f"run folder {plan.run_dir}")


def _postfix(event) -> dict[str, str]:
    if hasattr(event, "crops_per_second"):
        return {"loss": f"{event.loss:.4f}", "lr": f"{event.lr:.2e}",
                "crops_s": f"{event.crops_per_second:.1f}"}
    postfix = {"loss": f"{event.loss:.4f}"}
    if math.isfinite(event.mean_dice):  # the last validation (carried on later steps)
        postfix["val_dice"] = f"{event.mean_dice:.3f}"
    if event.best_dice is not None and math.isfinite(event.best_dice):
        postfix["best_dice"] = f"{event.best_dice:.3f}"
    return postfix


def _validation_line(event) -> str:
    worst = sorted(event.class_dice.items(), key=lambda kv: kv[1] or 0)[:3]
    text = ", ".join(f"{k} {v:.3f}" for k, v in worst if v is not None)
    return (f"step {event.step}: validation mean Dice {event.mean_dice:.4f} "
            f"(best {event.best_dice:.4f} at step {event.best_step}; lowest: {text})")


def _result(plan, last) -> str:
    if plan.kind == "pretrain":
        return f", loss {last.loss:.4f}"
    best = last.best_dice if last.best_dice is not None else float("nan")
    return f"; best mean Dice {best:.4f} (step {last.best_step})"


def _inputs(path: Path) -> list:
    """The images to predict: a file, a DICOM series folder, a folder's volumes
    (NIfTI/NRRD/MetaImage files and DICOM series subfolders, sorted by name), or the
    images of a Decathlon-style JSON datalist (its ``test`` list, else ``training``;
    an image there may be a list of channel files)."""
    from voco_core.data.datalists import load_datalist, read_dataset_json
    from voco_core.data.readers.sources import looks_like_dicom_folder, volume_sources
    from voco_core.errors import VoCoDataError

    if path.is_dir():
        if looks_like_dicom_folder(path):
            return [path]
        files = volume_sources(path, "image")
        if not files:
            raise VoCoDataError("no NIfTI files (*.nii, *.nii.gz), NRRD/MetaImage files or "
                                "DICOM series found in this folder", path)
        return files
    if not path.is_file():
        raise VoCoDataError("input file or folder not found", path)
    if path.suffix.lower() == ".json":
        section = "test" if isinstance(read_dataset_json(path).get("test"), list) else "training"
        return [entry.image for entry in load_datalist(path, section=section)]
    return [path]


def _prediction_stems(files: list) -> list[Path]:
    """Each input's output name, without suffix, relative to ``--out``: its own name
    (``case_001`` for ``case_001.nii.gz``), or, where two inputs share a name (the KiTS
    layout ``case_00000/imaging.nii.gz``), its folders below the inputs' common folder
    too (``case_00000/imaging``). Inputs that still clash (``case.nii.gz`` and
    ``case.nrrd`` in one folder) are refused before anything is written."""
    from voco_core.data.readers.sources import volume_stem

    firsts = [Path(f[0] if isinstance(f, list | tuple) else f) for f in files]
    stems = [Path(volume_stem(f)) for f in firsts]
    common = Path(os.path.commonpath([str(f.resolve().parent) for f in firsts]))
    clashing = {s for s in stems if stems.count(s) > 1}
    stems = [f.resolve().parent.relative_to(common) / s.name if s in clashing else s
             for f, s in zip(firsts, stems, strict=True)]
    for i, stem in enumerate(stems):
        if stems.index(stem) != i:
            other = firsts[stems.index(stem)]
            raise VoCoConfigError(f"--input: {other} and {firsts[i]} would both be written as "
                                  f"{stem}_seg.nii.gz; rename one or predict them separately")
    return stems


class _WindowProgress:
    """``segment``'s progress as a bar on stderr (windows done, time left), shown from
    the first window on, so an input refused before any window stays one error line;
    gone once the volume is written."""

    def __init__(self, name: str):
        self.name, self.bar = name, None

    def __call__(self, done: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.name, leave=False, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}% of windows |{bar}| "
                                       "{elapsed} elapsed, {remaining} left")
        self.bar.update(round(100 * done) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_predict(args: argparse.Namespace) -> int:
    from voco_core.data.io import read_volume, write_volume
    from voco_core.data.readers.itk import write_itk_volume
    from voco_core.data.readers.sources import file_format
    from voco_core.inference import load_segmenter, segment
    from voco_core.outputs import refuse_existing

    files = _inputs(args.input)
    stems = _prediction_stems(files)
    segmenter = load_segmenter(args.checkpoint, args.device)
    print(f"model {segmenter.source}: {segmenter.config.data.num_classes} classes "
          f"({', '.join(segmenter.class_names[1:])})")

    def outputs(source, stem: Path) -> dict[str, Path]:
        first = source[0] if isinstance(source, list | tuple) else source
        named = {"labels": args.out / f"{stem}_seg.nii.gz"}
        native = {"NRRD": ".nrrd", "MetaImage": ".mha"}.get(file_format(first))
        if native is not None:  # also in the input's format, on the same grid
            named["native"] = args.out / f"{stem}_seg{native}"
        if args.probabilities:
            named.update({f"prob {name}": args.out / f"{stem}_prob_{name}.nii.gz"
                          for name in segmenter.class_names})
        return named

    planned = [outputs(source, stem) for source, stem in zip(files, stems, strict=True)]
    refuse_existing([path for named in planned for path in named.values()], args.overwrite)
    for source, named in zip(files, planned, strict=True):  # a path or channel files
        start = time.perf_counter()
        record = read_volume(source)
        progress = _WindowProgress(record.name)
        try:
            result = segment(record, segmenter, overlap=args.overlap,
                             probabilities=args.probabilities, progress=progress)
        finally:
            progress.close()
        write_volume(named["labels"], result.labels, record)
        written = str(named["labels"])
        if "native" in named:
            write_itk_volume(named["native"], result.labels, record.affine)
            written += f" and {named['native'].name}"
        if result.probabilities is not None:
            import numpy as np

            for c, name in enumerate(result.class_names):
                write_volume(named[f"prob {name}"],
                             result.probabilities[c].astype(np.float32), record)
        print(f"{record.path.name} -> {written} ({time.perf_counter() - start:.1f} s; "
              f"intensity: {result.intensity})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from voco_core.export import export_run

    start = time.perf_counter()
    result = export_run(args.run, args.out, format=args.format, overwrite=args.overwrite,
                        authors=args.authors, license=args.license)
    print(f"wrote a MONAI Bundle of {result.checkpoint} to {result.path} "
          f"({len(result.class_names)} classes: {', '.join(result.class_names[1:])}; "
          f"intensity {result.intensity}) in {time.perf_counter() - start:.1f} s; run it with: "
          f"python -m monai.bundle run --config_file {result.path / 'configs' / 'inference.json'}"
          f" --bundle_root {result.path} --dataset_dir IMAGES --output_dir LABELS")
    return 0


def _cmd_positions(args: argparse.Namespace) -> int:
    from voco_core.data.io import read_volume
    from voco_core.data.readers.sources import volume_stem
    from voco_core.inference import plot_positions, position_report, positions
    from voco_core.outputs import refuse_existing, write_json

    stem = volume_stem(args.input)
    json_path, png_path = (args.out / f"{stem}_positions.json",
                           args.out / f"{stem}_positions.png")
    refuse_existing([json_path, png_path], args.overwrite)
    record = read_volume(args.input)
    result = positions(record, args.checkpoint, n=args.n, seed=args.seed, device=args.device)
    report = {"input": str(args.input), "checkpoint": str(args.checkpoint),
              **position_report(result)}
    write_json(json_path, report)
    png = plot_positions(result, png_path)
    print(f"{len(result.predicted)} sub-volumes: top-1 accuracy {report['top1_accuracy']:.3f} "
          f"(chance {report['chance_top1']:.3f}), mean |error| {report['mean_abs_error']:.3f}; "
          f"{json_path}, {png}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from voco_core.evaluation import CompareSettings, compare, headline

    settings = CompareSettings(folds=args.folds, labelled=args.labelled or (),
                               held_out=args.held_out, seeds=args.seeds,
                               first_seed=args.first_seed, jobs=args.jobs,
                               steps=args.steps,
                               val_every=args.val_every, preset=args.preset,
                               overrides=_flag_overrides(args, "train"))
    start = time.perf_counter()
    with _StopOnSignals() as signals:  # Ctrl-C, SIGTERM: every run stops after its step
        record = compare(args.data, args.pretrained, args.out, settings, stop=signals.flag)
    if record.get("status") == "stopped":
        return signals.exit_code
    figure = "labelled.png" if settings.labelled else "classes.png"
    print(f"{args.out / 'compare.json'}, {args.out / 'curves.png'}, "
          f"{args.out / figure} ({(time.perf_counter() - start) / 60:.1f} min)")
    print(headline(record))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from voco_core.data.phantoms import make_phantom_dataset
    from voco_core.plan import plan_pretrain
    from voco_core.run_folder import RunFolder, read_log

    folder = RunFolder(args.out)
    data = Path(args.data)
    # Flips and rot90 drawn independently per crop (the spec's augmentation) make the
    # pretext task need orientation invariance, which a few CPU minutes do not learn
    # (docs/benchmarks.md). The demo keeps the intensity shift and says so.
    plan = plan_pretrain(preset="tiny", out=folder.root, overwrite=args.overwrite, overrides={
        "optim": {"total_steps": args.steps}, "augment": {"flip_prob": 0.0, "rot90_prob": 0.0},
        "run": {"device": "cpu"}})
    if not (data / "dataset.json").is_file():  # after planning: a refused run writes nothing
        make_phantom_dataset(data, n=args.phantoms, seed=0)
        print(f"wrote {args.phantoms} phantoms to {data}")
    print("demo: tiny preset on CPU without flip/rot90 augmentation (see docs/pretraining.md)")
    start = time.perf_counter()
    status = _run(plan, data)
    records = read_log(folder.log) if folder.log.is_file() else []
    if status == 0 and len(records) >= 10:
        window = max(3, len(records) // 5)
        first = sum(r["loss"] for r in records[:window]) / window
        final = sum(r["loss"] for r in records[-window:]) / window
        print(f"mean loss of the first {window} steps {first:.4f} -> last {window} {final:.4f} "
              f"({time.perf_counter() - start:.0f} s)")
    return status


def _add_run_options(parser: argparse.ArgumentParser, kind: str, example: str) -> None:
    """The options ``voco pretrain`` and ``voco finetune`` share."""
    parser.add_argument("--out", type=Path,
                        help=f"run folder (default: a new runs/{kind}-<time>)")
    parser.add_argument("--preset", choices=["tiny", "base", "large", "huge"],
                        help="model preset (default: base with CUDA, tiny on CPU)")
    parser.add_argument("--config", type=Path, help=f"YAML/JSON {kind} config file")
    parser.add_argument("--steps", type=_positive_int, help="total optimizer steps")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                        help=f"override any config field, e.g. --set {example} (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move a run already in --out aside (RUN.old-<time>) and start anew")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voco", description="VoCo volume-contrastive pretraining for 3D medical images."
    )
    parser.add_argument("--version", action="version", version=f"voco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    phantoms = commands.add_parser(
        "make-phantoms", help="write synthetic CT torso phantoms (Decathlon layout)"
    )
    phantoms.add_argument("--out", type=Path, required=True, help="output folder")
    phantoms.add_argument("-n", type=_positive_int, default=20, help="number of subjects")
    phantoms.add_argument("--seed", type=int, default=0, help="population seed")
    phantoms.add_argument(
        "--shape", type=_positive_int, nargs=3, default=[160, 160, 96], metavar=("X", "Y", "Z"),
        help="voxels per axis (default 160 160 96)",
    )
    phantoms.add_argument(
        "--spacing", type=_positive_float, nargs=3, metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: a 400 x 400 x 288 mm field of view / shape); "
             "classic style only",
    )
    phantoms.add_argument(
        "--style", choices=["classic", "varied"], default="classic",
        help="classic (default): every subject from one protocol, 400 x 400 x 288 mm, all "
             "organs (recorded results reproduce). varied: each subject a different "
             "examination: chest, abdomen or both, patient size and position, deformed and "
             "resized organs, an absent kidney or spleen, liver lesions (labelled liver), "
             "contrast phase, noise and slice thickness; voxel size per subject from its "
             "field of view (docs/data.md, Varied phantoms)",
    )
    phantoms.add_argument("--overwrite", action="store_true",
                             help="replace phantom files already in --out")
    phantoms.set_defaults(func=_cmd_make_phantoms)

    info = commands.add_parser("info", help="print shape, spacing, orientation, intensities")
    info.add_argument("file", type=Path,
                      help="a NIfTI, NRRD or MetaImage file or a DICOM series folder")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_info)

    pre = commands.add_parser("pretrain", help="VoCo self-supervised pretraining")
    pre.add_argument("--data", type=Path, required=True,
                     help="folder of volumes (NIfTI, NRRD, MetaImage, DICOM series "
                          "subfolders), Decathlon folder or dataset.json")
    _add_run_options(pre, "pretrain", "optim.lr=3e-4")
    pre.add_argument("--resume", type=Path, help="run folder or checkpoint to continue")
    pre.set_defaults(func=_cmd_pretrain)

    fine = commands.add_parser("finetune", help="finetune SwinUNETR for segmentation")
    fine.add_argument("--data", type=Path, required=True,
                      help="Decathlon folder (imagesTr/labelsTr) or dataset.json with labels")
    fine.add_argument("--pretrained", type=Path,
                      help="VoCo checkpoint for the encoder (own run folder/file or released)")
    _add_run_options(fine, "finetune", "train.lr=1e-4")
    fine.add_argument("--resume", type=Path, help="finetuning run folder or last.pt to continue")
    fine.add_argument("--continue-from", type=Path, metavar="RUN",
                      help="new run starting from a finetuned run's network (best.pt) with "
                           "the current labels (correct-and-retrain); default --out RUN_r2")
    fine.set_defaults(func=_cmd_finetune)

    predict = commands.add_parser(
        "predict", help="segment volumes with a finetuned model (writes NIfTI)")
    predict.add_argument("--checkpoint", type=Path, required=True,
                         help="finetuning run folder or checkpoint (best.pt / last.pt)")
    predict.add_argument("--input", type=Path, required=True,
                         help="a volume file, a DICOM series folder, a folder of volumes, or a "
                              "Decathlon JSON datalist (its test list, else training; channel "
                              "files listed together make one image)")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1)")
    predict.add_argument("--probabilities", action="store_true",
                         help="also write one probability map per class")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    predict.add_argument("--overwrite", action="store_true",
                            help="replace output files that already exist")
    predict.set_defaults(func=_cmd_predict)

    export = commands.add_parser("export",
                                 help="write a finetuned run as a MONAI Bundle (runs with MONAI "
                                      "alone)")
    export.add_argument("run", type=Path,
                        help="finetuning run folder (its best.pt, else last.pt) or checkpoint")
    export.add_argument("--format", default="monai-bundle",
                        help="export format: monai-bundle (the default and only one)")
    export.add_argument("--out", type=Path, required=True,
                        help="bundle folder to create (must not exist or be empty)")
    export.add_argument("--overwrite", "--force", action="store_true", dest="overwrite",
                        help="replace an existing non-empty --out (never the run exported)")
    export.add_argument("--authors", help="the model's authors (metadata.json)")
    export.add_argument("--license", help="the model's license (metadata.json, docs/license.txt)")
    export.set_defaults(func=_cmd_export)

    pos = commands.add_parser("positions",
                              help="VoCo position predictions for random sub-volumes of a file")
    pos.add_argument("--checkpoint", type=Path, required=True,
                     help="pretraining run folder or checkpoint")
    pos.add_argument("--input", type=Path, required=True,
                     help="a NIfTI, NRRD or MetaImage file or a DICOM series folder")
    pos.add_argument("--n", type=_positive_int, default=32, help="sub-volumes to sample")
    pos.add_argument("--seed", type=int, default=0)
    pos.add_argument("--out", type=Path, required=True, help="output folder (JSON + PNG)")
    pos.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    pos.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist")
    pos.set_defaults(func=_cmd_positions)

    comp = commands.add_parser(
        "compare", help="does a pretraining help on your labelled cases? (paired K-fold "
                        "finetuning, scratch vs VoCo, read at the plateau)")
    comp.add_argument("--data", type=Path, required=True,
                      help="labelled cases: Decathlon folder (imagesTr/labelsTr) or dataset.json")
    comp.add_argument("--pretrained", type=Path, required=True,
                      help="the VoCo pretraining run folder or checkpoint to judge")
    comp.add_argument("--out", type=Path, required=True,
                      help="comparison folder (runs/, compare.json, curves.png, classes.png); "
                           "run the same command again to resume it")
    comp.add_argument("--folds", type=_positive_int,
                      help="folds over the cases (default: min(5, cases))")
    comp.add_argument("--labelled", type=_positive_ints, metavar="N,N,...",
                      help="the other design: Dice against labelled cases, e.g. 1,2,4,8; "
                           "every run validates on the same --held-out cases and trains on "
                           "the first N of the others")
    comp.add_argument("--held-out", type=_positive_int,
                      help="cases held out for every run of --labelled (default 2; the "
                           "last ones in the datalist)")
    comp.add_argument("--seeds", type=_positive_int, default=1,
                      help="paired seeds per fold (default 1)")
    comp.add_argument("--first-seed", type=_non_negative_int, default=0,
                      help="run seeds FIRST .. FIRST+SEEDS-1 (default 0): split a comparison "
                           "over machines, or add seeds later; copy the parts' runs/ into one "
                           "--out and run it with the whole range to read them back together")
    comp.add_argument("--jobs", type=_positive_int, default=1,
                      help="runs at once, each in its own process with a share of the CPU "
                           "threads (default 1)")
    comp.add_argument("--steps", type=_positive_int,
                      help="finetuning steps of every run (default: the preset's); long "
                           "enough for the curves to flatten")
    comp.add_argument("--val-every", type=_positive_int,
                      help="steps between held-out validations (default: a tenth of --steps)")
    comp.add_argument("--preset", choices=["tiny", "base", "large", "huge"],
                      help="finetuning preset (default: base with CUDA, tiny on CPU)")
    comp.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    comp.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                      help="finetuning config override for both arms (repeatable)")
    comp.set_defaults(func=_cmd_compare)

    demo = commands.add_parser(
        "demo", help="headless demo: phantoms (if absent) + a few minutes of tiny pretraining")
    demo.add_argument("--data", type=Path, default=Path("data/phantoms"))
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--steps", type=_positive_int, default=60)
    demo.add_argument("--phantoms", type=_positive_int, default=8)
    demo.add_argument("--overwrite", action="store_true",
                         help="move a run already in --out aside (RUN.old-<time>)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VoCoError as err:
        print(f"voco: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("voco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
