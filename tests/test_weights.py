"""Backbone loading into SwinUNETR from own and released checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from voco_core.config import ModelConfig
from voco_core.errors import VoCoDataError
from voco_core.models import StudentTeacher, backbone_state_dict
from voco_core.weights import LoadReport, load_backbone, normalise_key

TINY = ModelConfig(feature_size=12, head_hidden_dim=16, head_out_dim=8, teacher="none")


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(3)
    return StudentTeacher(TINY)


def swinunetr(feature_size: int = 12) -> SwinUNETR:
    return SwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size, use_v2=True)


def assert_backbone_equal(net: SwinUNETR, model: StudentTeacher) -> None:
    loaded = net.state_dict()
    for key, value in backbone_state_dict(model).items():
        torch.testing.assert_close(loaded[key], value)


def released(model: StudentTeacher, wrap: str | None, prefix: str, swin_vit: bool = False,
             with_head: bool = False) -> dict:
    """A checkpoint in one of the layouts released VoCo weights come in."""
    tensors = {}
    for key, value in backbone_state_dict(model).items():
        key = key.replace("swinViT", "swin_vit") if swin_vit else key
        tensors[prefix + key] = value
    if with_head:
        for key, value in model.student.head.state_dict().items():
            tensors[f"{prefix}head.{key}"] = value
    return {wrap: tensors, "epoch": 10} if wrap else tensors


@pytest.mark.parametrize(
    ("wrap", "prefix", "swin_vit", "layout"),
    [
        (None, "", False, "raw state dict"),
        (None, "module.", True, "raw state dict"),  # names like VoCo_B_SSL_head.pt
        ("state_dict", "module.backbone.", False, "state dict under 'state_dict'"),
        ("model", "", True, "state dict under 'model'"),
        ("student", "student.backbone.", False, "state dict under 'student'"),
    ],
)
def test_released_layouts_load_every_backbone_tensor(pretrained, wrap, prefix, swin_vit, layout):
    net = swinunetr()
    report = load_backbone(net, released(pretrained, wrap, prefix, swin_vit, with_head=True),
                           source="released.pt")
    expected = len(backbone_state_dict(pretrained))
    assert report.layout == layout
    assert len(report.loaded) == expected and not report.missing
    assert not report.shape_mismatched
    assert all(name.startswith("head.") for name in report.unexpected)  # projection head
    assert_backbone_equal(net, pretrained)
    blocks = report.by_block()
    assert blocks["encoder10"]["loaded"] > 0 and blocks["swinViT.layers4"]["loaded"] > 0
    assert "loaded" in report.summary() and "encoder1" in report.summary()


def test_own_pretraining_checkpoint_file(tmp_path, pretrained):
    from voco_core.checkpoint import atomic_torch_save

    path = atomic_torch_save({"format": "napari-voco/pretrain", "step": 3,
                              "student": pretrained.student.state_dict()}, tmp_path / "last.pt")
    net = swinunetr()
    report = load_backbone(net, path)
    assert report.layout.startswith("napari-voco")
    assert len(report.loaded) == len(backbone_state_dict(pretrained))
    assert set(report.unexpected) == {f"head.{k}" for k in pretrained.student.head.state_dict()}
    assert_backbone_equal(net, pretrained)


def test_partial_shape_mismatch_is_reported_by_block(pretrained):
    state = released(pretrained, None, "")
    state["encoder10.layer.conv1.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    net = swinunetr()
    report = load_backbone(net, state)
    assert [n for n, _, _ in report.shape_mismatched] == ["encoder10.layer.conv1.conv.weight"]
    assert report.by_block()["encoder10"]["shape_mismatched"] == 1
    assert "shape mismatch encoder10.layer.conv1.conv.weight" in report.summary()


def test_missing_blocks_are_listed():
    torch.manual_seed(0)
    model = StudentTeacher(TINY)
    state = {k: v for k, v in backbone_state_dict(model).items() if not k.startswith("encoder")}
    report = load_backbone(swinunetr(), state)
    assert report.missing and all(n.startswith("encoder") for n in report.missing)


def test_another_feature_size_is_refused(pretrained):
    # Only the attention bias tables and index buffers (shapes set by heads and
    # window, not width) would fit: refused, and nothing is copied.
    net = swinunetr(24)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(VoCoDataError, match=r"b\.pt: only 8 of \d+ backbone parameters"):
        load_backbone(net, released(pretrained, None, "module."), source="b.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def test_loading_nothing_is_an_error():
    wrong_shape = {"module.encoder1.layer.conv1.conv.weight": torch.zeros(1, 1, 1, 1, 1)}
    with pytest.raises(VoCoDataError, match=r"b\.pt: loaded 0 backbone tensors.*other shapes"):
        load_backbone(swinunetr(), wrong_shape, source="b.pt")
    with pytest.raises(VoCoDataError, match=r"loaded 0 backbone tensors.*no names matched"):
        load_backbone(swinunetr(), {"decoder.weight": torch.zeros(2)}, source="other.pt")
    with pytest.raises(VoCoDataError, match="holds no tensors"):
        load_backbone(swinunetr(), {"epoch": 3}, source="empty.pt")


def test_untrusted_pickles_are_refused(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": os.system}, path)
    with pytest.raises(VoCoDataError, match="refused"):
        load_backbone(swinunetr(), path)


def test_key_normalisation():
    assert normalise_key("module.student.backbone.swin_vit.layers1.0") == "swinViT.layers1.0"
    assert normalise_key("encoder1.layer.norm1.weight") == "encoder1.layer.norm1.weight"
    assert LoadReport.block("swinViT.layers3.0.blocks.1.mlp") == "swinViT.layers3"
    assert LoadReport.block("decoder5.x") == "other"
