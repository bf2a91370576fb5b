"""One-pass crop sampler against the per-crop MONAI oracle; pre-processing; data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voco_core.config import make_pretrain_config
from voco_core.data.datalists import load_datalist
from voco_core.data.sampling import (
    LoadFailure,
    PretrainDataset,
    ResumableRandomSampler,
    VoCoCropSampler,
    preprocess_transforms,
)
from voco_core.geometry import base_crop_grid
from voco_core.reference import per_crop_labels, per_crop_monai_crops

from conftest import tiny_config

# The fast path resizes the whole region once and cuts the base crops from it, and
# the sub-volumes with one batched F.interpolate; MONAI's Resize calls the same
# kernel per crop. Sample positions are computed from different offsets, so crops
# (intensities in [0, 1]) agree to float32 rounding of those positions.
CROP_ATOL = 5e-5  # ~3 axes x ulp(~150) x a neighbour difference of at most 1


@pytest.mark.parametrize("resize", [True, False])
def test_fast_crops_match_the_per_crop_monai_oracle(resize):
    if resize:  # v1 geometry: a 3 x 3 grid of 48 x 48 x 40 crops resized to 40^3
        config = make_pretrain_config("tiny", {"data": {"target_size": [144, 144, 40]},
                                      "geometry": {"grid_size": 3, "resize_crops": True}})
    else:  # native 40^3 crops
        config = tiny_config()
    rng = torch.Generator().manual_seed(0)
    volumes = [torch.rand((1, *config.data.target_size), generator=rng) for _ in range(2)]
    sampler = VoCoCropSampler(config, seed=3, augment=False)
    batch = sampler(volumes)
    k, m, s = config.num_base_crops, config.geometry.num_random_crops, config.geometry.input_size
    assert batch.base_crops.shape == (2, k, 1, s, s, s)
    assert batch.random_crops.shape == (2, m, 1, s, s, s)
    for b, volume in enumerate(volumes):
        torch.testing.assert_close(batch.base_crops[b],
                                   per_crop_monai_crops(volume, batch.base_boxes[b], s),
                                   atol=CROP_ATOL, rtol=0)
        torch.testing.assert_close(batch.random_crops[b],
                                   per_crop_monai_crops(volume, batch.crop_boxes[b], s),
                                   atol=CROP_ATOL, rtol=0)
        np.testing.assert_array_equal(batch.labels[b].numpy(),
                                      per_crop_labels(batch.crop_boxes[b], batch.base_boxes[b]))
    grid = base_crop_grid(config.data.target_size, config.geometry.grid_size)
    np.testing.assert_array_equal(batch.base_boxes[0], grid)


def test_v2_region_offsets_move_boxes_and_keep_labels():
    config = tiny_config({"data": {"resample": "spacing"}})
    volume = torch.rand(1, 100, 90, 50)  # larger than the 80 x 80 x 40 sample region
    batch = VoCoCropSampler(config, seed=1, augment=False)([volume])
    offset = batch.base_boxes[0, 0, :, 0]
    assert (offset >= 0).all() and (batch.base_boxes[0, -1, :, 1] <= [100, 90, 50]).all()
    expected = per_crop_monai_crops(volume, batch.base_boxes[0], 40)
    torch.testing.assert_close(batch.base_crops[0], expected)
    np.testing.assert_array_equal(batch.labels[0].numpy(),
                                  per_crop_labels(batch.crop_boxes[0], batch.base_boxes[0]))


def test_augmentation_changes_orientation_not_content_or_labels():
    config = tiny_config()
    volume = torch.rand(1, 80, 80, 40)
    plain = VoCoCropSampler(config, seed=5, augment=False)([volume])
    no_shift = tiny_config({"augment": {"flip_prob": 0.5, "rot90_prob": 0.5, "shift_prob": 0}})
    augmented = VoCoCropSampler(no_shift, seed=5)([volume])
    torch.testing.assert_close(augmented.labels, plain.labels)
    np.testing.assert_array_equal(augmented.crop_boxes, plain.crop_boxes)
    flat_a = augmented.base_crops.flatten(2).sort(dim=-1).values
    flat_p = plain.base_crops.flatten(2).sort(dim=-1).values
    torch.testing.assert_close(flat_a, flat_p)  # same voxels, possibly moved
    assert not torch.equal(augmented.base_crops, plain.base_crops)


def test_per_volume_generators_make_a_batch_independent_of_how_it_is_split():
    config = tiny_config()
    volumes = [torch.rand(1, 80, 80, 40) for _ in range(3)]

    def rngs(indices):
        return [np.random.default_rng([7, 0, i]) for i in indices]

    whole = VoCoCropSampler(config)(volumes, rngs([0, 1, 2]))
    first = VoCoCropSampler(config)(volumes[:1], rngs([0]))
    rest = VoCoCropSampler(config)(volumes[1:], rngs([1, 2]))
    torch.testing.assert_close(whole.base_crops, torch.cat([first.base_crops, rest.base_crops]))
    torch.testing.assert_close(whole.random_crops,
                               torch.cat([first.random_crops, rest.random_crops]))
    torch.testing.assert_close(whole.labels, torch.cat([first.labels, rest.labels]))
    other = VoCoCropSampler(config)(volumes, rngs([3, 4, 5]))
    assert not torch.equal(other.random_crops, whole.random_crops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_sampling_on_the_gpu_matches_the_cpu():
    config = tiny_config()
    volume = torch.rand(1, 80, 80, 40)
    cpu = VoCoCropSampler(config, seed=2)([volume])
    gpu = VoCoCropSampler(config, seed=2)([volume.cuda()])
    assert gpu.base_crops.is_cuda and gpu.labels.is_cuda
    torch.testing.assert_close(gpu.base_crops.cpu(), cpu.base_crops)
    torch.testing.assert_close(gpu.labels.cpu(), cpu.labels)


def test_preprocessing_gives_the_target_size_in_unit_range(train_dataset):
    config = tiny_config()
    entry = load_datalist(train_dataset)[0]
    volume = preprocess_transforms(config.data)({"image": str(entry.image)})["image"]
    assert volume.shape == (1, 80, 80, 40) and volume.dtype == torch.float32
    assert volume.min() >= 0 and volume.max() <= 1 and volume.std() > 0.1


def test_preprocessing_v2_spacing_pads_to_the_region(train_dataset):
    config = tiny_config({"data": {"resample": "spacing", "target_spacing": [8.0, 8.0, 8.0]}})
    entry = load_datalist(train_dataset)[0]
    volume = preprocess_transforms(config.data)({"image": str(entry.image)})["image"]
    assert tuple(volume.shape[1:]) >= (80, 80, 40)


def test_dataset_reports_unloadable_volumes_instead_of_raising(tmp_path, train_dataset):
    from conftest import save_nifti

    bad = save_nifti(tmp_path / "nan.nii.gz", np.full((48, 48, 48), np.nan, np.float32))
    entries = load_datalist(train_dataset)[:1]
    from voco_core.data.datalists import DatalistEntry

    dataset = PretrainDataset([*entries, DatalistEntry(bad)], tiny_config())
    assert isinstance(dataset[0], torch.Tensor)
    failure = dataset[1]
    assert isinstance(failure, LoadFailure)
    assert "nan.nii.gz" in failure.message and "NaN" in failure.message


def test_resumable_sampler_skips_exactly_and_splits_ranks():
    def take(sampler, count):
        it = iter(sampler)
        return [next(it) for _ in range(count)]

    full = take(ResumableRandomSampler(5, seed=1), 23)
    assert sorted(full[:5]) == list(range(5)) and sorted(full[5:10]) == list(range(5))
    assert take(ResumableRandomSampler(5, seed=1, start=7), 16) == full[7:]
    rank0 = take(ResumableRandomSampler(5, seed=1, rank=0, world_size=2), 10)
    rank1 = take(ResumableRandomSampler(5, seed=1, rank=1, world_size=2), 10)
    assert rank0 == full[0:20:2] and rank1 == full[1:20:2]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_datasets_give_the_same_volumes(tmp_path, train_dataset, cache):
    entries = load_datalist(train_dataset)[:2]
    plain = PretrainDataset(entries, tiny_config())
    cached = PretrainDataset(entries, tiny_config({"data": {"cache": cache,
                                                            "cache_dir": str(tmp_path / "c")}}))
    for index in range(2):
        torch.testing.assert_close(cached[index], plain[index])
    if cache == "disk":
        assert len(list((tmp_path / "c").glob("*.pt"))) == 2


def test_memory_cache_refuses_a_bad_volume_naming_it(tmp_path, train_dataset):
    from voco_core.data.datalists import DatalistEntry
    from voco_core.errors import VoCoDataError

    from conftest import save_nifti

    bad = save_nifti(tmp_path / "nan.nii.gz", np.full((48, 48, 48), np.nan, np.float32))
    with pytest.raises(VoCoDataError, match=r"nan\.nii\.gz.*NaN"):
        PretrainDataset([DatalistEntry(bad)], tiny_config({"data": {"cache": "memory"}}))


def test_compact_cache_is_a_quarter_of_float32_and_within_1_over_510(tmp_path, train_dataset):
    entries = load_datalist(train_dataset)[:2]
    plain = PretrainDataset(entries, tiny_config())
    config = tiny_config({"data": {"cache": "compact", "cache_dir": str(tmp_path / "c")}})
    compact = PretrainDataset(entries, config)
    first = [compact[i] for i in range(2)]  # writes the cache
    files = sorted((tmp_path / "c").glob("*.npy"))
    assert len(files) == 2
    for index, file in enumerate(files):
        reference = plain[index]
        assert file.stat().st_size <= reference.numel() * 4 / 4 + 128  # + .npy header
        assert (first[index] - reference).abs().max() <= 1 / 510 + 1e-7
        again = compact[index]  # read back through the memory map
        assert torch.equal(again, first[index])
    # Other pre-processing settings or a changed source file make new entries.
    other = tiny_config({"data": {"cache": "compact", "cache_dir": str(tmp_path / "c"),
                                  "ct_window": [-200, 300]}})
    PretrainDataset(entries[:1], other)[0]
    assert len(list((tmp_path / "c").glob("*.npy"))) == 3


@pytest.mark.parametrize("cache", ["disk", "compact"])
def test_unwritable_cache_folder_is_one_line_naming_it(tmp_path, cache):
    from voco_core.data.datalists import DatalistEntry
    from voco_core.errors import VoCoDataError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tiny_config({"data": {"cache": cache, "cache_dir": str(blocker / "cache")}})
    with pytest.raises(VoCoDataError, match=r"a_file/cache: data\.cache_dir cannot be created"):
        PretrainDataset([DatalistEntry(tmp_path / "x.nii.gz")], config)
