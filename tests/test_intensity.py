"""``data.intensity: auto``: CT window for Hounsfield volumes, percentiles for the rest
(8-bit MRI), decided per volume and reported; whole-volume foreground crops warned."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from voco_core.data.intensity import (
    FOREGROUND_KEY,
    INTENSITY_KEY,
    PreprocessingNotes,
    looks_like_hounsfield,
    preprocessing_report,
    resolve_intensity,
)

from conftest import save_nifti, tiny_config, tiny_finetune_config


def mri_like(shape=(64, 64, 48), seed=0) -> np.ndarray:
    """An 8-bit T1-like head: 0 outside an ellipsoid, smooth 40..250 inside (~200 values)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.9, 0.8), strict=True)))
    inside = radius < 1
    smooth = 40 + 210 * (0.5 + 0.5 * np.cos(3 * grid[0]) * np.cos(2 * grid[1]))
    volume = np.where(inside, smooth + rng.normal(0, 3, shape), 0)
    return np.clip(volume, 0, 255).astype(np.uint8)


def ct_like(shape=(64, 64, 48)) -> np.ndarray:
    """int16 Hounsfield units: air -1000 around a soft-tissue body."""
    volume = np.full(shape, -1000, np.int16)
    volume[8:-8, 8:-8, 4:-4] = 40
    return volume


def test_auto_takes_hounsfield_volumes_as_ct_and_the_rest_by_percentiles():
    assert looks_like_hounsfield(ct_like()) and not looks_like_hounsfield(mri_like())
    assert resolve_intensity("auto", ct_like()) == "ct"
    assert resolve_intensity("auto", mri_like()) == "percentile"
    assert resolve_intensity("ct", mri_like()) == "ct"  # an explicit setting wins
    body_only = np.full((32, 32, 32), 40, np.int16)  # a CT cropped to soft tissue: no air
    assert resolve_intensity("auto", body_only) == "percentile"


def test_mri_with_the_ct_window_keeps_the_whole_volume_and_auto_does_not(tmp_path):
    from voco_core.data.sampling import preprocess_transforms

    path = save_nifti(tmp_path / "t1.nii.gz", mri_like())
    out = {}
    for mode in ("ct", "auto"):
        config = tiny_config({"data": {"intensity": mode}})
        out[mode] = preprocess_transforms(config.data)({"image": str(path)})
    assert out["ct"][INTENSITY_KEY] == "ct" and out["ct"][FOREGROUND_KEY] >= 0.95
    assert out["auto"][INTENSITY_KEY] == "percentile" and out["auto"][FOREGROUND_KEY] < 0.8
    image = out["auto"]["image"]
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    report = preprocessing_report({"t1.nii.gz": out["ct"]}, tiny_config({"data": {
        "intensity": "ct"}}).data)
    assert len(report) == 1 and report[0].startswith("warning: the foreground crop kept the "
                                                    "whole volume for 1 of 1 volumes (t1.nii.gz)")
    assert "data.intensity" in report[0]


def test_report_names_the_volumes_that_differ_from_the_majority():
    data = tiny_config().data
    assert data.intensity == "auto"  # the default
    volumes = {f"ct{i}.nii.gz": {INTENSITY_KEY: "ct", FOREGROUND_KEY: 0.4} for i in range(3)}
    volumes["t1.nii.gz"] = {INTENSITY_KEY: "percentile", FOREGROUND_KEY: 0.5}
    assert preprocessing_report(volumes, data) == [
        "intensity auto: 3 of 4 volumes as CT window -175..250 HU; percentiles 0.5..99.5: "
        "t1.nii.gz"]


def test_pretraining_notes_report_the_first_choice_then_only_the_differences():
    notes = PreprocessingNotes(tiny_config().data)
    notes.add("a.nii.gz", "ct", 0.5)
    assert notes.take().startswith("intensity auto: a.nii.gz as CT window -175..250 HU")
    notes.add("b.nii.gz", "ct", 0.5)
    notes.add("a.nii.gz", "ct", 0.5)
    assert notes.take() == ""
    notes.add("c.nii.gz", "percentile", 0.99)
    lines = notes.take().splitlines()
    assert lines[0] == "intensity auto: c.nii.gz as percentiles 0.5..99.5"
    assert lines[1].startswith("warning: the foreground crop kept the whole volume")
    notes.add("d.nii.gz", "percentile", 0.99)  # the warning comes once
    assert notes.take() == "intensity auto: d.nii.gz as percentiles 0.5..99.5"


def test_training_reports_what_auto_chose(train_dataset, tmp_path):
    from voco_core.train.finetune import iter_finetune
    from voco_core.train.pretrain import iter_pretrain

    stop = threading.Event()
    stop.set()  # the start event comes after pre-processing; no step is trained
    start = next(iter(iter_finetune(tiny_finetune_config(), train_dataset, tmp_path / "ft",
                                    stop=stop)))
    assert "intensity auto: 3 of 3 volumes as CT window -175..250 HU" in start.message

    events = iter_pretrain(tiny_config({"optim": {"total_steps": 1}}), train_dataset,
                           tmp_path / "pre")
    step = next(e for e in events if e.kind == "step")
    assert step.message.startswith("intensity auto: phantom_00")
    assert "as CT window -175..250 HU" in step.message
    events.close()


def test_configs_accept_the_three_modes_and_name_them_when_wrong():
    from voco_core.errors import VoCoConfigError

    for mode in ("auto", "ct", "percentile"):
        assert tiny_config({"data": {"intensity": mode}}).data.intensity == mode
        assert tiny_finetune_config({"data": {"intensity": mode}}).data.intensity == mode
    with pytest.raises(VoCoConfigError, match=r"data\.intensity.*auto"):
        tiny_finetune_config({"data": {"intensity": "mri"}})


def test_segmentation_says_how_the_image_was_normalised(finetune_run, train_dataset, tmp_path,
                                                         capsys):
    from voco_core.cli import main
    from voco_core.inference import segment

    image = train_dataset / "imagesTr" / "phantom_000.nii.gz"
    assert segment(image, finetune_run).intensity == "CT window -175..250 HU"
    mri = save_nifti(tmp_path / "t1.nii.gz", mri_like())
    assert segment(mri, finetune_run).intensity == "percentiles 0.5..99.5"
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(mri),
                 "--out", str(tmp_path / "out")]) == 0
    assert "intensity: percentiles 0.5..99.5" in capsys.readouterr().out
