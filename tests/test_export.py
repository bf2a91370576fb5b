"""``voco export --format monai-bundle``: a finetuned run as a MONAI Bundle that MONAI's
own runner executes with the labels ``voco predict`` writes, on the source grid.

The tiny session run (``finetune_run``: SwinUNETR feature size 12, 64^3 windows) on
64 x 64 x 48 phantoms; variants of its checkpoint with other pre-processing settings
(same weights) cover the CT window, resampling and percentiles on an MRI-like volume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_core.cli import main
from voco_core.data.io import read_volume
from voco_core.errors import VoCoDataError
from voco_core.export import export_run
from voco_core.inference import segment

from conftest import one_line_error, save_nifti

AGREEMENT = 0.999
"""Share of voxels on which the bundle's label map must equal ``voco predict``'s (the
bundle runs MONAI's window attention, voco its chunked twin: equal to float rounding,
so only near-ties may flip)."""
SPEC_KEYS = {"version", "monai_version", "pytorch_version", "numpy_version", "task",
             "description", "authors", "copyright", "network_data_format"}
"""metadata.json's mandatory keys (MONAI Bundle specification)."""
TENSOR_KEYS = {"type", "format", "modality", "num_channels", "spatial_shape", "dtype",
               "value_range", "is_patch_data", "channel_def"}
"""Keys every tensor format specifier must hold (same specification)."""


@pytest.fixture(scope="module")
def bundle(finetune_run, tmp_path_factory) -> Path:
    """The session run exported once (read-only)."""
    return export_run(finetune_run, tmp_path_factory.mktemp("export") / "bundle").path


def _compare(labels_file: Path, image: Path, checkpoint: Path) -> tuple[float, str]:
    """The share of voxels where the bundle's label map equals ``segment``'s (after
    checking that it lies on the image's grid: shape, affine) and what ``segment``
    says its intensity normalisation was."""
    record = read_volume(image)
    written = nib.load(labels_file)
    labels = np.asanyarray(written.dataobj)
    assert labels.shape == record.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(written.affine, record.affine, atol=1e-5)
    expected = segment(record, checkpoint, device="cpu")
    agreement = float(np.mean(labels == expected.labels))
    assert agreement >= AGREEMENT, agreement
    assert len(np.unique(expected.labels)) > 1  # a real label map, not all background
    return agreement, expected.intensity


def test_bundle_runs_with_monai_cli_like_voco_predict(bundle, finetune_run, train_dataset,
                                                      tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    image = shutil.copy(train_dataset / "imagesTr" / "phantom_000.nii.gz", images)
    inference = (bundle / "configs" / "inference.json").read_text()
    assert "voco" not in inference and "napari" not in inference  # MONAI alone runs it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
         "--dataset_dir", str(images), "--output_dir", str(tmp_path / "bundle_out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(image),
                 "--out", str(tmp_path / "voco_out"), "--device", "cpu"]) == 0
    capsys.readouterr()
    predicted = nib.load(tmp_path / "voco_out" / "phantom_000_seg.nii.gz")
    written = nib.load(tmp_path / "bundle_out" / "phantom_000_seg.nii.gz")
    np.testing.assert_allclose(written.affine, predicted.affine, atol=1e-5)
    bundle_labels, voco_labels = (np.asanyarray(f.dataobj) for f in (written, predicted))
    assert bundle_labels.shape == voco_labels.shape == read_volume(image).shape
    agreement = float(np.mean(bundle_labels == voco_labels))
    print(f"bundle vs voco predict (auto -> CT window, monai.bundle CLI): {agreement:.6f}")
    assert agreement >= AGREEMENT


