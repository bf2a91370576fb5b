"""VoCo v2 end to end: ``voco pretrain --set loss.variant=v2`` trains, and the position
inspector reads a v2 checkpoint with the loss's own student-vs-teacher logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from voco_core.cli import main
from voco_core.config import make_pretrain_config
from voco_core.data.io import read_volume
from voco_core.errors import VoCoConfigError
from voco_core.geometry import base_crop_grid
from voco_core.inference import (
    PositionModel,
    crops_for_network,
    load_position_model,
    positions,
    prepare_volume,
)
from voco_core.losses import overlap_logits
from voco_core.models import BackboneWithHead, ProjectionHead

from conftest import shared_folder, tiny_config


@pytest.fixture(scope="module")
def v2_run(train_dataset, tmp_path_factory) -> Path:
    """Two tiny v2 steps through the CLI: two volumes per step (so the inter-volume
    term pairs different volumes), teacher head, feature dropout."""
    def make(folder: Path) -> None:
        config_file = tiny_config({"optim": {"batch_size": 2}}).save(folder / "config.yaml")
        assert main(["pretrain", "--data", str(train_dataset), "--out", str(folder / "run"),
                     "--config", str(config_file), "--steps", "2",
                     "--set", "loss.variant=v2", "--set", "model.teacher=head",
                     "--set", "model.feature_dropout=0.2"]) == 0

    return shared_folder(tmp_path_factory, "v2", make) / "run"


def test_v2_pretraining_logs_its_terms(v2_run):
    records = [json.loads(line) for line in (v2_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        terms = record["terms"]
        assert list(terms) == ["intra", "inter", "reg"]
        assert all(math.isfinite(terms[name]) and terms[name] >= 0
                   for name in ("intra", "inter", "reg"))
        assert record["loss"] == pytest.approx(terms["intra"] + terms["inter"] + terms["reg"],
                                               rel=1e-5)
    state = torch.load(v2_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["loss"]["variant"] == "v2"
    assert set(state["teacher"]) == set(ProjectionHead(1, 1, 1).state_dict())


def test_positions_of_a_v2_run_are_student_vs_teacher(v2_run, train_dataset):
    model = load_position_model(v2_run, device="cpu")
    assert isinstance(model.teacher, ProjectionHead) and not model.teacher.training
    image = read_volume(train_dataset / "imagesTr" / "phantom_001.nii.gz")
    result = positions(image, model, n=3, seed=2)
    assert result.predicted.shape == (3, 4)

    # The same numbers by hand: student head on [bases, x_a], teacher head on the same
    # pooled features, then the loss's overlap_logits (one direction).
    prepared = prepare_volume(image, model)
    bases = base_crop_grid(tuple(prepared.sample.shape[1:]), model.config.geometry.grid_size)
    s = model.config.geometry.input_size
    crops = torch.cat([crops_for_network(prepared.sample, bases, s),
                       crops_for_network(prepared.sample, result.sample_boxes, s)])
    with torch.no_grad():
        pooled = model.net.backbone(crops)
        for a in range(3):
            batch = torch.cat([pooled[:4], pooled[4 + a:5 + a]])
            q = overlap_logits(model.net.head(batch)[None, 4:], model.teacher(batch)[None, :4])
            np.testing.assert_allclose(result.predicted[a], q[0, 0].numpy(), atol=1e-5)
            student_only = overlap_logits(model.net.head(batch)[None, 4:],
                                          model.net.head(batch)[None, :4])
            assert not torch.allclose(q, student_only, atol=1e-6)

    # Without a stored teacher the inspector falls back to student vs student.
    plain = PositionModel(model.net, model.config, model.device, model.source, model.step)
    fallback = positions(image, plain, boxes=result.boxes)
    assert not np.allclose(fallback.predicted, result.predicted, atol=1e-6)


def test_positions_with_a_full_v2_teacher_use_its_own_backbone(train_dataset):
    config = tiny_config({"loss": {"variant": "v2"}, "model": {"teacher": "full"}})
    torch.manual_seed(0)
    student, teacher = BackboneWithHead(config.model).eval(), BackboneWithHead(config.model).eval()
    model = PositionModel(student, config, torch.device("cpu"), "random", 0, teacher)
    image = read_volume(train_dataset / "imagesTr" / "phantom_000.nii.gz")
    result = positions(image, model, n=1, seed=0)
    prepared = prepare_volume(image, model)
    bases = base_crop_grid(tuple(prepared.sample.shape[1:]), 2)
    crops = torch.cat([crops_for_network(prepared.sample, bases, 40),
                       crops_for_network(prepared.sample, result.sample_boxes[:1], 40)])
    with torch.no_grad():
        q = overlap_logits(student(crops)[None, 4:], teacher(crops)[None, :4])
    np.testing.assert_allclose(result.predicted[0], q[0, 0].numpy(), atol=1e-5)


def test_v2_needs_a_teacher_and_the_v2_preset_is_valid():
    with pytest.raises(VoCoConfigError, match=r"model.teacher = 'none' .* loss.variant v2"):
        make_pretrain_config("tiny", {"loss": {"variant": "v2"}, "model": {"teacher": "none"}})
    config = make_pretrain_config("v2", check_device=False)
    assert config.loss.variant == "v2" and config.model.teacher == "head"
    assert config.base_crop_size == (64, 64, 64) and config.num_base_crops == 9
    assert (config.model.head_hidden_dim, config.model.head_out_dim) == (1024, 1024)
    assert config.model.feature_dropout == 0.2 and not config.geometry.resize_crops


def test_plan_says_when_v2_would_pair_a_volume_with_itself(tmp_path):
    from voco_core.plan import plan_pretrain

    def notes(**optim):
        return [n for n in plan_pretrain(preset="tiny", out=tmp_path / "run", overrides={
            "loss": {"variant": "v2"}, "model": {"teacher": "head"}, "optim": optim}).notes
            if "inter-volume" in n]

    assert notes(batch_size=1) and "optim.batch_size >= 2" in notes(batch_size=1)[0]
    assert notes(batch_size="auto")  # auto keeps tiny's 1 volume per micro-batch
    assert not notes(batch_size=2)
