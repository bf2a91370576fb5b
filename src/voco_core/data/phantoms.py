"""Synthetic CT-like torso phantoms with organ label maps.

The phantoms are the embedded default dataset (demos, tests, quality
benchmarks). They carry what VoCo learns from: organs at *consistent relative
positions* (liver on the patient's right, spleen on the left and posterior,
kidneys beside the spine, lungs at the top, ...), with per-subject variation so
that neither position nor intensity alone segments an organ.

Geometry
--------
Arrays are ``(X, Y, Z)`` in RAS+ voxel order: ``i`` runs to the patient's
Right, ``j`` Anterior, ``k`` Superior; the affine is diagonal with the volume
centred on the world origin. The field of view defaults to 400 x 400 x 288 mm,
so the default 160 x 160 x 96 volume has 2.5 x 2.5 x 3.0 mm voxels; pass
``spacing`` for another (e.g. anisotropic) voxel size, the field of view then
being ``shape * spacing``.

Each subject varies by: body size and fat thickness, in-plane shift and
rotation (up to about 6 degrees), a cranio-caudal shift, a smooth random
deformation (about 1 cm), organ size (about +-12 %) and position jitter, organ
texture, noise level (12-25 HU) and partial-volume blur.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same
seed and index give identical arrays (and identical ``.nii.gz`` bytes).

Styles
------
``style="classic"`` (the default) is the population above: one protocol, every organ
present. ``style="varied"`` (:mod:`voco_core.data.phantom_variety`) makes each subject
a different examination too: chest, abdomen or both, patient size and position,
deformed and resized organs, an absent kidney or spleen, liver lesions, contrast phase,
noise and slice thickness, from adult CT population ranges (docs/data.md). Both use
the same 11 labels, so their datasets mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "body",
    2: "spine",
    3: "ribs",
    4: "lungs",
    5: "liver",
    6: "spleen",
    7: "kidney_right",
    8: "kidney_left",
    9: "aorta",
    10: "stomach",
}
LABELS: dict[str, int] = {name: value for value, name in LABEL_NAMES.items()}
STYLES: tuple[str, ...] = ("classic", "varied")

DEFAULT_SHAPE = (160, 160, 96)
DEFAULT_FOV_MM = (400.0, 400.0, 288.0)
_BODY_HALF_WIDTH_MM = (165.0, 115.0)  # left-right, anterior-posterior
_TORSO_HALF_LENGTH_MM = 144.0  # w = +-1 at +-144 mm from the volume centre

# Organs as ellipsoids in the normalised body frame (u: patient right +,
# v: anterior +, w: superior +; the body's outline is u^2 + v^2 = 1).
# name: (label, centre (u, v, w), semi-axes (u, v, w), mean HU)
_ORGANS: dict[str, tuple[int, tuple[float, float, float], tuple[float, float, float], float]] = {
    "lung_right": (4, (0.42, 0.0, 0.62), (0.36, 0.55, 0.6), -840.0),
    "lung_left": (4, (-0.45, -0.05, 0.62), (0.32, 0.5, 0.58), -840.0),
    "liver": (5, (0.4, 0.05, 0.12), (0.45, 0.62, 0.38), 100.0),
    "liver_left_lobe": (5, (0.02, 0.35, 0.2), (0.32, 0.28, 0.2), 100.0),
    "spleen": (6, (-0.56, -0.3, 0.12), (0.18, 0.33, 0.26), 112.0),
    "stomach": (10, (-0.3, 0.32, 0.16), (0.26, 0.27, 0.22), 20.0),
    "kidney_right": (7, (0.37, -0.45, -0.34), (0.15, 0.22, 0.3), 165.0),
    "kidney_left": (8, (-0.37, -0.45, -0.24), (0.15, 0.22, 0.3), 165.0),
}
# Drawn in this order; later organs overwrite earlier ones where they touch.
_DRAW_ORDER = (
    "lung_right",
    "lung_left",
    "liver",
    "liver_left_lobe",
    "spleen",
    "stomach",
    "kidney_right",
    "kidney_left",
)
_AORTA = ((-0.09, -0.36), 0.065, 200.0)  # centre (u, v), radius (u units), HU
_SPINE = ((0.0, -0.66), (0.13, 0.17), 380.0)  # vertebral body centre, semi-axes, HU
_DISC_HU = 70.0
_RIB_HU = 650.0
_FAT_HU = -100.0
_SOFT_TISSUE_HU = 35.0
_AIR_HU = -1000.0


@dataclass(frozen=True)
class Phantom:
    """One synthetic subject.

    Attributes:
        image: ``(X, Y, Z)`` int16, Hounsfield units.
        label: ``(X, Y, Z)`` uint8, values in :data:`LABEL_NAMES`.
        affine: ``(4, 4)`` voxel -> RAS+ mm.
        spacing: voxel size in mm.
        info: what was drawn for a ``varied`` subject (region, phase, slice
            thickness, noise, absent organs, lesions, ...); empty for ``classic``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    info: dict[str, Any] = field(default_factory=dict)


