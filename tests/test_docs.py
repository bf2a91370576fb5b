"""The documentation cannot drift from the code.

- ``test_site_builds_strictly``: ``mkdocs build --strict`` (mkdocs.yml) fails on any
  warning: a dead link or anchor, a page missing from the nav or the nav naming a
  missing page, an API reference (mkdocstrings) that no longer resolves.
- ``test_tutorial_runs``: every ```` ```bash ```` block of docs/tutorial.md runs, in
  page order, in one temporary working folder, and must exit 0.

How the tutorial is shrunk. The page shows the commands a user runs (hundreds of
steps, 160 x 160 x 96 phantoms); the test runs the same text with ``voco`` on PATH
replaced by a wrapper that calls the real CLI with the flags of :data:`TINY` appended
for its subcommand. argparse keeps the last value of a repeated option, and later
``--set`` overrides win, so the appended flags replace the page's ``--steps``,
``--folds``, ... and shrink the model's geometry: a few minutes of CPU become seconds.
Nothing else of the page is changed. Every entry of :data:`TINY` must be used by
the page (a subcommand the page no longer runs fails the test: update the table).

The page's MRI section works on the user's own folder ``my_mri/`` (there is no MRI
phantom): :func:`make_mri_folder` writes one in the working folder first, from CT
phantoms shifted to non-negative values (what ``data.intensity: auto`` takes as
non-CT), in the layout the page describes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_SWIN_SETS

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"

# Tiny settings per subcommand, appended to the page's command lines.
_NO_TENSORBOARD = ["--set", "run.tensorboard=false"]  # its import alone is 1.5 s
_TINY_FINETUNE = [
    "--steps", "1",
    *TEST_SWIN_SETS,
    *_NO_TENSORBOARD,
    "--set", "data.spacing=null",            # the tiny phantoms' own 6.25 mm voxels
    "--set", "train.samples_per_volume=1",
    "--set", "train.sw_overlap=0",
    "--set", "train.sw_batch_size=1",
]
TINY: dict[str, list[str]] = {
    "make-phantoms": ["--shape", "64", "64", "48"],
    "pretrain": [
        "--steps", "1",
        # the smallest VoCo geometry (tests/conftest.py tiny_config)
        "--set", "data.target_size=[80,80,40]",
        "--set", "geometry.grid_size=2",
        "--set", "geometry.num_random_crops=2",
        "--set", "model.head_hidden_dim=64",
        "--set", "model.head_out_dim=64",
        *TEST_SWIN_SETS,
        *_NO_TENSORBOARD,
    ],
    "finetune": _TINY_FINETUNE,
    "compare": [*_TINY_FINETUNE, "--folds", "2", "--seeds", "1"],
    "predict": ["--overlap", "0"],
}

WRAPPER = """#!{python}
# voco, with the tiny flags of tests/test_docs.py TINY appended (see its docstring)
import json, os, sys
from voco_core.cli import main
args = sys.argv[1:]
tiny = json.loads(os.environ["VOCO_DOCS_TINY"])
extra = tiny.get(args[0], []) if args else []
with open(os.environ["VOCO_DOCS_USED"], "a") as used:
    used.write(args[0] + "\\n" if args else "\\n")
sys.exit(main(args + extra))
"""


def bash_blocks(markdown: str) -> list[str]:
    """The contents of every fenced ```` ```bash ```` block, in page order."""
    return [m.group(1) for m in re.finditer(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", markdown,
                                            flags=re.DOTALL | re.MULTILINE)]


def make_mri_folder(root: Path) -> None:
    """``my_mri/scans/*.nii.gz`` (unlabelled) and ``my_mri/labelled/`` (a Decathlon
    folder with labels and names): CT phantoms + 1024, clipped at 0, as uint16, so
    no voxel looks like air in Hounsfield units."""
    import nibabel as nib
    import numpy as np

    from voco_core.data.phantoms import make_phantom_dataset

    source = root / ".mri_source"
    make_phantom_dataset(source, n=3, seed=5, shape=(64, 64, 48))
    (root / "my_mri" / "scans").mkdir(parents=True)
    labelled = root / "my_mri" / "labelled"
    (labelled / "imagesTr").mkdir(parents=True)
    (labelled / "labelsTr").mkdir()
    names = json.loads((source / "dataset.json").read_text())["labels"]
    training = []
    for i, path in enumerate(sorted((source / "imagesTr").glob("*.nii.gz"))):
        ct = nib.load(path)
        mri = np.clip(np.asarray(ct.dataobj, dtype=np.int32) + 1024, 0, None).astype(np.uint16)
        image = nib.Nifti1Image(mri, ct.affine)
        nib.save(image, root / "my_mri" / "scans" / f"scan_{i:03d}.nii.gz")
        nib.save(image, labelled / "imagesTr" / f"case_{i:03d}.nii.gz")
        label = nib.load(source / "labelsTr" / path.name)
        nib.save(label, labelled / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz",
                         "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (labelled / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "MRI"}, "labels": names, "training": training}, indent=1))


def test_tutorial_has_runnable_blocks():
    blocks = bash_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 6, "docs/tutorial.md lost its ```bash blocks"
    commands = {line.split()[1] for block in blocks for line in block.splitlines()
                if line.strip().startswith("voco ")}
    assert set(TINY) <= commands, f"TINY names subcommands the page no longer runs: " \
                                  f"{sorted(set(TINY) - commands)}"


@pytest.mark.slow
def test_tutorial_runs(tmp_path):
    """Every ```bash block of docs/tutorial.md, in order, with the tiny settings."""
    blocks = bash_blocks(TUTORIAL.read_text())
    work = tmp_path / "tutorial"
    work.mkdir()
    make_mri_folder(work)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "voco"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    used = tmp_path / "used.txt"
    env = {**os.environ,
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")]),
           "VOCO_DOCS_TINY": json.dumps(TINY), "VOCO_DOCS_USED": str(used),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    timings = []
    for index, block in enumerate(blocks, 1):
        start = time.perf_counter()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600)
        timings.append(f"block {index}: {time.perf_counter() - start:.1f} s")
        assert result.returncode == 0, (
            f"docs/tutorial.md ```bash block {index} exited {result.returncode}:\n{block}\n"
            f"--- output (tail) ---\n{(result.stdout + result.stderr)[-4000:]}")
    print("; ".join(timings))
    ran = set(used.read_text().split())
    assert set(TINY) <= ran, f"TINY entries the page never ran: {sorted(set(TINY) - ran)}"


def test_readme_links_exist():
    """README.md is not part of the site: its relative links are checked here."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    dead = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not dead, f"README.md links to missing files: {dead}"


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: any warning (dead link, missing page, broken API
    reference) fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert result.returncode == 0 and not warnings, output[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
