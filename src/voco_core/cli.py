"""The ``voco`` command line.

Every expected failure (bad file, bad flag value) ends with one line on stderr,
``voco: error: <message>``, and exit status 1; usage errors exit with 2
(argparse's convention). No traceback for either.

Also runnable as ``python -m voco_core.cli`` (what ``torchrun`` needs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from voco_core import __version__
from voco_core.errors import VoCoConfigError, VoCoError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


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
    start = time.perf_counter()
    dataset_json = make_phantom_dataset(
        args.out, n=args.n, seed=args.seed, shape=tuple(args.shape),
        spacing=tuple(args.spacing) if args.spacing else None,
    )
    print(
        f"wrote {args.n} phantoms of shape {tuple(args.shape)} to {args.out} "
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
    print(f"shape        {' x '.join(map(str, summary['shape']))} voxels ({summary['dtype']})")
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
        help="voxel size in mm (default: a 400 x 400 x 288 mm field of view / shape)",
    )
    phantoms.set_defaults(func=_cmd_make_phantoms)

    info = commands.add_parser("info", help="print shape, spacing, orientation, intensities")
    info.add_argument("file", type=Path, help="a .nii or .nii.gz file")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_info)
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