def _variant(finetune_run: Path, folder: Path, data: dict) -> Path:
    """The session run's best checkpoint with other ``data`` settings (same weights)."""
    state = torch.load(finetune_run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"].update(data)
    path = folder / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def _mri_like(image: Path, out: Path) -> Path:
    """The phantom as non-negative MRI-like intensities, stored S-L-A (non-RAS)."""
    record = read_volume(image)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, record.shape[0] - 1
    permute = np.zeros((4, 4))
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1
    array = np.clip(record.array + 1000.0, 0, None).astype(np.float32) / 4
    array = np.ascontiguousarray(array[::-1].transpose(2, 0, 1))
    return save_nifti(out, array, record.affine @ flip @ permute)


@pytest.mark.parametrize("data, mri_like, intensity", [
    ({"intensity": "ct", "spacing": [8.0, 7.0, 7.5]}, False, "CT window"),
    ({"intensity": "auto", "spacing": [8.0, 7.0, 7.5]}, True, "percentiles"),
    ({"intensity": "percentile", "crop_foreground": False}, True, "percentiles"),
], ids=["ct-spacing", "auto-mri-spacing", "percentile-mri-nocrop"])
def test_bundle_python_api_reproduces_the_preprocessing(finetune_run, train_dataset, tmp_path,
                                                        data, mri_like, intensity):
    from monai.bundle import run

    checkpoint = _variant(finetune_run, tmp_path / "variant", data)
    bundle = export_run(checkpoint, tmp_path / "bundle").path
    images = tmp_path / "images"
    images.mkdir()
    source = train_dataset / "imagesTr" / "phantom_001.nii.gz"
    image = (_mri_like(source, images / "case.nii.gz") if mri_like
             else Path(shutil.copy(source, images / "case.nii.gz")))
    run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
        bundle_root=str(bundle), dataset_dir=str(images), output_dir=str(tmp_path / "out"))
    agreement, normalised = _compare(tmp_path / "out" / "case_seg.nii.gz", image, checkpoint)
    assert normalised.startswith(intensity)  # the branch of `auto` really taken
    print(f"bundle vs segment ({data}): {agreement:.6f}")
    preprocessing = json.loads((bundle / "configs" / "inference.json").read_text())[
        "preprocessing"]["transforms"]
    targets = [step["_target_"] for step in preprocessing]
    assert ("Spacingd" in targets) == ("spacing" in data)
    assert ("CropForegroundd" in targets) == data.get("crop_foreground", True)


def test_bundle_normalises_each_channel_as_voco_does(finetune_run, train_dataset, tmp_path):
    """A two-channel run (CT + MRI-like channel): ``auto`` decides per channel."""
    from monai.bundle import run

    from voco_core.config import make_finetune_config
    from voco_core.models import build_swin_unetr

    state = torch.load(finetune_run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"]["in_channels"] = 2
    model = make_finetune_config("tiny", state["config"], check_device=False).model
    two = build_swin_unetr(model, 11, in_channels=2).state_dict()
    for name, weight in state["model"].items():  # the input layers see each channel half
        if two[name].shape != weight.shape:
            state["model"][name] = torch.cat([weight, weight], dim=1) / 2
    checkpoint = tmp_path / "two" / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(state, checkpoint)
    source = nib.load(train_dataset / "imagesTr" / "phantom_002.nii.gz")
    ct = np.asanyarray(source.dataobj).astype(np.float32)
    images = tmp_path / "images"
    images.mkdir()
    image = save_nifti(images / "two.nii.gz",
                       np.stack([ct, np.clip(ct + 1000, 0, None) / 4], axis=-1), source.affine)
    bundle = export_run(checkpoint, tmp_path / "bundle").path
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["channels"] == 2
    run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
        bundle_root=str(bundle), dataset_dir=str(images), output_dir=str(tmp_path / "out"))
    agreement, normalised = _compare(tmp_path / "out" / "two_seg.nii.gz", image, checkpoint)
    assert "channel 1 CT window" in normalised and "channel 2 percentiles" in normalised
    print(f"bundle vs segment (two channels, auto per channel): {agreement:.6f}")


def test_metadata_has_what_monai_expects(bundle, finetune_run):
    from monai.bundle import ConfigParser
    from monai.bundle.properties import InferProperties, MetaProperties
    from monai.utils import BundleProperty, BundlePropertyConfig

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert SPEC_KEYS <= set(meta)
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert TENSOR_KEYS <= set(image) and TENSOR_KEYS <= set(pred)
    state = torch.load(finetune_run / "checkpoints" / "best.pt", weights_only=True)
    names = state["config"]["data"]["class_names"]
    assert pred["channel_def"] == {str(i): name for i, name in enumerate(names)}
    assert pred["num_channels"] == len(names) == 11 and image["num_channels"] == 1
    assert meta["channels"] == 1 and meta["spacing_mm"] is None  # the tests' tiny config's
    assert image["spatial_shape"] == [64, 64, 64] and image["value_range"] == [0, 1]
    # MONAI's own property lists: every required metadata entry, and every required
    # inference entry but ignite's `evaluator` (the bundle loops without ignite).
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    for properties in (MetaProperties, InferProperties):
        for name, prop in properties.items():
            if prop.get(BundleProperty.REQUIRED) and name != "evaluator":
                assert prop[BundlePropertyConfig.ID] in parser, name
    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run" in readme and "kidney_left" in readme
    assert "monai.bundle import run" in readme
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]


