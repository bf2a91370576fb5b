"""Load a VoCo backbone into MONAI's SwinUNETR, with a report of what was loaded.

Accepted checkpoint layouts (all loaded with ``weights_only=True``):

- this project's pretraining checkpoints (``format: napari-voco/pretrain``): the
  student backbone;
- the authors' releases and other raw state dicts: tensors at the top level or
  under ``state_dict``, ``model`` or ``student``; keys with any of the prefixes
  ``module.``, ``student.``, ``backbone.`` (in any order and number), and
  ``swin_vit`` spelled for ``swinViT``.

A tensor is copied only when its (normalised) name *and* shape match a SwinUNETR
encoder tensor (``swinViT.*``, ``encoder1..4``, ``encoder10``). Loading zero
backbone tensors is an error, never a silent no-op (a known trap with released
checkpoints).

Multi-channel networks: single-channel weights (ours or the released ones) load
into a network of ``C`` input channels by adapting the input layers
(:data:`~voco_core.models.INPUT_LAYER_WEIGHTS`: the patch embedding and
``encoder1``'s two convolutions of the image): the kernel ``W`` ``(out, 1, ...)``
becomes ``W / C`` repeated over the ``C`` channels, so a volume whose channels are
all equal gives exactly the single-channel network's response (the convolutions are
linear in their input). :class:`LoadReport` lists them as ``adapted``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from voco_core.checkpoint import PRETRAIN_FORMAT, load_checkpoint
from voco_core.errors import VoCoDataError
from voco_core.models import BACKBONE_PREFIXES, INPUT_LAYER_WEIGHTS

_WRAPPER_KEYS = ("state_dict", "model", "student", "network", "net")
_KEY_PREFIXES = ("module.", "student.", "backbone.", "model.")


@dataclass
class LoadReport:
    """What :func:`load_backbone` did. Names are SwinUNETR parameter names."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)
    """(name, checkpoint shape, model shape)."""
    missing: list[str] = field(default_factory=list)
    """Backbone tensors of the model that the checkpoint does not have."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint tensors that match no backbone tensor of the model (e.g. a decoder or
    projection head)."""
    adapted: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(name, checkpoint shape, model shape) of single-channel input kernels spread over
    the model's input channels (see the module doc); they are also in ``loaded``."""

    @staticmethod
    def block(name: str) -> str:
        """``swinViT.layers1`` / ``swinViT.patch_embed`` / ``encoder2`` / ``other``."""
        parts = name.split(".")
        if parts[0] == "swinViT" and len(parts) > 1:
            return f"swinViT.{parts[1]}"
        return parts[0] if parts[0].startswith("encoder") else "other"

    def by_block(self) -> dict[str, dict[str, int]]:
        """Counts per block: ``{block: {loaded, shape_mismatched, missing}}``."""
        counts: dict[str, Counter] = {}
        for kind, names in (("loaded", self.loaded),
                            ("shape_mismatched", [n for n, _, _ in self.shape_mismatched]),
                            ("missing", self.missing)):
            for name in names:
                counts.setdefault(self.block(name), Counter())[kind] += 1
        return {block: {k: c[k] for k in ("loaded", "shape_mismatched", "missing")}
                for block, c in sorted(counts.items())}

    def summary(self) -> str:
        """A few lines for the CLI and the GUI."""
        lines = [f"{self.source} ({self.layout}): loaded {len(self.loaded)} backbone tensors, "
                 f"{len(self.shape_mismatched)} shape-mismatched, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected"]
        if self.adapted:
            channels = self.adapted[0][2][1]
            lines.append(f"  adapted {len(self.adapted)} single-channel input tensors to "
                         f"{channels} channels (kernel / {channels}, repeated): "
                         + ", ".join(name for name, _, _ in self.adapted))
        for block, c in self.by_block().items():
            lines.append(f"  {block:<22} loaded {c['loaded']:>4}  mismatched "
                         f"{c['shape_mismatched']:>3}  missing {c['missing']:>3}")
        for name, theirs, ours in self.shape_mismatched[:5]:
            lines.append(f"  shape mismatch {name}: checkpoint {theirs} vs model {ours}")
        return "\n".join(lines)