def _smooth_curve(rng: np.random.Generator, n: int, cycles: int = 3) -> np.ndarray:
    """A random smooth 1-D function on ``n`` points, roughly in [-1, 1]."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    curve = np.zeros(n, dtype=np.float32)
    for k in range(1, cycles + 1):
        curve += rng.normal() / k * np.sin(np.pi * k * t + rng.uniform(0, 2 * np.pi))
    return curve / 1.5


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 8):
    """Low-frequency random texture, unit standard deviation, float32 ``shape``."""
    coarse_shape = tuple(max(2, s // coarse) for s in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0)
    noise /= noise.std() + 1e-6
    zoom = [s / c for s, c in zip(shape, coarse_shape, strict=True)]
    return ndimage.zoom(noise, zoom, order=1, grid_mode=True, mode="nearest")


def phantom_affine(shape, spacing) -> np.ndarray:
    """Diagonal RAS+ affine centring a ``shape`` volume of ``spacing`` mm voxels."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


def _check_style(style: str, spacing: tuple[float, float, float] | None) -> None:
    """A known ``style``, and ``spacing`` only for ``classic``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if style != "classic" and spacing is not None:
        raise ValueError(f"spacing cannot be set for style {style!r}: each subject's "
                         "voxel size follows from its field of view and scan range")


def make_phantom(
    seed: int = 0,
    index: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    style: str = "classic",
) -> Phantom:
    """Generate subject ``index`` of the phantom population ``seed``.

    Args:
        seed: population seed.
        index: subject number within the population.
        shape: voxels ``(X, Y, Z)``; each at least 16.
        spacing: voxel size in mm; default: 400 x 400 x 288 mm field of view / shape.
            ``classic`` only: a ``varied`` subject's voxel size follows from its own
            field of view and scan range.
        style: ``"classic"`` or ``"varied"`` (see the module text).
    """
    _check_style(style, spacing)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 sizes of at least 16 voxels, got {shape}")
    if style == "varied":
        from voco_core.data.phantom_variety import make_varied_phantom

        return make_varied_phantom(seed, index, shape)
    if spacing is None:
        spacing = tuple(f / n for f, n in zip(DEFAULT_FOV_MM, shape, strict=True))
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive sizes in mm, got {spacing}")
    rng = np.random.default_rng([int(seed), int(index)])

    # Per-subject pose and build.
    half_w = _BODY_HALF_WIDTH_MM[0] * rng.uniform(0.88, 1.08)
    half_h = _BODY_HALF_WIDTH_MM[1] * rng.uniform(0.88, 1.1)
    shift_x, shift_y = rng.normal(0.0, 8.0, size=2).clip(-16, 16)
    shift_z = rng.uniform(-18.0, 18.0)
    angle = np.deg2rad(rng.uniform(-6.0, 6.0))
    fat_fraction = rng.uniform(0.06, 0.13)

    # World mm coordinates of voxel centres, as broadcastable 1-D axes.
    x = ((np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2) * spacing[0])[:, None, None]
    y = ((np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2) * spacing[1])[None, :, None]
    z = ((np.arange(shape[2], dtype=np.float32) - (shape[2] - 1) / 2) * spacing[2])[None, None, :]
    x, y, z = x - shift_x, y - shift_y, z - shift_z
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))

    # Normalised body frame with a smooth, separable random deformation (~1 cm).
    def wobble(amplitude_mm: float, scale: float) -> np.ndarray:
        fx = _smooth_curve(rng, shape[0])[:, None, None]
        fy = _smooth_curve(rng, shape[1])[None, :, None]
        fz = _smooth_curve(rng, shape[2])[None, None, :]
        return (amplitude_mm / scale) * (fx * fz + fy * fz + 0.5 * fx * fy).astype(np.float32)

    u = (x * cos + y * sin) / np.float32(half_w) + wobble(9.0, half_w)
    v = (-x * sin + y * cos) / np.float32(half_h) + wobble(9.0, half_h)
    w = np.broadcast_to(z / np.float32(_TORSO_HALF_LENGTH_MM), u.shape) + wobble(8.0, 144.0)
    radius2 = u * u + v * v

    label = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, _AIR_HU, dtype=np.float32)
    texture = _smooth_field(rng, shape)

    body = radius2 <= 1.0
    label[body] = LABELS["body"]
    inner = radius2 <= (1.0 - fat_fraction) ** 2
    image[body] = _FAT_HU + 15.0 * texture[body]
    # Inside the fat layer: muscle and visceral fat mixed by a smooth texture.
    image[inner] = _SOFT_TISSUE_HU + 45.0 * texture[inner]

    def ellipsoid(centre, semi, size):
        (cu, cv, cw), (au, av, aw) = centre, semi
        cu, cv, cw = (c + rng.normal(0.0, 0.03) for c in (cu, cv, cw))
        au, av, aw = (a * size for a in (au, av, aw))
        return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 + ((w - cw) / aw) ** 2 <= 1.0

    for name in _DRAW_ORDER:
        value, centre, semi, hu = _ORGANS[name]
        mask = ellipsoid(centre, semi, rng.uniform(0.88, 1.12)) & inner
        label[mask] = value
        image[mask] = hu + rng.normal(0, 6) + 8.0 * texture[mask]
        if value == LABELS["lungs"]:  # vessels: bright specks in dark lung
            image[mask] += 60.0 * np.maximum(texture[mask] * 3.0 - 2.0, 0.0) ** 2
        elif name == "stomach":  # air-fluid level: gas rises anteriorly (supine)
            gas = mask & (v > centre[1] + 0.08 + rng.uniform(0.0, 0.1))
            image[gas] = -950.0
        elif name.startswith("kidney"):  # dimmer renal sinus at the hilum
            sinus = mask & (((u - centre[0]) / 0.06) ** 2 + ((v - centre[1]) / 0.07) ** 2 < 1.0)
            image[sinus] = 40.0

    (au, av), ar, hu = _AORTA
    aorta = ((u - au - rng.normal(0, 0.02)) ** 2 + (v - av) ** 2 <= ar**2) & inner
    label[aorta] = LABELS["aorta"]
    image[aorta] = hu + rng.normal(0, 10) + 5.0 * texture[aorta]

    (su, sv), (sa, sb), hu = _SPINE
    vertebra = ((u - su) / sa) ** 2 + ((v - sv) / sb) ** 2 <= 1.0
    process = ((u - su) / 0.05) ** 2 + ((v - sv + 0.22) / 0.12) ** 2 <= 1.0  # spinous process
    spine = (vertebra | process) & body
    label[spine] = LABELS["spine"]
    # Vertebrae ~30 mm apart, separated by intervertebral discs.
    phase = np.cos(2 * np.pi * (w * _TORSO_HALF_LENGTH_MM / 30.0) + rng.uniform(0, 2 * np.pi))
    disc = spine & (phase > 0.75)
    image[spine] = hu + 60.0 * texture[spine]
    image[disc] = _DISC_HU

    # Ribs: slanted bands in a shell just inside the fat, over the upper torso,
    # open in front of the sternum and behind at the spine.
    rib_shell = (radius2 > (1.0 - fat_fraction - 0.07) ** 2) & inner
    rib_shell &= body & (w > -0.35) & (np.abs(u) > 0.18)
    angle_around = np.arctan2(v, u)
    rib_phase = np.sin(
        2 * np.pi * (w * _TORSO_HALF_LENGTH_MM / 28.0) + 1.2 * np.abs(angle_around)
        + rng.uniform(0, 2 * np.pi)
    )
    ribs = rib_shell & (rib_phase > 0.55)
    label[ribs & (label != LABELS["spine"])] = LABELS["ribs"]
    image[ribs] = _RIB_HU + 80.0 * texture[ribs]

    # Partial-volume blur (about 1 mm) and quantum noise.
    sigma = [max(0.35, 1.2 / s) for s in spacing]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    image += rng.normal(0.0, rng.uniform(12.0, 25.0), size=shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(image, label, phantom_affine(shape, spacing), spacing)


def make_phantom_dataset(
    out: str | Path,
    n: int = 20,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] | None = None,
    overwrite: bool = False,
    style: str = "classic",
) -> Path:
    """Write ``n`` phantoms in Decathlon layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json``.

    Returns the path of ``dataset.json``. Files are named ``phantom_000.nii.gz``...
    Files of those names already in ``out`` are refused before anything is written
    (:func:`~voco_core.outputs.refuse_existing`), unless ``overwrite``.
    ``style="varied"`` (see :func:`make_phantom`) adds ``style`` and, per subject, its
    voxel size and what was drawn (``phantom.subjects``) to ``dataset.json``.
    """
    from voco_core.data.io import write_volume
    from voco_core.errors import VoCoDataError
    from voco_core.outputs import refuse_existing

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_style(style, spacing)  # before anything is written
    out = Path(out)
    names = [f"phantom_{index:03d}.nii.gz" for index in range(n)]
    refuse_existing([out / "dataset.json", *(out / sub / name for name in names
                                             for sub in ("imagesTr", "labelsTr"))], overwrite)
    training, subjects = [], []
    for index in range(n):
        phantom = make_phantom(seed, index, shape, spacing, style=style)
        name = f"phantom_{index:03d}.nii.gz"
        write_volume(out / "imagesTr" / name, phantom.image, affine=phantom.affine)
        write_volume(out / "labelsTr" / name, phantom.label, affine=phantom.affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        subjects.append({"image": f"./imagesTr/{name}",
                         "spacing_mm": [round(s, 4) for s in phantom.spacing],
                         **{k: v for k, v in phantom.info.items() if k != "style"}})
    spec = {
        "name": "VoCoPhantoms",
        "description": f"Synthetic CT torso phantoms (napari-voco), seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
        "phantom": {"seed": seed, "shape": list(shape), "spacing_mm": list(phantom.spacing)},
    }
    if style != "classic":  # classic keeps its dataset.json byte for byte
        spec["description"] += f", style {style}"
        spec["phantom"] = {"seed": seed, "shape": list(shape), "style": style,
                           "subjects": subjects}
    dataset_json = out / "dataset.json"
    tmp = dataset_json.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(spec, indent=2) + "\n")
        tmp.replace(dataset_json)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise VoCoDataError(f"cannot write ({err.strerror or err})", dataset_json) from err
    return dataset_json
