"""Intensity normalisation to [0, 1]: a CT window, or a volume's own percentiles.

``data.intensity`` (pretraining and finetuning configs; inference and the GUI use the
checkpoint's):

- ``ct``: the Hounsfield window ``ct_window`` (default -175..250 HU, soft tissue)
  maps to [0, 1], clipped.
- ``percentile``: the volume's own ``percentiles`` (default 0.5th..99.5th) map to
  [0, 1], clipped: MRI, and anything else whose values are not Hounsfield units.
- ``auto`` (the default): decided per volume. A CT in Hounsfield units contains air
  (about -1000 HU, outside and inside the body) and lung; no MRI does (MRI, PET and
  microscopy intensities are non-negative). So a volume is taken as CT when at least
  ``AIR_FRACTION`` of its voxels lie below ``AIR_HU``, and normalised by percentiles
  otherwise. The choice is reported (a CLI line, the GUI's status) and stored with
  the pre-processed volume under ``INTENSITY_KEY``.

A multi-channel volume ``(C, X, Y, Z)`` is normalised channel by channel: each
channel gets its own percentiles (T1, T2 and FLAIR have unrelated scales), and
``auto`` decides per channel (a CT channel beside a PET channel). The recorded
choice is one word when every channel agrees, else the channels' choices joined by
``+`` (``"ct+percentile"``), which :func:`describe_intensity` spells out per channel.

The default CT window applied to an 8-bit MRI maps 0 to 0.41 and everything above
250 to 1: the foreground crop then keeps the whole volume and most of the brain is
one flat value. ``auto`` exists so that nobody has to know that.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from monai import transforms as mt

AIR_HU = -500.0
"""Below this a voxel is air or lung in Hounsfield units (fat is about -100 HU)."""
AIR_FRACTION = 0.005
"""Fraction of voxels below :data:`AIR_HU` that makes a volume a CT (0.5%)."""
INTENSITY_KEY = "intensity"
"""Key of the per-volume choice (``"ct"`` or ``"percentile"``) in a pre-processed dict."""
FOREGROUND_KEY = "foreground_kept"
"""Key of the fraction of a volume's voxels that its foreground crop kept (0..1)."""
WHOLE_VOLUME = 0.95
"""A foreground crop keeping at least this fraction found no background to remove."""
SAMPLE_VOXELS = 1_000_000  # the decision looks at an evenly strided subset: fast, stable


def looks_like_hounsfield(image: np.ndarray | torch.Tensor) -> bool:
    """Whether at least :data:`AIR_FRACTION` of ``image``'s voxels lie below
    :data:`AIR_HU` (any shape; at most about a million voxels are looked at)."""
    values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    flat = values.reshape(-1)
    stride = max(1, flat.size // SAMPLE_VOXELS)
    sample = flat[::stride]
    return bool(sample.size) and float(np.mean(sample < AIR_HU)) >= AIR_FRACTION


def resolve_intensity(mode: str, image) -> Literal["ct", "percentile"]:
    """``mode`` itself, or for ``auto`` the choice for this ``image``."""
    if mode == "auto":
        return "ct" if looks_like_hounsfield(image) else "percentile"
    return mode  # type: ignore[return-value]


def describe_intensity(choice: str, data) -> str:
    """``"CT window -175..250 HU"`` or ``"percentiles 0.5..99.5"`` for a data config;
    for per-channel choices (``"ct+percentile"``, see the module doc) ``"channel 1 CT
    window -175..250 HU, channel 2 percentiles 0.5..99.5"``."""
    if "+" in choice:
        return ", ".join(f"channel {c + 1} {describe_intensity(one, data)}"
                         for c, one in enumerate(choice.split("+")))
    if choice == "ct":
        low, high = data.ct_window
        return f"CT window {low:g}..{high:g} HU"
    low, high = data.percentiles
    return f"percentiles {low:g}..{high:g}"


def preprocessing_report(volumes: Mapping[str, Mapping], data) -> list[str]:
    """Lines about a set of pre-processed volumes (name -> dict out of the pipeline):
    what ``intensity: auto`` chose, and which foreground crops kept (nearly) the whole
    volume (a sign of a wrong intensity setting or threshold)."""
    lines = [summarise_choices({n: v.get(INTENSITY_KEY) for n, v in volumes.items()}, data)]
    lines.append(whole_volume_warning({n: v.get(FOREGROUND_KEY) for n, v in volumes.items()}))
    return [line for line in lines if line]


def whole_volume_warning(kept: Mapping[str, float | None]) -> str:
    """A warning line naming the volumes whose foreground crop kept at least
    :data:`WHOLE_VOLUME` of them; empty when there are none."""
    whole = sorted(name for name, fraction in kept.items()
                   if fraction is not None and fraction >= WHOLE_VOLUME)
    if not whole:
        return ""
    shown = ", ".join(whole[:5]) + (f" and {len(whole) - 5} more" if len(whole) > 5 else "")
    return (f"warning: the foreground crop kept the whole volume for {len(whole)} of "
            f"{len(kept)} volumes ({shown}): no background was found after intensity "
            "normalisation; check data.intensity (MRI: percentile or auto) and the "
            "foreground threshold")


def summarise_choices(choices: Mapping[str, str | None], data) -> str:
    """One line for a set of volumes (name -> choice): what ``auto`` chose, naming the
    volumes that differ from the majority; empty unless ``data.intensity`` is ``auto``."""
    if data.intensity != "auto":
        return ""
    known = {name: c for name, c in choices.items() if c is not None}
    if not known:
        return ""
    counts = {c: sum(1 for v in known.values() if v == c) for c in set(known.values())}
    majority = max(sorted(counts), key=counts.get)
    line = (f"intensity auto: {counts[majority]} of {len(known)} volumes as "
            f"{describe_intensity(majority, data)}")
    for other in sorted(c for c in counts if c != majority):
        others = sorted(name for name, c in known.items() if c == other)
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5
                                         else "")
        line += f"; {describe_intensity(other, data)}: {shown}"
    return line


