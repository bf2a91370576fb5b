"""Backbone, head, teacher variants, EMA, and the SwinUNETR export."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from voco_core.config import ModelConfig
from voco_core.models import StudentTeacher, backbone_state_dict, ema_update

TINY = ModelConfig(feature_size=12, head_hidden_dim=32, head_out_dim=16)


def test_feature_is_pooled_multiscale_24_times_feature_size():
    model = StudentTeacher(TINY)
    assert model.student.backbone.out_dim == 24 * 12
    student, teacher = model(torch.rand(3, 1, 40, 40, 40))
    assert student.shape == teacher.shape == (3, 16)


@pytest.mark.parametrize("variant", ["full", "head", "none"])
def test_teacher_starts_as_a_copy_and_never_requires_grad(variant):
    model = StudentTeacher(ModelConfig(**{**TINY.__dict__, "teacher": variant}))
    if variant == "none":
        assert model.teacher is None
        return
    source = model.student if variant == "full" else model.student.head
    for t, s in zip(model.teacher.parameters(), source.parameters(), strict=True):
        assert not t.requires_grad
        torch.testing.assert_close(t, s)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.student.parameters()}


def test_ema_update_formula():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_head_variant_teacher_reuses_the_student_backbone():
    model = StudentTeacher(ModelConfig(**{**TINY.__dict__, "teacher": "head"}))
    with torch.no_grad():
        model.student.head.mlp[0].weight.add_(1.0)  # make student and teacher heads differ
    x = torch.rand(2, 1, 40, 40, 40)
    student, teacher = model(x)
    pooled = model.student.backbone(x)
    torch.testing.assert_close(teacher, model.teacher(pooled))
    assert not torch.allclose(student, teacher)


@pytest.mark.parametrize("feature_size", [12, 48])
def test_backbone_loads_into_swinunetr_with_no_unexpected_keys(feature_size):
    model = StudentTeacher(ModelConfig(feature_size=feature_size, head_hidden_dim=8, head_out_dim=8,
                                  teacher="none"))
    exported = backbone_state_dict(model)
    assert exported and all(k.split(".")[0] in {"swinViT", "encoder1", "encoder2", "encoder3",
                                                 "encoder4", "encoder10"} for k in exported)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size, use_v2=True)
    result = net.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith(("decoder", "out.")) for k in result.missing_keys)
    loaded = net.state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(loaded[key], value)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = StudentTeacher(ModelConfig(**{**TINY.__dict__, "teacher": "none"}))
    checkpointed = StudentTeacher(ModelConfig(**{**TINY.__dict__, "teacher": "none",
                                            "gradient_checkpointing": True}))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 40, 40, 40)
    grads = []
    for model in (plain, checkpointed):
        model(x)[0].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_feature_dropout_hits_the_student_in_training_only():
    config = ModelConfig(**{**TINY.__dict__, "teacher": "head", "feature_dropout": 0.5})
    model = StudentTeacher(config)
    x = torch.rand(3, 1, 40, 40, 40)
    torch.manual_seed(0)
    student, teacher = model(x)
    with torch.no_grad():
        pooled = model.student.backbone(x)
        clean_student = model.student.head(pooled)
    # The teacher head sees the clean pooled features; the student's are dropped.
    torch.testing.assert_close(teacher, model.teacher(pooled))
    assert not torch.allclose(student, clean_student, atol=1e-4)
    model.eval()
    with torch.no_grad():
        student_eval, _ = model(x)
    torch.testing.assert_close(student_eval, clean_student)
    # Without dropout the model is unchanged by the new module.
    plain = StudentTeacher(ModelConfig(**{**TINY.__dict__, "teacher": "head"}))
    assert plain.feature_dropout.p == 0.0
