"""Multi-channel volumes: 4-D NIfTI and listed channel files, the channel count from the
data, per-channel normalisation, crops with channels, training, inference, and single-
channel weights adapted to several input channels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_core.cli import main
from voco_core.data.datalists import DatalistEntry, load_datalist
from voco_core.data.intensity import NormaliseIntensityd, describe_intensity
from voco_core.data.io import check_volume_header, looks_like_labels, read_volume
from voco_core.errors import VoCoConfigError, VoCoDataError

from conftest import one_line_error, save_nifti, tiny_config, tiny_finetune_config


def mri_like(ct: np.ndarray) -> np.ndarray:
    """A second, non-negative channel on the CT's grid (no air in Hounsfield units, so
    ``intensity: auto`` takes percentiles for it): an MRI-like contrast."""
    return (np.clip(ct + 1000.0, 0.0, None) * 0.7 + 5.0).astype(np.float32)


@pytest.fixture(scope="module")
def channel_data(train_dataset, tmp_path_factory) -> Path:
    """Two of ``train_dataset``'s phantoms (64 x 64 x 48) with a second channel, as
    ``stacked/`` (4-D channels-last files), ``channels/`` (one file per channel) and
    ``dataset.json`` listing the channel files with their label maps."""
    root = tmp_path_factory.mktemp("channels")
    training = []
    for entry in load_datalist(train_dataset, require_labels=True)[:2]:
        image = nib.load(entry.image)
        ct = np.asarray(image.dataobj, dtype=np.float32)
        name = entry.image.name.split(".")[0]
        (root / "stacked").mkdir(exist_ok=True)
        (root / "channels").mkdir(exist_ok=True)
        save_nifti(root / "stacked" / f"{name}.nii.gz", np.stack([ct, mri_like(ct)], axis=-1),
                   image.affine)
        save_nifti(root / "channels" / f"{name}_ct.nii.gz", ct, image.affine)
        save_nifti(root / "channels" / f"{name}_mr.nii.gz", mri_like(ct), image.affine)
        training.append({"image": [f"channels/{name}_ct.nii.gz", f"channels/{name}_mr.nii.gz"],
                         "label": str(entry.label)})
    (root / "dataset.json").write_text(json.dumps({"training": training}))
    return root


# ---------------------------------------------------------------- reading


def test_four_d_nifti_is_read_channels_last(channel_data):
    path = channel_data / "stacked" / "phantom_000.nii.gz"
    record = read_volume(path)
    assert record.array.shape == (64, 64, 48, 2) and record.shape == (64, 64, 48)
    assert record.channels == 2
    assert check_volume_header(path) == (64, 64, 48, 2)
    assert looks_like_labels(record) == (False, "2 channels (a multi-channel image)")
    assert record.describe()["channels"] == 2
    with pytest.raises(VoCoDataError, match=r"phantom_000\.nii\.gz: is 4-D .*one channel"):
        read_volume(path, kind="label map")


def test_voco_info_prints_the_channel_count(channel_data, capsys):
    assert main(["info", str(channel_data / "stacked" / "phantom_000.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "shape        64 x 64 x 48 voxels" in out and "channels     2" in out


def test_datalist_with_channel_files_reads_one_stacked_image(channel_data):
    entries = load_datalist(channel_data / "dataset.json", require_labels=True)
    assert len(entries) == 2 and isinstance(entries[0].image, tuple)
    assert [p.name for p in entries[0].image] == ["phantom_000_ct.nii.gz",
                                                  "phantom_000_mr.nii.gz"]
    listed = read_volume(entries[0].image)
    stacked = read_volume(channel_data / "stacked" / "phantom_000.nii.gz")
    np.testing.assert_array_equal(listed.array, stacked.array)
    assert listed.path == entries[0].image[0] and listed.channel_files == entries[0].image
    assert check_volume_header(entries[0].image) == (64, 64, 48, 2)


def test_channel_files_off_the_grid_are_named(channel_data, tmp_path):
    first = channel_data / "channels" / "phantom_000_ct.nii.gz"
    image = nib.load(first)
    shifted_affine = image.affine.copy()
    shifted_affine[0, 3] += 2.0
    shifted = save_nifti(tmp_path / "shifted.nii.gz", np.asarray(image.dataobj), shifted_affine)
    small = save_nifti(tmp_path / "small.nii.gz", np.zeros((64, 64, 40), np.float32),
                       image.affine)
    for reader in (read_volume, check_volume_header):
        with pytest.raises(VoCoDataError, match=r"shifted\.nii\.gz: channel file affine "
                                                r"differs from phantom_000_ct\.nii\.gz's"):
            reader([first, shifted])
        with pytest.raises(VoCoDataError, match=r"small\.nii\.gz: channel file shape "
                                                r"\(64, 64, 40\) differs"):
            reader([first, small])


def test_a_volume_with_other_channels_is_named_with_both_counts(channel_data, train_dataset):
    from voco_core.train.pretrain import check_dataset

    two = DatalistEntry(channel_data / "stacked" / "phantom_000.nii.gz")
    one = load_datalist(train_dataset)[2]
    assert check_dataset([two, two], tiny_config()) == 2
    with pytest.raises(VoCoDataError) as info:
        check_dataset([two, one], tiny_config())
    message = str(info.value)
    assert message.startswith(f"{one.image}: image has 1 channel(s), expected 2")
    assert "phantom_000.nii.gz" in message and "\n" not in message
    with pytest.raises(VoCoConfigError, match=r"data\.in_channels = 3 does not match the "
                                              r"data, whose volumes have 2 channel"):
        check_dataset([two], tiny_config({"data": {"in_channels": 3}}))


# ---------------------------------------------------------------- pre-processing


def test_intensity_is_normalised_per_channel(train_dataset):
    from voco_core.config import make_finetune_config

    ct = torch.as_tensor(np.asarray(nib.load(load_datalist(train_dataset)[0].image).dataobj,
                                    dtype=np.float32))
    image = torch.stack([ct, torch.as_tensor(mri_like(ct.numpy()))])
    auto = make_finetune_config("tiny", check_device=False).data
    out = NormaliseIntensityd("image", auto)({"image": image})
    assert out["intensity"] == "ct+percentile"
    assert describe_intensity(out["intensity"], auto) == (
        "channel 1 CT window -175..250 HU, channel 2 percentiles 0.5..99.5")
    for c in range(2):  # each channel as if it were a single-channel volume
        alone = NormaliseIntensityd("image", auto)({"image": image[c:c + 1]})
        torch.testing.assert_close(out["image"][c], torch.as_tensor(alone["image"])[0])
    # percentiles: each channel gets its own, whatever the other's scale
    percentile = make_finetune_config("tiny", {"data": {"intensity": "percentile"}},
                                      check_device=False).data
    scaled = NormaliseIntensityd("image", percentile)({"image": torch.stack([ct, 50 * ct])})
    assert scaled["intensity"] == "percentile"
    torch.testing.assert_close(scaled["image"][0], scaled["image"][1], atol=1e-5, rtol=0)


def test_crop_sampler_keeps_every_channel():
    from voco_core.data.sampling import VoCoCropSampler

    config = tiny_config()
    volume = torch.rand((1, 80, 80, 40), generator=torch.Generator().manual_seed(0))
    sampler = VoCoCropSampler(config)  # augmentation on: flips, rot90, shifts per crop
    batch = sampler([volume.repeat(2, 1, 1, 1)] * 2,
                    [np.random.default_rng([0, b]) for b in range(2)])
    assert batch.base_crops.shape == (2, 4, 2, 40, 40, 40)
    assert batch.random_crops.shape == (2, 2, 2, 40, 40, 40)
    single = sampler([volume] * 2, [np.random.default_rng([0, b]) for b in range(2)])
    for channel in range(2):  # the same draws move both channels together
        torch.testing.assert_close(batch.base_crops[:, :, channel], single.base_crops[:, :, 0])
        torch.testing.assert_close(batch.random_crops[:, :, channel],
                                   single.random_crops[:, :, 0])
    np.testing.assert_array_equal(batch.labels.numpy(), single.labels.numpy())


def test_compact_cache_stores_all_channels(channel_data, tmp_path):
    from voco_core.data.sampling import PretrainDataset

    config = tiny_config({"data": {"cache": "compact", "cache_dir": str(tmp_path / "cache")}})
    entries = load_datalist(channel_data / "dataset.json")
    first = PretrainDataset(entries, config)[0]
    again = PretrainDataset(entries, config)[0]  # read back from the uint8 file
    assert first.shape == (2, 80, 80, 40) and len(list((tmp_path / "cache").iterdir())) == 1
    torch.testing.assert_close(first, again)


# ---------------------------------------------------------------- weights


def test_single_channel_weights_adapted_to_two_channels_keep_the_response():
    from voco_core.config import make_finetune_config
    from voco_core.models import (
        BACKBONE_PREFIXES,
        VoCoBackbone,
        backbone_state_dict,
        build_swin_unetr,
    )
    from voco_core.weights import load_backbone

    torch.manual_seed(0)
    model = tiny_config().model
    one, two = VoCoBackbone(model, 1).eval(), VoCoBackbone(model, 2).eval()
    report = load_backbone(two, backbone_state_dict(one), source="single-channel")
    assert [name for name, _, _ in report.adapted] == [
        "swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
        "encoder1.layer.conv3.conv.weight"]
    assert not report.shape_mismatched and not report.missing
    assert "adapted 3 single-channel input tensors to 2 channels" in report.summary()
    x = torch.randn(1, 1, 40, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(two(x.repeat(1, 2, 1, 1, 1)), one(x), atol=1e-5, rtol=0)

    seg = make_finetune_config("tiny", check_device=False).model
    unetr_one, unetr_two = build_swin_unetr(seg, 3, 1).eval(), build_swin_unetr(seg, 3, 2).eval()
    decoder = {k: v for k, v in unetr_one.state_dict().items()
               if not k.startswith(BACKBONE_PREFIXES)}
    unetr_two.load_state_dict(decoder, strict=False)
    report = load_backbone(unetr_two, unetr_one.state_dict())
    assert len(report.adapted) == 3 and not report.shape_mismatched
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(unetr_two(x.repeat(1, 2, 1, 1, 1)), unetr_one(x),
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------- training and inference


@pytest.fixture(scope="module")
def channel_runs(channel_data, tmp_path_factory):
    """A 1-step pretraining run on the 4-D files and a 1-step finetuning run on the
    listed channel files (its encoder from single-channel weights)."""
    from voco_core.models import VoCoBackbone, backbone_state_dict
    from voco_core.train.finetune import iter_finetune
    from voco_core.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("channel-runs")
    pretrain(tiny_config({"optim": {"total_steps": 1}, "model": {"teacher": "head"}}),
             channel_data / "stacked",
             root / "pretrain")
    torch.manual_seed(0)
    single = backbone_state_dict(VoCoBackbone(tiny_config().model, 1))
    config = tiny_finetune_config({"train": {"total_steps": 1, "val_every": 1}})
    events = list(iter_finetune(config, channel_data / "dataset.json", root / "finetune",
                                pretrained=single))
    return root / "pretrain", root / "finetune", events


def test_training_records_the_channel_count(channel_runs):
    from voco_core.checkpoint import load_checkpoint

    pretrain_run, finetune_run, events = channel_runs
    assert load_checkpoint(pretrain_run / "checkpoints" / "last.pt")["config"]["data"][
        "in_channels"] == 2
    state = load_checkpoint(finetune_run / "checkpoints" / "best.pt")
    assert state["config"]["data"]["in_channels"] == 2
    assert state["model"]["swinViT.patch_embed.proj.weight"].shape[1] == 2
    assert [e.kind for e in events] == ["start", "step", "validation", "done"]
    assert "adapted 3 single-channel input tensors to 2 channels" in events[0].message
    assert "intensity auto: 2 of 2 volumes as channel 1 CT window" in events[0].message


def test_predict_takes_two_channels_and_refuses_one(channel_runs, channel_data, train_dataset,
                                                   tmp_path, capsys):
    _, finetune_run, _ = channel_runs
    image = channel_data / "stacked" / "phantom_000.nii.gz"
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(image),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    labels = nib.load(tmp_path / "out" / "phantom_000_seg.nii.gz")
    assert labels.shape == (64, 64, 48)
    capsys.readouterr()
    single = load_datalist(train_dataset)[0].image
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(single),
                 "--out", str(tmp_path / "out1"), "--device", "cpu"]) == 1
    one_line_error(capsys, single.name, "image has 1 channel(s)", "takes 2")


def test_predict_reads_channel_files_from_a_datalist_like_the_stacked_file(
        channel_runs, channel_data, tmp_path):
    """``voco predict --input dataset.json``: each listed image (here two channel files)
    is one input, segmented exactly as the same channels stacked in one 4-D file."""
    _, finetune_run, _ = channel_runs
    test_list = {"test": [{"image": ["channels/phantom_000_ct.nii.gz",
                                     "channels/phantom_000_mr.nii.gz"]}]}
    datalist = tmp_path / "predict.json"
    (tmp_path / "channels").symlink_to(channel_data / "channels")
    datalist.write_text(json.dumps(test_list))
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(datalist),
                 "--out", str(tmp_path / "listed"), "--device", "cpu"]) == 0
    assert main(["predict", "--checkpoint", str(finetune_run), "--input",
                 str(channel_data / "stacked" / "phantom_000.nii.gz"),
                 "--out", str(tmp_path / "stacked"), "--device", "cpu"]) == 0
    listed = nib.load(tmp_path / "listed" / "phantom_000_ct_seg.nii.gz")
    stacked = nib.load(tmp_path / "stacked" / "phantom_000_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(listed.dataobj), np.asarray(stacked.dataobj))
    np.testing.assert_allclose(listed.affine, stacked.affine)


def test_finetune_refuses_a_channel_count_the_data_contradict(channel_data, tmp_path, capsys):
    assert main(["finetune", "--data", str(channel_data / "dataset.json"), "--preset", "tiny",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "1",
                 "--set", "data.in_channels=1"]) == 1
    one_line_error(capsys, "data.in_channels = 1 does not match the data", "2 channel(s)")


def test_positions_on_a_two_channel_volume(channel_runs, channel_data, train_dataset):
    from voco_core.inference import load_position_model, positions, prepare_volume

    pretrain_run, _, _ = channel_runs
    model = load_position_model(pretrain_run, device="cpu")
    assert model.net.backbone.swinViT.patch_embed.proj.weight.shape[1] == 2
    prepared = prepare_volume(channel_data / "stacked" / "phantom_001.nii.gz", model)
    assert prepared.sample.shape == (2, 80, 80, 40)
    result = positions(prepared, model, n=2, seed=0)
    assert result.predicted.shape == (2, 4) and np.isfinite(result.predicted).all()
    with pytest.raises(VoCoDataError, match=r"image has 1 channel\(s\), but the network"):
        prepare_volume(load_datalist(train_dataset)[0].image, model)


def test_old_configs_without_the_field_mean_one_channel():
    from voco_core.config import pretrain_config_from_dict

    values = tiny_config().to_dict()
    del values["data"]["in_channels"]
    config = pretrain_config_from_dict(values, check_device=False)
    assert config.data.in_channels == 0 and config.data.image_channels == 1


def test_reader_opens_channels_as_layers_that_widgets_stack_back(channel_data):
    from types import SimpleNamespace

    from napari.layers import Image
    from napari.layers.utils.stack_utils import split_channels

    from napari_voco._io import read_volumes
    from napari_voco._layers import layer_to_record, layer_volume

    path = channel_data / "stacked" / "phantom_000.nii.gz"
    [(data, kwargs, kind)] = read_volumes(str(path))
    # shown axial: (S, P, L) of the RAS file's (R, A, S) axes, channels last
    assert kind == "image" and kwargs["channel_axis"] == 3 and data.shape == (48, 64, 64, 2)
    layers = [Image(d, **k) for d, k, _ in split_channels(  # what viewer.add_image does
        data, 3, **{key: v for key, v in kwargs.items() if key != "channel_axis"})]
    assert [layer.name for layer in layers] == ["phantom_000 [channel 1]",
                                                "phantom_000 [channel 2]"]
    assert layers[0].contrast_limits == [-175.0, 250.0]  # the CT channel
    viewer = SimpleNamespace(layers=layers)
    record = layer_to_record(layers[1], viewer)  # either channel stands for the image
    np.testing.assert_array_equal(record.array,
                                  read_volume(path).array.transpose(2, 1, 0, 3)[:, ::-1, ::-1])
    np.testing.assert_allclose(record.affine, layers[1].metadata["voco"]["affine"])
    np.testing.assert_allclose(layers[1].metadata["voco"]["storage"]["affine"],
                               nib.load(path).affine)
    with pytest.raises(VoCoDataError, match=r"channel 2 is not in the viewer"):
        layer_to_record(layers[0], SimpleNamespace(layers=layers[:1]))
    with pytest.raises(VoCoDataError, match=r"channel 1 of 2 of .*single-channel images"):
        layer_volume(layers[0])
