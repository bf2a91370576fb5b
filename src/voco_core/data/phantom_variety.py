"""The ``varied`` phantom style: a CT population that a few labelled subjects cannot cover.

The ``classic`` style (:func:`voco_core.data.phantoms.make_phantom`) draws every subject
from one protocol: the same field of view, every organ present, one contrast phase and
organ sizes within +-12 %. Here each subject is also a different *examination*:

- **field of view**: a chest, abdomen or chest-and-abdomen scan range (set from the
  subject's own lung apices, lung bases and kidney poles), a display field of view fitted
  to the patient, a body of its own size and fat thickness, off centre and rolled;
- **anatomy**: a smooth random displacement field over the whole body, per-organ volume
  factors from adult population ranges, per-organ taper and bend, diaphragm level, an
  absent kidney or spleen in some subjects, focal liver lesions in others;
- **appearance**: contrast phase (non-contrast, arterial, portal-venous) with a per-subject
  enhancement factor, stomach contents, bone density, noise level and slice thickness.

The ranges are a fixed specification, documented with where each comes from in
``docs/data.md`` ("Varied phantoms"). Every subject keeps the requested ``shape``; its
voxel size follows from its field of view (in-plane) and scan range (z).

Determinism: the subject's parameters come from ``default_rng([seed, index, 1])``, its
smooth fields from ``[seed, index, 2]`` and its noise from ``[seed, index, 3]``: the same
seed, index and shape give identical arrays. The parameters (and so the patient and the
examination) do not depend on ``shape``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from voco_core.data.phantoms import (
    _AIR_HU,
    _AORTA,
    _DISC_HU,
    _DRAW_ORDER,
    _FAT_HU,
    _ORGANS,
    _SPINE,
    LABELS,
    Phantom,
    phantom_affine,
)

# ---------------------------------------------------------------- the specification
# (docs/data.md, "Varied phantoms", gives the source of every range)

#: Scan range: probability of each examination.
REGIONS: dict[str, float] = {"chest": 0.30, "abdomen": 0.40, "chest+abdomen": 0.30}
#: Contrast phase: probability of each.
PHASES: dict[str, float] = {"non-contrast": 0.25, "arterial": 0.15, "portal-venous": 0.60}
_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}
#: Mean HU (non-contrast, arterial, portal-venous) before the subject's enhancement factor.
PHASE_HU: dict[str, tuple[float, float, float]] = {
    "liver": (58.0, 78.0, 110.0),
    "spleen": (48.0, 120.0, 115.0),
    "kidney_cortex": (32.0, 180.0, 165.0),
    "kidney_medulla": (32.0, 70.0, 135.0),
    "aorta": (42.0, 300.0, 165.0),
    "soft_tissue": (35.0, 42.0, 48.0),  # muscle and visceral fat mixed by a texture
}
ENHANCEMENT_RANGE = (0.75, 1.25)  # x (phase HU - non-contrast HU), one per subject
ORGAN_HU_SD = 5.0  # per organ, around its phase mean
#: Slice thickness (mm) groups: (probability, choices).
SLICE_THICKNESS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (0.30, (0.625, 1.0, 1.25)),
    (0.40, (2.0, 2.5, 3.0)),
    (0.30, (5.0,)),
)
NOISE_SD_5MM_RANGE = (7.0, 16.0)  # HU, soft-tissue noise SD at 5 mm, ~ 1 / sqrt(thickness)
NOISE_SD_CLIP = (5.0, 45.0)
#: Organ volume factor x the classic mean volume (lungs: x the classic lungs scaled to
#: the subject's frame): (median, log-normal SD, lowest, highest). Classic mean volumes
#: at 160 x 160 x 96: liver 1.30 L, spleen 180 mL, kidney 105 mL, stomach 180 mL.
VOLUME_FACTOR: dict[str, tuple[float, float, float, float]] = {
    "lungs": (1.0, 0.10, 0.75, 1.30),
    "liver": (1.15, 0.20, 0.77, 1.92),  # 1.0 - 2.5 L
    "spleen": (0.80, 0.35, 0.45, 2.20),  # 80 - 400 mL
    "kidney": (1.35, 0.13, 0.95, 1.80),  # 100 - 190 mL each
    "stomach": (1.0, 0.45, 0.40, 2.50),  # 70 - 450 mL, filling
}
HYPERTROPHY_RANGE = (1.15, 1.40)  # volume factor of a solitary kidney
P_ABSENT: dict[str, float] = {"kidney_right": 0.04, "kidney_left": 0.04, "spleen": 0.04}
P_LESION = 0.25
LESION_COUNT = {1: 0.6, 2: 0.25, 3: 0.15}
LESION_DIAMETER_MM = (8.0, 40.0)  # log-uniform
#: Lesion kinds: probability, and HU as (absolute or offset from the liver) per phase.
LESION_KINDS: dict[str, float] = {"cyst": 0.4, "hypovascular": 0.4, "hypervascular": 0.2}
_LESION_OFFSET = {  # (mean, sd) of lesion - liver HU per phase (non-contrast, art., PV)
    "hypovascular": ((-15.0, 5.0), (-25.0, 10.0), (-45.0, 15.0)),
    "hypervascular": ((-10.0, 5.0), (50.0, 20.0), (-5.0, 10.0)),
}
_CYST_HU = (10.0, 5.0)  # water density in every phase (mean, sd)
#: Stomach contents: probability and (mean HU, sd).
STOMACH_CONTENTS: dict[str, tuple[float, float, float]] = {
    "water": (0.55, 10.0, 5.0),
    "food": (0.25, 35.0, 10.0),
    "oral contrast": (0.20, 250.0, 50.0),
}
P_NO_STOMACH_GAS = 0.2

LEAN_SCALE = (0.06, 0.86, 1.16)  # stature/frame: (SD, lowest, highest) x classic body
FAT_FRACTION = (0.04, 0.26)  # of the outer radius: 0.04 + 0.26 * Beta(2, 3.5)
TRUNK_LENGTH_RANGE = (0.92, 1.08)  # cranio-caudal scale of the anatomy
DFOV_RANGE_MM = (300.0, 500.0)  # reconstruction field of view, fitted to the body
DFOV_MARGIN = (1.05, 1.30)  # DFOV / body width before clipping to DFOV_RANGE_MM
OFFSET_SD_MM, OFFSET_MAX_MM = 12.0, 35.0  # body centre from the image centre
ROTATION_MAX_DEG = 8.0
DEFORM_STEP_MM = 64.0  # control-point spacing of the smooth displacement field
DEFORM_SD_RANGE_MM = (2.0, 6.0)  # its SD (peaks about 3x), one per subject
DIAPHRAGM_SD = 0.05  # w units (x trunk half-length ~ 144 mm): ~7 mm
#: Scan range edges (mm) relative to the subject's landmarks.
CHEST_TOP_ABOVE_APEX_MM = (10.0, 40.0)
CHEST_BOTTOM_ABOVE_KIDNEY_TOP_MM = (-10.0, 30.0)
ABDOMEN_TOP_MM = (-30.0, 20.0)  # from (lung base - 30 mm) to (liver dome + 20 mm), uniform
ABDOMEN_BOTTOM_BELOW_KIDNEY_MM = (20.0, 100.0)

_LEAN_INNER = 0.905  # inner (muscle) radius in lean units: the classic mean 1 - fat
_TRUNK_HALF_LENGTH_MM = 144.0
_CLASSIC_FRAME = (165.0, 115.0, _TRUNK_HALF_LENGTH_MM)  # mm per unit of the organ table
_TEXTURE_STEP_MM = 24.0
_PARTIAL_VOLUME_MM = 1.2  # Gaussian sigma of the classic partial-volume blur
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_BSPLINE_GAIN = (151.0 / 315.0) ** 3  # variance of a 3-D cubic B-spline of unit coefficients
_STREAM_SUBJECT, _STREAM_FIELDS, _STREAM_NOISE = 1, 2, 3


def _choice(rng: np.random.Generator, table: dict[str, Any]) -> str:
    names = list(table)
    weights = np.array([table[n] if np.isscalar(table[n]) else table[n][0] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _lognormal(rng: np.random.Generator, median: float, sd: float, low: float,
               high: float) -> float:
    return float(np.clip(median * np.exp(rng.normal(0.0, sd)), low, high))


# ---------------------------------------------------------------- one subject's draw


def draw_subject(seed: int, index: int) -> dict[str, Any]:
    """The patient and examination of subject ``index`` of population ``seed``: scalars
    only (no voxels), independent of the output shape."""
    rng = np.random.default_rng([int(seed), int(index), _STREAM_SUBJECT])
    s: dict[str, Any] = {}

    # Patient: frame, fat, trunk length, pose.
    s["lean_scale"] = float(np.clip(rng.normal(1.0, LEAN_SCALE[0]), *LEAN_SCALE[1:]))
    s["aspect"] = (float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.92, 1.10)))
    s["fat_fraction"] = float(FAT_FRACTION[0] + FAT_FRACTION[1] * rng.beta(2.0, 3.5))
    s["trunk_scale"] = float(rng.uniform(*TRUNK_LENGTH_RANGE))
    s["offset_mm"] = [float(v) for v in
                      rng.normal(0.0, OFFSET_SD_MM, size=2).clip(-OFFSET_MAX_MM, OFFSET_MAX_MM)]
    s["rotation_deg"] = float(rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG))
    s["deform_sd_mm"] = float(rng.uniform(*DEFORM_SD_RANGE_MM))
    s["diaphragm_shift"] = float(rng.normal(0.0, DIAPHRAGM_SD))

    # Absent organs and organ sizes.
    absent = [name for name, p in P_ABSENT.items() if rng.uniform() < p]
    if "kidney_right" in absent and "kidney_left" in absent:
        absent.remove("kidney_left")  # a patient keeps one kidney at least
    s["absent"] = absent
    factors = {
        "lungs": _lognormal(rng, *VOLUME_FACTOR["lungs"]),
        "liver": _lognormal(rng, *VOLUME_FACTOR["liver"]),
        "spleen": _lognormal(rng, *VOLUME_FACTOR["spleen"]),
        "kidney_right": _lognormal(rng, *VOLUME_FACTOR["kidney"]),
        "kidney_left": _lognormal(rng, *VOLUME_FACTOR["kidney"]),
        "stomach": _lognormal(rng, *VOLUME_FACTOR["stomach"]),
    }
    hypertrophy = float(rng.uniform(*HYPERTROPHY_RANGE))
    for side, other in (("kidney_right", "kidney_left"), ("kidney_left", "kidney_right")):
        if other in absent:
            factors[side] *= hypertrophy  # compensatory growth of a solitary kidney
    for name in absent:
        factors[name] = 0.0
    s["volume_factor"] = factors

    # Organs in mm: positions follow the subject's frame (lean body, trunk length);
    # sizes follow the volume factors alone, except the lungs, which fill the thorax.
    frame = _frame(s)
    organs: dict[str, dict[str, Any]] = {}
    for name in _DRAW_ORDER:
        label, centre, semi, _ = _ORGANS[name]
        key = "lungs" if label == LABELS["lungs"] else "liver" if label == LABELS["liver"] else name
        linear = max(factors[key], 1e-3) ** (1.0 / 3.0)
        units = frame if label == LABELS["lungs"] else _CLASSIC_FRAME
        axes = [a * linear * float(np.exp(rng.normal(0.0, 0.06))) * f
                for a, f in zip(semi, units, strict=True)]
        jitter_w = 0.07 if name.startswith("kidney") else 0.04
        cu, cv, cw = (centre[0] + rng.normal(0.0, 0.03), centre[1] + rng.normal(0.0, 0.03),
                      centre[2] + rng.normal(0.0, jitter_w))
        if label == LABELS["lungs"]:  # the base follows the diaphragm, the apex stays
            cw += s["diaphragm_shift"] / 2.0
            axes[2] -= s["diaphragm_shift"] / 2.0 * frame[2]
        elif not name.startswith("kidney"):
            cw += s["diaphragm_shift"]
        organs[name] = {
            "centre": tuple(float(c * f) for c, f in zip((cu, cv, cw), frame, strict=True)),
            "semi": tuple(map(float, axes)),
            "taper": tuple(float(t) for t in rng.uniform(-0.2, 0.2, size=2)),
            "bend": tuple(float(b) for b in rng.uniform(-0.25, 0.25, size=2)),
        }
    s["organs"] = organs
    s["aorta_scale"] = float(rng.uniform(0.8, 1.3))
    s["spine_scale"] = float(rng.uniform(0.9, 1.1))

    # Landmarks (mm, anatomical z) and the scan range.
    marks = _landmarks(s)
    region = _choice(rng, REGIONS)
    above_apex = float(rng.uniform(*CHEST_TOP_ABOVE_APEX_MM))
    chest_bottom = float(rng.uniform(*CHEST_BOTTOM_ABOVE_KIDNEY_TOP_MM))
    abdomen_top = float(rng.uniform(marks["lung_base"] + ABDOMEN_TOP_MM[0],
                                    marks["liver_dome"] + ABDOMEN_TOP_MM[1]))
    below_kidney = float(rng.uniform(*ABDOMEN_BOTTOM_BELOW_KIDNEY_MM))
    top = abdomen_top if region == "abdomen" else marks["lung_apex"] + above_apex
    bottom = (marks["kidney_top"] + chest_bottom if region == "chest"
              else marks["kidney_bottom"] - below_kidney)
    s["region"] = region
    s["scan_range_mm"] = (float(bottom), float(top))
    s["landmarks_mm"] = marks

    # Display field of view, fitted to the body width.
    outer_half_w = 165.0 * s["lean_scale"] * s["aspect"][0] * _LEAN_INNER / (1 - s["fat_fraction"])
    s["dfov_mm"] = float(np.clip(2 * outer_half_w * rng.uniform(*DFOV_MARGIN), *DFOV_RANGE_MM))

    # Appearance.
    s["phase"] = _choice(rng, PHASES)
    s["enhancement"] = float(rng.uniform(*ENHANCEMENT_RANGE))
    s["organ_hu_jitter"] = {k: float(rng.normal(0.0, ORGAN_HU_SD)) for k in PHASE_HU}
    s["lung_hu"] = float(-840.0 + rng.normal(0.0, 20.0))
    s["vertebra_hu"] = float(rng.uniform(250.0, 450.0))
    s["rib_hu"] = float(rng.uniform(550.0, 750.0))
    s["disc_phase"], s["rib_phase"] = (float(p) for p in rng.uniform(0, 2 * np.pi, size=2))
    s["stomach_contents"] = _choice(rng, STOMACH_CONTENTS)
    _, mean, sd = STOMACH_CONTENTS[s["stomach_contents"]]
    s["stomach_hu"] = float(mean + rng.normal(0.0, sd))
    s["stomach_gas"] = None if rng.uniform() < P_NO_STOMACH_GAS else float(rng.uniform(0.1, 0.75))
    group = int(rng.choice(len(SLICE_THICKNESS), p=[g[0] for g in SLICE_THICKNESS]))
    choices = SLICE_THICKNESS[group][1]
    s["slice_thickness_mm"] = float(choices[int(rng.integers(len(choices)))])
    noise = rng.uniform(*NOISE_SD_5MM_RANGE) * math.sqrt(5.0 / s["slice_thickness_mm"])
    s["noise_sd_hu"] = float(np.clip(noise, *NOISE_SD_CLIP))

    # Focal liver lesions (labelled liver).
    lesions = []
    if rng.uniform() < P_LESION:
        count = int(_choice(rng, {str(k): v for k, v in LESION_COUNT.items()}))
        for _ in range(count):
            kind = _choice(rng, LESION_KINDS)
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction) + 1e-9
            where = direction * 0.6 * rng.uniform() ** (1.0 / 3.0)  # in the liver's unit ball
            diameter = float(np.exp(rng.uniform(*np.log(LESION_DIAMETER_MM))))
            if kind == "cyst":
                hu = _CYST_HU[0] + rng.normal(0.0, _CYST_HU[1])
            else:
                mean, sd = _LESION_OFFSET[kind][_PHASE_INDEX[s["phase"]]]
                hu = mean + rng.normal(0.0, sd)  # offset from the liver, added when rendered
            lesions.append({"kind": kind, "where": [float(c) for c in where],
                            "diameter_mm": diameter, "hu": float(hu)})
    s["lesions"] = lesions
    return s


def _frame(s: dict[str, Any]) -> tuple[float, float, float]:
    """Lean half-width, half-depth and trunk half-length (mm) of subject ``s``."""
    return (165.0 * s["lean_scale"] * s["aspect"][0], 115.0 * s["lean_scale"] * s["aspect"][1],
            _TRUNK_HALF_LENGTH_MM * s["trunk_scale"])


def _organ_q(o: dict[str, Any], ax, ay, az) -> tuple[np.ndarray, ...]:
    """Normalised coordinates of organ ``o`` (inside: ``qu^2 + qv^2 + qw^2 <= 1``) at
    anatomical mm ``ax, ay, az``, its taper and bend applied."""
    (cu, cv, cw), (au, av, aw) = o["centre"], o["semi"]
    qu = (ax - np.float32(cu)) / np.float32(au)
    qv = (ay - np.float32(cv)) / np.float32(av)
    qw = (az - np.float32(cw)) / np.float32(aw)
    (tu, tv), (bu, bv) = o["taper"], o["bend"]
    qw2 = qw * qw
    qu = qu * (1 + np.float32(tu) * qw) + np.float32(bu) * qw2
    qv = qv * (1 + np.float32(tv) * qw) + np.float32(bv) * qw2
    return qu, qv, qw


def _landmarks(s: dict[str, Any], step: float = 5.0) -> dict[str, float]:
    """Lung apex and base, liver dome, kidney top and bottom (anatomical z, mm): the
    highest and lowest points of those organs in the organ map drawn on a ``step`` mm
    grid without the displacement field (later organs overwriting earlier ones, as
    rendered: the liver and spleen cover the lowest lung)."""
    frame = _frame(s)
    lean_w, lean_h, half_z = frame
    ax = np.arange(-lean_w, lean_w + step, step, dtype=np.float32)[:, None, None]
    ay = np.arange(-lean_h, lean_h + step, step, dtype=np.float32)[None, :, None]
    az = np.arange(-1.8 * half_z, 2.0 * half_z, step, dtype=np.float32)[None, None, :]
    inside = (ax / np.float32(lean_w)) ** 2 + (ay / np.float32(lean_h)) ** 2 <= _LEAN_INNER**2
    label = np.zeros(np.broadcast_shapes(ax.shape, ay.shape, az.shape), dtype=np.uint8)
    for name in _DRAW_ORDER:
        if name not in s["absent"]:
            qu, qv, qw = _organ_q(s["organs"][name], ax, ay, az)
            label[(qu * qu + qv * qv + qw * qw <= 1.0) & inside] = _ORGANS[name][0]
    z = az.reshape(-1)
    lungs = z[(label == LABELS["lungs"]).any(axis=(0, 1))]
    liver = z[(label == LABELS["liver"]).any(axis=(0, 1))]
    kidneys = z[np.isin(label, (LABELS["kidney_right"], LABELS["kidney_left"])).any(axis=(0, 1))]
    return {"lung_apex": float(lungs.max()), "lung_base": float(lungs.min()),
            "liver_dome": float(liver.max()), "kidney_top": float(kidneys.max()),
            "kidney_bottom": float(kidneys.min())}


def _phase_hu(s: dict[str, Any], name: str) -> float:
    """A structure's mean HU in this subject: its phase mean, the subject's enhancement
    factor on the contrast increment, and the subject's per-organ jitter."""
    values = PHASE_HU[name]
    plain, phase = values[0], values[_PHASE_INDEX[s["phase"]]]
    return plain + s["enhancement"] * (phase - plain) + s["organ_hu_jitter"][name]


