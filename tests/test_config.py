"""Config: presets, YAML/JSON round trip, overrides, and invalid values at load time."""

from __future__ import annotations

import json

import pytest
import torch

from voco_core.config import (
    FINETUNE_PRESETS,
    PRESETS,
    PretrainConfig,
    apply_overrides,
    load_finetune_config,
    load_pretrain_config,
    make_finetune_config,
    make_pretrain_config,
    parse_override,
    resolve_device,
)
from voco_core.errors import VoCoConfigError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_yaml_and_json(tmp_path, preset):
    config = make_pretrain_config(preset)
    assert config.preset == preset
    for name in ("config.yaml", "config.json"):
        again = load_pretrain_config(config.save(tmp_path / name))
        assert again == config


def test_base_preset_is_the_authors_setup():
    config = make_pretrain_config("base")
    assert config.data.target_size == (384, 384, 96) and config.geometry.grid_size == 4
    assert config.base_crop_size == (96, 96, 96) and config.random_crop_size == (96, 96, 96)
    assert config.geometry.input_size == 64 and config.num_base_crops == 16
    assert config.model.feature_size == 48 and config.model.ema_momentum == 0.9
    assert config.optim.lr == 1e-4 and config.optim.amsgrad
    assert (config.optim.warmup_steps, config.optim.total_steps) == (5000, 250_000)
    assert config.data.ct_window == (-175.0, 250.0)
    assert [make_pretrain_config(p).model.feature_size for p in ("large", "huge")] == [96, 192]


def test_tiny_preset_fits_a_cpu():
    config = make_pretrain_config("tiny")
    assert config.model.feature_size == 12 and config.geometry.input_size == 40
    assert config.base_crop_size == (40, 40, 40) and not config.geometry.resize_crops


def test_partial_file_is_completed_from_its_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: tiny\noptim:\n  lr: 0.001\n  total_steps: 7\n")
    config = load_pretrain_config(path)
    assert config.optim.lr == 1e-3 and config.optim.total_steps == 7
    assert config.model.feature_size == 12


def test_cli_style_overrides():
    assert parse_override("optim.lr=3e-4") == {"optim": {"lr": 3e-4}}
    config = apply_overrides(make_pretrain_config("tiny"),
                             ["optim.lr=5e-4", "data.target_size=[120,120,40]",
                              "model.teacher=head", "run.tensorboard=false"])
    assert config.optim.lr == 5e-4 and config.data.target_size == (120, 120, 40)
    assert config.model.teacher == "head" and config.run.tensorboard is False


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"geometry": {"grid_size": 5}}, "geometry.grid_size = 5 .* divisor"),
        ({"geometry": {"random_crop_size": [400, 96]}}, "random_crop_size .* at most"),
        ({"optim": {"lr": -1e-4}}, r"optim.lr = -0.0001 .* a learning rate in \(0, 1\)"),
        ({"run": {"device": "gpu0"}}, "run.device = 'gpu0'"),
        ({"model": {"teacher": "half"}}, "model.teacher = 'half' .* one of"),
        ({"model": {"feature_size": 20}}, "multiple of 12"),
        ({"geometry": {"input_size": 32}}, "input_size = 32 .* >= 40"),
        ({"optim": {"batch_size": "two"}}, "optim.batch_size = 'two'"),
        ({"optim": {"learning_rate": 1}}, "unknown config field 'optim.learning_rate'"),
        ({"data": {"target_size": [384, 384]}}, "expected 3 values"),
        ({"loss": {"variant": "v3"}}, r"loss.variant = 'v3' .* one of \['v1', 'v2'\]"),
        ({"loss": {"inter_weight": -1}}, r"loss.inter_weight = -1.0 .* >= 0"),
        ({"model": {"feature_dropout": 1.0}}, r"model.feature_dropout = 1.0 .* \[0, 1\)"),
    ],
)
def test_invalid_values_fail_at_load_time_naming_the_field(overrides, fragment):
    with pytest.raises(VoCoConfigError, match=fragment):
        make_pretrain_config("base", overrides)


def test_native_crops_must_equal_input_size():
    with pytest.raises(VoCoConfigError, match="resize_crops"):
        make_pretrain_config("base", {"geometry": {"resize_crops": False}})


def test_unknown_preset():
    with pytest.raises(VoCoConfigError, match="preset 'xl' is unknown"):
        make_pretrain_config("xl")


@pytest.mark.parametrize(
    ("load", "invalid", "fragment"),
    [
        (load_pretrain_config, {"optim": {"lr": 0}}, r"wrong.json: optim.lr = 0"),
        (load_finetune_config, {"train": {"roi_size": [60, 64, 64]}},
         r"wrong.json: train.roi_size = \(60, 64, 64\)"),
    ],
)
def test_bad_files_are_one_error_naming_the_file(tmp_path, load, invalid, fragment):
    with pytest.raises(VoCoConfigError, match=r"absent.yaml: config file not found"):
        load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(VoCoConfigError, match=r"bad\.json: not a readable"):
        load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(VoCoConfigError, match=r"list.yaml: expected a mapping"):
        load(listed)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"preset": "tiny", **invalid}))
    with pytest.raises(VoCoConfigError, match=fragment):
        load(wrong)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent():
    with pytest.raises(VoCoConfigError, match="CUDA is not available"):
        make_pretrain_config("tiny", {"run": {"device": "cuda"}})
    with pytest.raises(VoCoConfigError, match="CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"


def test_to_dict_is_plain_json():
    values = PretrainConfig().to_dict()
    assert json.loads(json.dumps(values)) == values


@pytest.mark.parametrize("preset", sorted(FINETUNE_PRESETS))
def test_finetune_configs_load_like_pretraining_ones(tmp_path, preset):
    config = make_finetune_config(preset)
    for name in ("config.yaml", "config.json"):
        assert load_finetune_config(config.save(tmp_path / name)) == config


def test_partial_finetune_file_is_completed_from_its_preset(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("preset: tiny\ntrain:\n  total_steps: 9\n")
    config = load_finetune_config(path)
    assert config.train.total_steps == 9 and config.model.feature_size == 12
    assert config.train.roi_size == (64, 64, 64)  # from the tiny preset