class NormaliseIntensityd(mt.MapTransform):
    """Map ``key``'s intensities ``(C, X, Y, Z)`` to [0, 1] by ``data.intensity``
    (``ct``, ``percentile`` or ``auto``), each channel on its own (see the module doc),
    and record the choice under :data:`INTENSITY_KEY`. ``data``: a pretraining or
    finetuning data config."""

    def __init__(self, key: Hashable, data) -> None:
        super().__init__([key])
        self.key, self.mode = key, data.intensity
        low, high = data.ct_window
        self.ct = mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        low, high = data.percentiles
        self.percentile = mt.ScaleIntensityRangePercentiles(lower=low, upper=high, b_min=0.0,
                                                            b_max=1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        image = out[self.key]
        if image.shape[0] == 1:
            choice = resolve_intensity(self.mode, image)
            out[self.key] = (self.ct if choice == "ct" else self.percentile)(image)
            out[INTENSITY_KEY] = choice
            return out
        choices = [resolve_intensity(self.mode, image[c]) for c in range(image.shape[0])]
        # Written into a copy channel by channel: the copy keeps the MetaTensor's affine
        # and the spatial steps applied so far (MONAI's inverse needs them).
        normalised = torch.as_tensor(image).clone().float()
        for c, choice in enumerate(choices):
            scale = self.ct if choice == "ct" else self.percentile
            normalised[c] = torch.as_tensor(scale(image[c:c + 1]), dtype=torch.float32)[0]
        out[self.key] = normalised
        out[INTENSITY_KEY] = choices[0] if len(set(choices)) == 1 else "+".join(choices)
        return out


class MeasureForegroundCropd(mt.MapTransform):
    """Wraps a foreground-crop step of a pipeline: ``before`` records ``key``'s spatial
    size, ``after`` stores the fraction of it the crop kept under
    :data:`FOREGROUND_KEY`. Two plain (non-invertible) steps, so MONAI's inverse of the
    pipeline is that of the crop itself."""

    _SHAPE = "_shape_before_foreground_crop"

    def __init__(self, key: Hashable, stage: Literal["before", "after"]) -> None:
        super().__init__([key])
        self.key, self.stage = key, stage

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        size = int(np.prod(out[self.key].shape[1:]))
        if self.stage == "before":
            out[self._SHAPE] = size
        else:
            out[FOREGROUND_KEY] = size / max(1, out.pop(self._SHAPE, size))
        return out


def measured_foreground_crop(key: Hashable, crop) -> list:
    """``crop`` between the two :class:`MeasureForegroundCropd` steps."""
    return [MeasureForegroundCropd(key, "before"), crop, MeasureForegroundCropd(key, "after")]


class PreprocessingNotes:
    """What a pretraining run reports about its volumes as they are first loaded (they
    load lazily, so there is no list up front): the first volume's ``auto`` choice,
    then only the volumes that differ from it, and the first foreground crop that kept
    the whole volume. ``pending`` collects the lines until the trainer takes them."""

    def __init__(self, data) -> None:
        self.data, self.seen, self.first = data, set(), None
        self.warned = False
        self.pending: list[str] = []

    def add(self, name: str, intensity: str | None, kept: float | None) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        if self.data.intensity == "auto" and intensity is not None:
            if self.first is None:
                self.first = intensity
                self.pending.append(f"intensity auto: {name} as "
                                    f"{describe_intensity(intensity, self.data)} (decided "
                                    "per volume; volumes that differ are reported)")
            elif intensity != self.first:
                self.pending.append(f"intensity auto: {name} as "
                                    f"{describe_intensity(intensity, self.data)}")
        if not self.warned and kept is not None and kept >= WHOLE_VOLUME:
            self.warned = True
            self.pending.append(whole_volume_warning({name: kept}) + " (reported once)")

    def take(self) -> str:
        """The pending lines, one per line, and forget them."""
        lines, self.pending = self.pending, []
        return "\n".join(lines)