def normalise_key(key: str) -> str:
    """Strip wrapper prefixes and map the release's spelling to SwinUNETR's."""
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key.replace("swin_vit", "swinViT")


def extract_tensors(state: dict, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a loaded checkpoint, and a name for its layout."""
    if state.get("format") == PRETRAIN_FORMAT:
        return state["student"], "napari-voco pretraining checkpoint (student)"
    for key in _WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, f"state dict under '{key}'"
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise VoCoDataError(
            f"holds no tensors at the top level or under {list(_WRAPPER_KEYS)} "
            f"(top-level keys: {sorted(state)[:8]})", source)
    return tensors, "raw state dict"


def spread_input_channels(name: str, tensor: torch.Tensor, shape: tuple[int, ...]
                          ) -> torch.Tensor | None:
    """A single-channel input kernel ``(out, 1, ...)`` adapted to ``shape`` ``(out, C,
    ...)``: ``tensor / C`` repeated over the channels (equal channels then give the
    single-channel response); None unless ``name`` is an input layer
    (:data:`INPUT_LAYER_WEIGHTS`) and only the channel axis differs from 1."""
    theirs = tuple(tensor.shape)
    if (name not in INPUT_LAYER_WEIGHTS or len(theirs) != len(shape) or len(shape) < 2
            or theirs[1] != 1 or theirs[:1] + theirs[2:] != shape[:1] + shape[2:]):
        return None
    channels = shape[1]
    return (tensor / channels).repeat(1, channels, *([1] * (len(shape) - 2)))


def load_backbone(model: nn.Module, checkpoint: str | Path | dict,
                  source: str | None = None, min_fraction: float = 0.5) -> LoadReport:
    """Copy matching backbone tensors from ``checkpoint`` into ``model`` (a SwinUNETR).

    ``checkpoint`` is a file (or run folder), or an already loaded dict. Raises
    :class:`VoCoDataError` when no backbone tensor matches, or when fewer than
    ``min_fraction`` of the backbone's learned parameters would be loaded: a
    checkpoint of another feature size still matches the attention bias tables (their
    shape depends on heads and window only), which must not pass for a pretrained
    backbone. Nothing is copied when it raises.
    """
    if isinstance(checkpoint, dict):
        state, source = checkpoint, source or "checkpoint"
    else:
        state, source = load_checkpoint(checkpoint), source or str(checkpoint)
    tensors, layout = extract_tensors(state, source)
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}
    report = LoadReport(source=source, layout=layout)
    matched: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = normalise_key(key)
        if name not in ours:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(ours[name].shape):
            adapted = spread_input_channels(name, tensor, tuple(ours[name].shape))
            if adapted is None:
                report.shape_mismatched.append((name, tuple(tensor.shape),
                                                tuple(ours[name].shape)))
            else:
                matched[name] = adapted
                report.adapted.append((name, tuple(tensor.shape), tuple(ours[name].shape)))
        else:
            matched[name] = tensor
    report.loaded = sorted(matched)
    seen = set(matched) | {n for n, _, _ in report.shape_mismatched}
    report.missing = sorted(set(ours) - seen)
    if not matched:
        hint = (f"{len(report.shape_mismatched)} names matched with other shapes (another "
                "feature size?)" if report.shape_mismatched else
                f"no names matched (checkpoint keys look like {sorted(tensors)[:3]})")
        raise VoCoDataError(f"loaded 0 backbone tensors into SwinUNETR: {hint}", source)
    parameters = {k for k, _ in model.named_parameters() if k.startswith(BACKBONE_PREFIXES)}
    fraction = len(parameters & set(matched)) / max(1, len(parameters))
    if fraction < min_fraction:
        raise VoCoDataError(
            f"only {len(parameters & set(matched))} of {len(parameters)} backbone parameters "
            f"match by name and shape ({len(report.shape_mismatched)} tensors have other "
            "shapes: another feature size or network?); nothing was loaded", source)
    model.load_state_dict(matched, strict=False)
    return report