def _pretraining_run(folder: Path) -> Path:
    """A run folder whose last.pt says it is a pretraining checkpoint."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"format": "napari-voco/pretrain", "step": 1, "config": {}},
               folder / "checkpoints" / "last.pt")
    return folder


def test_cli_export_refusals_leave_nothing_behind(finetune_run, tmp_path, capsys):
    out = tmp_path / "out" / "bundle"
    pretrain = _pretraining_run(tmp_path / "pretrain")
    assert main(["export", str(pretrain), "--out", str(out)]) == 1
    one_line_error(capsys, "not a napari-voco segmentation checkpoint", "pretraining")
    assert main(["export", str(tmp_path / "missing"), "--out", str(out)]) == 1
    one_line_error(capsys, "checkpoint or run folder not found")
    assert main(["export", str(finetune_run), "--format", "onnx", "--out", str(out)]) == 1
    one_line_error(capsys, "--format 'onnx' is not known", "monai-bundle")
    assert not out.parent.exists()  # refused before anything was written
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["export", str(finetune_run), "--out", str(occupied)]) == 1
    one_line_error(capsys, "not empty", "--overwrite")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert main(["export", str(finetune_run), "--out", str(occupied), "--force",
                 "--authors", "A. Tester"]) == 0
    assert "wrote a MONAI Bundle" in capsys.readouterr().out
    assert not (occupied / "notes.txt").exists()
    meta = json.loads((occupied / "configs" / "metadata.json").read_text())
    assert meta["authors"] == "A. Tester"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "pretrain"]  # no temporary


def test_a_failed_export_keeps_what_was_there(finetune_run, tmp_path, monkeypatch, capsys):
    from voco_core.export import monai_bundle

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(monai_bundle, "bundle_readme", full_disk)
    with pytest.raises(VoCoDataError, match="No space left on device"):
        export_run(finetune_run, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["export", str(finetune_run), "--out", str(kept), "--force"]) == 1
    one_line_error(capsys, "cannot write the bundle (No space left on device)")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert (kept / "notes.txt").read_text() == "mine"


@pytest.mark.gui
def test_export_button_asks_for_a_folder_and_exports_in_a_worker(
        make_napari_viewer_proxy, qtbot, finetune_run, tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from qtpy.QtCore import Qt

    from napari_voco import _notify
    from napari_voco._finetune_widget import FinetuneWidget

    infos: list[str] = []
    errors: list[BaseException] = []
    monkeypatch.setattr(_notify, "notify_info", infos.append)
    monkeypatch.setattr(_notify, "notify_error", errors.append)
    viewer = make_napari_viewer_proxy()
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo finetune")  # Qt owns it, as in napari
    button = widget.exporter.button
    assert not button.isEnabled()  # no run yet
    widget.resume.set_path(finetune_run)
    assert button.isEnabled()
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    answers: list[Path | None] = [None, chosen, chosen, chosen]
    widget.exporter.ask_folder = lambda parent: answers.pop(0)

    def click_and_wait() -> None:
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not widget.exporter.running, timeout=120_000)

    click_and_wait()  # cancelled: nothing happens
    assert not list(chosen.iterdir()) and not infos and not errors
    click_and_wait()  # an empty folder becomes the bundle
    assert (chosen / "configs" / "inference.json").is_file() and str(chosen) in infos[-1]
    click_and_wait()  # a non-empty one gets RUN_bundle inside it
    assert (chosen / "run_bundle" / "models" / "model.pt").is_file()
    assert str(chosen / "run_bundle") in widget.panel.status.text()
    click_and_wait()  # never overwritten
    assert len(errors) == 1 and "not empty" in str(errors[0]) and len(infos) == 2
    assert button.isEnabled() and not answers