# ---------------------------------------------------------------- rendering


def _bspline_matrix(coords: np.ndarray, step: float, half_range: float) -> np.ndarray:
    """``(len(coords), n_control)`` cubic B-spline weights of control points every
    ``step`` mm from ``-half_range - step``; each row sums to 1 (a convex combination)."""
    n_control = math.ceil(2 * half_range / step) + 4
    t = (np.asarray(coords, dtype=np.float64) + half_range + step) / step
    i = np.floor(t).astype(int)
    f = t - i
    weights = ((1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6,
               (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6)
    matrix = np.zeros((len(t), n_control), dtype=np.float32)
    rows = np.arange(len(t))
    for m, w in enumerate(weights):
        matrix[rows, np.clip(i - 1 + m, 0, n_control - 1)] += w
    return matrix


def _smooth(rng: np.random.Generator, matrices, sd: float) -> np.ndarray:
    """A random smooth field of standard deviation ``sd`` on the grid ``matrices`` span."""
    coefficients = rng.standard_normal(tuple(m.shape[1] for m in matrices), dtype=np.float32)
    coefficients *= np.float32(sd / math.sqrt(_BSPLINE_GAIN))
    return np.einsum("ia,jb,kc,abc->ijk", *matrices, coefficients, optimize=True)


def make_varied_phantom(seed: int = 0, index: int = 0,
                        shape: tuple[int, int, int] = (160, 160, 96)) -> Phantom:
    """Subject ``index`` of the ``varied`` population ``seed`` (see the module text).

    ``Phantom.info`` holds what was drawn (region, phase, slice thickness, noise SD,
    absent organs, lesions, ...), JSON-ready.
    """
    s = draw_subject(seed, index)
    nx, ny, nz = shape
    pixel = s["dfov_mm"] / min(nx, ny)
    bottom, top = s["scan_range_mm"]
    spacing = (pixel, pixel, (top - bottom) / nz)
    z_centre = (top + bottom) / 2.0
    frame = _frame(s)
    lean_w, lean_h, half_z = frame
    fields = np.random.default_rng([int(seed), int(index), _STREAM_FIELDS])

    # World mm of voxel centres, 1-D per axis.
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)
    ranges = [max(300.0, float(np.abs(c).max())) for c in (x, y)]
    ranges.append(max(250.0, float(np.abs(z).max())))

    # Anatomical mm: undo the offset and roll, add a smooth displacement field.
    deform = [_bspline_matrix(c, DEFORM_STEP_MM, r) for c, r in zip((x, y, z), ranges, strict=True)]
    angle = math.radians(s["rotation_deg"])
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    xr, yr = (x - s["offset_mm"][0])[:, None, None], (y - s["offset_mm"][1])[None, :, None]
    ax = _smooth(fields, deform, s["deform_sd_mm"])
    d_max = [float(np.abs(ax).max())]
    ax += xr * cos + yr * sin
    ay = _smooth(fields, deform, s["deform_sd_mm"])
    d_max.append(float(np.abs(ay).max()))
    ay += -xr * sin + yr * cos
    az = _smooth(fields, deform, s["deform_sd_mm"])
    d_max.append(float(np.abs(az).max()))
    az += (z + np.float32(z_centre))[None, None, :]
    texture = _smooth(fields, [_bspline_matrix(c, _TEXTURE_STEP_MM, r)
                               for c, r in zip((x, y, z), ranges, strict=True)], 1.0)
    margin_xy, margin_z = math.hypot(d_max[0], d_max[1]), d_max[2]

    def block(centre_mm, half_mm, whole_z: bool = False):
        """Voxel slices holding every point within ``half_mm`` of an anatomical centre."""
        cx = centre_mm[0] * cos - centre_mm[1] * sin + s["offset_mm"][0]
        cy = centre_mm[0] * sin + centre_mm[1] * cos + s["offset_mm"][1]
        r = math.hypot(half_mm[0], half_mm[1]) + margin_xy + 1.0
        axes = [(cx, r, nx, spacing[0]), (cy, r, ny, spacing[1])]
        if not whole_z:
            axes.append((centre_mm[2] - z_centre, half_mm[2] + margin_z + 1.0, nz, spacing[2]))
        out = []
        for c, h, n, sp in axes:
            lo = max(0, math.floor((c - h) / sp + (n - 1) / 2))
            hi = min(n, math.ceil((c + h) / sp + (n - 1) / 2) + 1)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return (*out, slice(0, nz)) if whole_z else tuple(out)

    u_body = ax / np.float32(lean_w)
    radius2 = u_body * u_body
    v_body = ay / np.float32(lean_h)
    radius2 += v_body * v_body
    del u_body, v_body
    outer = _LEAN_INNER / (1.0 - s["fat_fraction"])
    label = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, _AIR_HU, dtype=np.float32)
    body = radius2 <= np.float32(outer**2)
    inner = radius2 <= np.float32(_LEAN_INNER**2)
    label[body] = LABELS["body"]
    image[body] = _FAT_HU + 15.0 * texture[body]
    image[inner] = _phase_hu(s, "soft_tissue") + 45.0 * texture[inner]

    organ_hu = {"lungs": s["lung_hu"], "liver": _phase_hu(s, "liver"),
                "spleen": _phase_hu(s, "spleen"), "stomach": s["stomach_hu"]}
    for name in _DRAW_ORDER:
        if name in s["absent"]:
            continue
        o = s["organs"][name]
        value = _ORGANS[name][0]
        sl = block(o["centre"], tuple(1.8 * a for a in o["semi"]))
        if sl is None:
            continue
        qu, qv, qw = _organ_q(o, ax[sl], ay[sl], az[sl])
        q2 = qu * qu + qv * qv + qw * qw
        mask = (q2 <= 1.0) & inner[sl]
        lab, img, tex = label[sl], image[sl], texture[sl]
        lab[mask] = value
        if value == LABELS["lungs"]:  # vessels: bright specks in dark lung
            img[mask] = organ_hu["lungs"] + 8.0 * tex[mask]
            img[mask] += 60.0 * np.maximum(tex[mask] * 3.0 - 2.0, 0.0) ** 2
        elif name.startswith("kidney"):  # cortex, medulla, and the renal sinus
            img[mask] = _phase_hu(s, "kidney_cortex") + 8.0 * tex[mask]
            medulla = mask & (q2 < 0.45)
            img[medulla] = _phase_hu(s, "kidney_medulla") + 8.0 * tex[medulla]
            img[mask & ((qu / 0.4) ** 2 + (qv / 0.32) ** 2 < 1.0)] = 20.0
        elif name == "stomach":  # contents; gas rises anteriorly (supine)
            img[mask] = organ_hu["stomach"] + 8.0 * tex[mask]
            if s["stomach_gas"] is not None:
                img[mask & (qv > s["stomach_gas"])] = -950.0
        else:
            key = "liver" if value == LABELS["liver"] else "spleen"
            grain = 30.0 if key == "spleen" and s["phase"] == "arterial" else 8.0
            img[mask] = organ_hu[key] + grain * tex[mask]

    (au, av), ar, _ = _AORTA
    ar = ar * s["aorta_scale"]
    sl = block((au * lean_w, av * lean_h, 0.0), (ar * lean_w * 1.2, ar * lean_h * 1.2, 0.0),
               whole_z=True)
    if sl is not None:
        aorta = (((ax[sl] / np.float32(lean_w) - au) / ar) ** 2
                 + ((ay[sl] / np.float32(lean_h) - av) / ar) ** 2 <= 1.0) & inner[sl]
        label[sl][aorta] = LABELS["aorta"]
        image[sl][aorta] = _phase_hu(s, "aorta") + 5.0 * texture[sl][aorta]

    (su, sv), (sa, sb), _ = _SPINE
    sa, sb = sa * s["spine_scale"], sb * s["spine_scale"]
    sl = block((su * lean_w, (sv - 0.1) * lean_h, 0.0), (0.16 * lean_w, 0.36 * lean_h, 0.0),
               whole_z=True)
    if sl is not None:
        u, v = ax[sl] / np.float32(lean_w), ay[sl] / np.float32(lean_h)
        vertebra = ((u - su) / sa) ** 2 + ((v - sv) / sb) ** 2 <= 1.0
        process = ((u - su) / 0.05) ** 2 + ((v - sv + 0.22) / 0.12) ** 2 <= 1.0
        spine = (vertebra | process) & body[sl]
        label[sl][spine] = LABELS["spine"]
        phase = np.cos(2 * np.pi * az[sl] / 30.0 + np.float32(s["disc_phase"]))
        image[sl][spine] = s["vertebra_hu"] + 60.0 * texture[sl][spine]
        image[sl][spine & (phase > 0.75)] = _DISC_HU

    # Ribs: slanted bands in a shell just inside the fat, over the upper torso.
    shell = (radius2 > np.float32((_LEAN_INNER - 0.07) ** 2)) & inner
    shell &= az > np.float32(-0.35 * half_z)
    where = np.nonzero(shell)
    u, v = ax[where] / np.float32(lean_w), ay[where] / np.float32(lean_h)
    keep = np.abs(u) > 0.18
    around = np.abs(np.arctan2(v[keep], u[keep]))
    rib_phase = np.sin(2 * np.pi * az[where][keep] / 28.0 + 1.2 * around
                       + np.float32(s["rib_phase"]))
    ribs = tuple(w[keep][rib_phase > 0.55] for w in where)
    not_spine = label[ribs] != LABELS["spine"]
    label[tuple(w[not_spine] for w in ribs)] = LABELS["ribs"]
    image[ribs] = s["rib_hu"] + 80.0 * texture[ribs]

    # Focal liver lesions, labelled liver (drawn last, inside the final liver label).
    lesions_out = []
    if s["lesions"]:
        liver = s["organs"]["liver"]
        liver_hu = organ_hu["liver"]
        for lesion in s["lesions"]:
            centre = tuple(c + p * a for c, p, a in
                           zip(liver["centre"], lesion["where"], liver["semi"], strict=True))
            radius = lesion["diameter_mm"] / 2.0
            hu = lesion["hu"] if lesion["kind"] == "cyst" else liver_hu + lesion["hu"]
            sl = block(centre, (radius, radius, radius))
            voxels = 0
            if sl is not None:
                r2 = ((ax[sl] - np.float32(centre[0])) ** 2 + (ay[sl] - np.float32(centre[1])) ** 2
                      + (az[sl] - np.float32(centre[2])) ** 2)
                mask = (r2 <= np.float32(radius**2)) & (label[sl] == LABELS["liver"])
                image[sl][mask] = hu + 4.0 * texture[sl][mask]
                voxels = int(mask.sum())
            lesions_out.append({"kind": lesion["kind"], "hu": round(hu, 1), "voxels": voxels,
                                "diameter_mm": round(lesion["diameter_mm"], 1)})

    # Slice sensitivity (thickness) and partial volume, then quantum noise.
    sigma_z = math.hypot(s["slice_thickness_mm"] / _FWHM_PER_SIGMA, _PARTIAL_VOLUME_MM)
    sigma = [max(0.35, _PARTIAL_VOLUME_MM / spacing[0]), max(0.35, _PARTIAL_VOLUME_MM / spacing[1]),
             max(0.35, sigma_z / spacing[2])]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    noise = np.random.default_rng([int(seed), int(index), _STREAM_NOISE])
    image += noise.standard_normal(shape, dtype=np.float32) * np.float32(s["noise_sd_hu"])
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    info = {
        "style": "varied",
        "region": s["region"],
        "scan_range_mm": [round(bottom, 1), round(top, 1)],
        "dfov_mm": round(s["dfov_mm"], 1),
        "body_width_mm": round(2 * lean_w * outer, 1),
        "fat_fraction": round(s["fat_fraction"], 3),
        "offset_mm": [round(v, 1) for v in s["offset_mm"]],
        "rotation_deg": round(s["rotation_deg"], 1),
        "phase": s["phase"],
        "enhancement": round(s["enhancement"], 3),
        "stomach_contents": s["stomach_contents"],
        "slice_thickness_mm": s["slice_thickness_mm"],
        "noise_sd_hu": round(s["noise_sd_hu"], 1),
        "volume_factor": {k: round(v, 3) for k, v in s["volume_factor"].items()},
        "absent": list(s["absent"]),
        "lesions": lesions_out,
    }
    return Phantom(image, label, phantom_affine(shape, spacing), spacing, info)
