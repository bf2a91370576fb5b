"""Nothing a user made is overwritten without asking: run folders (plan.claim_run_folder,
the trainers' own guard), command outputs (voco_core.outputs.refuse_existing), and the
fault cases of the same family (an export's own source, a continued run's parent,
non-finite hyper-parameters and weights, a forged header, a full disk)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_core.checkpoint import load_checkpoint
from voco_core.cli import main
from voco_core.errors import ExistingRunError, VoCoConfigError, VoCoDataError, VoCoTrainingError
from voco_core.outputs import refuse_existing
from voco_core.plan import claim_run_folder, plan_finetune
from voco_core.run_folder import RunFolder

from conftest import one_line_error, save_nifti, tiny_config, tiny_finetune_config


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha1 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def own_pretrain_run(pretrain_run, tmp_path) -> Path:
    return Path(shutil.copytree(pretrain_run, tmp_path / "pre"))


@pytest.fixture
def own_finetune_run(finetune_run, tmp_path) -> Path:
    return Path(shutil.copytree(finetune_run, tmp_path / "fine"))


# ------------------------------------------------------------------ run folders


def test_a_new_pretraining_over_a_finished_run_is_refused_and_changes_nothing(
        own_pretrain_run, train_dataset, tmp_path, capsys):
    config = tiny_config({"optim": {"total_steps": 1}}).save(tmp_path / "tiny.yaml")
    before = fingerprint(own_pretrain_run)
    assert main(["pretrain", "--data", str(train_dataset), "--config", str(config),
                 "--out", str(own_pretrain_run)]) == 1
    one_line_error(capsys, str(own_pretrain_run), "already holds a run",
                   f"--resume {own_pretrain_run}", "another --out")
    assert fingerprint(own_pretrain_run) == before


def test_overwrite_moves_the_old_run_aside_and_starts_anew(own_pretrain_run, train_dataset,
                                                          tmp_path, capsys):
    config = tiny_config({"optim": {"total_steps": 1}}).save(tmp_path / "tiny.yaml")
    before = fingerprint(own_pretrain_run)
    assert main(["pretrain", "--data", str(train_dataset), "--config", str(config),
                 "--out", str(own_pretrain_run), "--overwrite"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pre.old-")]
    assert len(aside) == 1 and f"aside to {aside[0]}" in out
    assert fingerprint(aside[0]) == before  # moved, not touched
    assert load_checkpoint(own_pretrain_run)["step"] == 1


def test_each_kind_of_run_content_counts_as_a_run(tmp_path):
    for name in ("config.yaml", "log.jsonl", "meta.json", "checkpoints/best.pt"):
        folder = tmp_path / name.replace("/", "_")
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text("x")
        with pytest.raises(ExistingRunError, match="already holds a run"):
            claim_run_folder(folder)
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / ".lock").write_text("{}")
    assert claim_run_folder(empty) == []  # a lock or an empty checkpoints/ is no run


def test_the_trainers_refuse_a_folder_holding_a_run_themselves(own_finetune_run,
                                                               train_dataset):
    from voco_core.train.finetune import iter_finetune

    before = fingerprint(own_finetune_run)
    with pytest.raises(ExistingRunError):
        next(iter_finetune(tiny_finetune_config(), train_dataset, own_finetune_run))
    assert fingerprint(own_finetune_run) == before


def test_a_resume_that_fails_before_its_first_step_leaves_config_and_log(
        own_pretrain_run, tmp_path, capsys):
    # two-channel images: the run's network takes one (refused at restore)
    data = tmp_path / "two_channels"
    data.mkdir()
    for i in range(2):
        save_nifti(data / f"v{i}.nii.gz", np.random.default_rng(i).normal(
            size=(80, 80, 40, 2)).astype(np.float32))
    before = fingerprint(own_pretrain_run)
    assert main(["pretrain", "--data", str(data), "--resume", str(own_pretrain_run),
                 "--steps", "3"]) == 1
    one_line_error(capsys, "channel")
    after = fingerprint(own_pretrain_run)
    for name in ("config.yaml", "log.jsonl", "checkpoints/last.pt", "meta.json"):
        assert after[name] == before[name], name


def test_continue_from_a_run_into_itself_is_refused(own_finetune_run, train_dataset, capsys):
    before = fingerprint(own_finetune_run)
    for extra in ([], ["--overwrite"]):
        assert main(["finetune", "--data", str(train_dataset), "--continue-from",
                     str(own_finetune_run), "--out", str(own_finetune_run), *extra]) == 1
        one_line_error(capsys, "holds the run it continues")
    assert fingerprint(own_finetune_run) == before


def test_overwrite_never_moves_the_pretrained_checkpoint_away(own_pretrain_run):
    with pytest.raises(VoCoConfigError, match="holds the pretrained checkpoint"):
        plan_finetune(preset="tiny", out=own_pretrain_run, pretrained=own_pretrain_run,
                      overwrite=True, overrides={"run": {"device": "cpu"}})
    assert (own_pretrain_run / "checkpoints" / "last.pt").is_file()


def test_demo_refuses_a_folder_holding_a_run(own_pretrain_run, train_dataset, capsys):
    before = fingerprint(own_pretrain_run)
    assert main(["demo", "--data", str(train_dataset), "--out", str(own_pretrain_run)]) == 1
    one_line_error(capsys, "already holds a run")
    assert fingerprint(own_pretrain_run) == before


# ------------------------------------------------------------------ command outputs


def test_refuse_existing_names_the_first_existing_output(tmp_path):
    taken = tmp_path / "b.nii.gz"
    taken.write_text("x")
    refuse_existing([tmp_path / "a.nii.gz"], overwrite=False)
    refuse_existing([taken], overwrite=True)
    with pytest.raises(VoCoDataError, match=r"b\.nii\.gz: exists; .*--overwrite"):
        refuse_existing([tmp_path / "a.nii.gz", taken], overwrite=False)


def test_predict_refuses_existing_outputs_and_replaces_them_with_overwrite(
        finetune_run, train_dataset, tmp_path, capsys):
    image = train_dataset / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "pred"
    command = ["predict", "--checkpoint", str(finetune_run), "--input", str(image),
               "--out", str(out)]
    assert main(command) == 0
    written = out / "phantom_000_seg.nii.gz"
    stamp = written.stat().st_mtime_ns
    capsys.readouterr()
    assert main(command) == 1
    one_line_error(capsys, str(written), "--overwrite")
    assert written.stat().st_mtime_ns == stamp
    assert main([*command, "--overwrite"]) == 0


def test_predict_keeps_inputs_of_the_same_name_apart(finetune_run, train_dataset, tmp_path,
                                                     capsys):
    """The KiTS layout: case_0000N/imaging.nii.gz, listed in a datalist."""
    cases = tmp_path / "kits"
    for i in range(2):
        (cases / f"case_{i:05d}").mkdir(parents=True)
        shutil.copy(train_dataset / "imagesTr" / f"phantom_00{i}.nii.gz",
                    cases / f"case_{i:05d}" / "imaging.nii.gz")
    (cases / "dataset.json").write_text(json.dumps({"test": [
        f"case_{i:05d}/imaging.nii.gz" for i in range(2)]}))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(finetune_run), "--input",
                 str(cases / "dataset.json"), "--out", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert written == ["case_00000/imaging_seg.nii.gz", "case_00001/imaging_seg.nii.gz"]
    truth = [nib.load(train_dataset / "imagesTr" / f"phantom_00{i}.nii.gz").shape
             for i in range(2)]
    assert [nib.load(out / w).shape for w in written] == truth


def test_predict_refuses_inputs_that_would_share_an_output_before_writing(
        finetune_run, train_dataset, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(train_dataset / "imagesTr" / "phantom_000.nii.gz", folder / "case.nii.gz")
    from voco_core.data.io import read_volume
    from voco_core.data.readers.itk import write_itk_volume

    record = read_volume(folder / "case.nii.gz")
    write_itk_volume(folder / "case.nrrd", record.array, record.affine)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(folder),
                 "--out", str(out)]) == 1
    one_line_error(capsys, "case.nii.gz", "case.nrrd", "case_seg.nii.gz")
    assert not out.exists()


def test_positions_refuse_existing_outputs(pretrain_run, train_dataset, tmp_path, capsys):
    image = train_dataset / "imagesTr" / "phantom_000.nii.gz"
    command = ["positions", "--checkpoint", str(pretrain_run), "--input", str(image),
               "--n", "2", "--out", str(tmp_path / "pos"), "--device", "cpu"]
    assert main(command) == 0
    capsys.readouterr()
    assert main(command) == 1
    one_line_error(capsys, "phantom_000_positions", "--overwrite")
    assert main([*command, "--overwrite"]) == 0


def test_make_phantoms_refuses_to_replace_files_before_writing_any(tmp_path, capsys):
    command = ["make-phantoms", "--out", str(tmp_path / "ph"), "-n", "2", "--shape",
               "32", "32", "24"]
    assert main(command) == 0
    (tmp_path / "ph" / "dataset.json").unlink()
    stamp = (tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(command) == 1
    one_line_error(capsys, "phantom_000.nii.gz", "--overwrite")
    assert not (tmp_path / "ph" / "dataset.json").exists()
    assert (tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns == stamp
    assert main([*command, "--overwrite"]) == 0


def test_export_never_deletes_the_run_it_exports(own_finetune_run, capsys):
    before = fingerprint(own_finetune_run)
    for out in (own_finetune_run, own_finetune_run / "checkpoints"):
        assert main(["export", str(own_finetune_run), "--out", str(out), "--overwrite"]) == 1
        one_line_error(capsys, "holds the checkpoint being exported")
    assert fingerprint(own_finetune_run) == before


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("value", ["inf", "nan", "1e30"])
def test_non_finite_or_absurd_learning_rates_are_refused_at_planning(
        value, train_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    for command, field in (("pretrain", "optim.lr"), ("finetune", "train.lr")):
        assert main([command, "--data", str(train_dataset), "--preset", "tiny", "--out",
                     str(out), "--set", f"{field}={value}", "--device", "cpu"]) == 1
        one_line_error(capsys, field)
    assert not out.exists()
    with pytest.raises(VoCoConfigError, match=r"data\.ct_window"):
        plan_finetune(preset="tiny", overrides={"data": {"ct_window": [float("-inf"), 250]}},
                      out=out)


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(
        train_dataset, tmp_path, monkeypatch):
    import importlib

    finetune_module = importlib.import_module("voco_core.train.finetune")
    real_step = finetune_module._train_step

    def blow_up_at_step_2(update, images, labels, step):
        loss = real_step(update, images, labels, step)
        if step == 1:  # the update of step 2 makes a weight inf
            with torch.no_grad():
                next(update.model.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(finetune_module, "_train_step", blow_up_at_step_2)
    config = tiny_finetune_config({"train": {"total_steps": 4, "val_every": 100},
                                   "run": {"checkpoint_every": 1}})
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(VoCoTrainingError) as caught:
        finetune_module.finetune(config, train_dataset, folder.root)
    assert "non-finite" in str(caught.value) or "loss became" in str(caught.value)
    state = load_checkpoint(folder.last)
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())


def test_a_forged_nifti_header_is_refused_before_allocating(train_dataset, tmp_path, capsys):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((1000, 1000, 1000))
    data = tmp_path / "forged"
    data.mkdir()
    forged = data / "big.nii.gz"
    # noise: it compresses so little that the file could hold the claim by size alone
    noise = np.random.default_rng(0).integers(-30000, 30000, 1_500_000).astype(np.int16)
    payload = header.binaryblock + b"\0" * 4 + noise.tobytes()
    forged.write_bytes(gzip.compress(payload))
    assert main(["info", str(forged)]) == 1
    one_line_error(capsys, "big.nii.gz", "inflate to only")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--preset", "tiny", "--out", str(out),
                 "--device", "cpu"]) == 1
    one_line_error(capsys, "big.nii.gz")
    assert not out.exists()


def test_a_detached_nrrd_header_without_its_data_file_names_it(tmp_path, capsys):
    header = tmp_path / "scan.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\n"
                      "encoding: raw\nendian: little\ndata file: scan.raw\n\n")
    assert main(["info", str(header)]) == 1
    one_line_error(capsys, "scan.nhdr", "data file scan.raw", "is missing")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_while_saving_a_checkpoint_says_so(tiny_disk):
    from voco_core.checkpoint import atomic_torch_save

    target = tiny_disk / "last.pt"
    atomic_torch_save({"w": torch.zeros(10)}, target)
    with pytest.raises(VoCoDataError, match=r"last\.pt: cannot write checkpoint \(No space "
                                            r"left on device\)"):
        atomic_torch_save({"w": torch.zeros(1_000_000)}, target)
    assert torch.load(target, weights_only=True)["w"].shape == (10,)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last.pt"]


def test_a_full_disk_while_exporting_says_so_and_leaves_nothing(tiny_disk, finetune_run,
                                                                 capsys):
    out = tiny_disk / "bundle"
    assert main(["export", str(finetune_run), "--out", str(out)]) == 1
    one_line_error(capsys, "bundle: cannot write the bundle (No space left on device)")
    assert list(tiny_disk.iterdir()) == []
