"""Is a volume a label map or an intensity image?

One rule, used by the napari reader (Labels or Image layer) and ``voco info``:

1. **What the file says** decides first.

   - The NIfTI intent: ``label`` or ``neuroname`` (``NIFTI_INTENT_LABEL``,
     ``NIFTI_INTENT_NEURONAME``) means a label map; any other declared intent
     (``zscore``, ``estimate``, ...) means an image.
   - The file name: a label-like word in it (:data:`LABEL_NAME_WORDS`: ``seg``,
     ``dseg``, ``aseg``, ``label``, ``labels``, ``mask``, ``atlas``,
     ``annotation``, ...) or a folder named for label maps (:data:`LABEL_FOLDER_WORDS`,
     e.g. Decathlon's ``labelsTr/``). Names are split into words at ``_ - . +``,
     digits and lower-to-upper case changes, so ``atlas_labels``, ``liver-mask``,
     ``liverMask`` and ``aparc+aseg`` count but ``t1_masked`` and FreeSurfer's
     ``brainmask`` (a skull-stripped grey-value image) do not.

   Either needs values a label map can hold (booleans, or non-negative whole
   numbers in any dtype); a file named ``mask`` that holds probabilities stays an
   image.
   A multi-channel volume ``(I, J, K, C)`` is always an image.
2. **The data** decide only when unambiguous: boolean data, or an integer dtype with
   no negative value and at most :data:`MAX_DATA_ONLY_LABELS` distinct values.
3. **In doubt, an image**: 8-bit MRI (hundreds of grey values in ``uint8``), integer
   CT (negative Hounsfield units), floating-point data. A label map mistaken for an
   image still shows its structures; an image mistaken for a label map shows noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from voco_core.data.io import VolumeRecord

LABEL_INTENTS = frozenset({"label", "neuroname"})
"""NIfTI intents (nibabel's names) that declare a label map."""

LABEL_NAME_WORDS = frozenset({
    "seg", "dseg", "aseg", "aparc", "segm", "segmentation", "segmentations",
    "label", "labels", "labelmap", "labelmaps", "mask", "masks", "atlas",
    "annot", "annotation", "annotations", "parc", "parcellation",
})
"""Words in a file name that say it is a label map."""

LABEL_FOLDER_WORDS = frozenset({"labels", "masks", "segmentations"})
"""Words in a folder name that say its files are label maps (``labelsTr/``, ``masks/``)."""

MAX_DATA_ONLY_LABELS = 64
"""Most distinct values integer data may have to count as a label map on its own."""

_SLAB_VOXELS = 1 << 24  # voxels per chunk when scanning a volume (bounds temporary memory)


def looks_like_labels(record: VolumeRecord) -> tuple[bool, str]:
    """Whether ``record`` is a label map (True) or an intensity image (False), and why.

    Applies the rule of the module doc to the header's intent
    (:attr:`VolumeRecord.intent`), the file name (:attr:`VolumeRecord.path`) and the
    voxel data. Returns the decision and a short reason, e.g. ``(True, "NIfTI intent
    'label'")`` or ``(False, "more than 64 distinct integer values (grey values)")``.
    """
    data = record.array
    if data.ndim == 4:  # a label map has one channel (readers.nifti.open_nifti refuses others)
        return False, f"{data.shape[3]} channels (a multi-channel image)"
    if data.dtype == np.bool_:
        return True, "boolean data"

    intent = record.intent
    if intent in LABEL_INTENTS:
        said = f"NIfTI intent '{intent}'"
    elif intent != "none":
        return False, f"NIfTI intent '{intent}' is not a label intent"
    else:
        said = label_name_evidence(record.path)
    if said:
        if holds_label_values(data):
            return True, said
        return False, f"{said}, but its values are not non-negative whole numbers"

    if not np.issubdtype(data.dtype, np.integer):
        return False, f"{data.dtype} data, not a label-map name or intent"
    if data.size == 0:
        return False, "empty volume"
    if data.min() < 0:
        return False, "negative values (e.g. CT in Hounsfield units)"
    distinct = count_distinct(data, MAX_DATA_ONLY_LABELS)
    if distinct > MAX_DATA_ONLY_LABELS:
        return False, f"more than {MAX_DATA_ONLY_LABELS} distinct integer values (grey values)"
    return True, f"{distinct} distinct non-negative integer values"


def label_name_evidence(path: str | Path | None) -> str:
    """Why the file name says label map (e.g. ``"file name 'atlas_labels'"``), or ``""``."""
    if path is None:
        return ""
    path = Path(path)
    stem = re.sub(r"\.(nii(\.gz)?|nrrd|nhdr|mha|mhd)$", "", path.name, flags=re.IGNORECASE)
    if _words(stem) & LABEL_NAME_WORDS:
        return f"file name '{stem}'"
    if _words(path.parent.name) & LABEL_FOLDER_WORDS:
        return f"folder '{path.parent.name}'"
    return ""


def holds_label_values(data: np.ndarray) -> bool:
    """True when every voxel is a non-negative whole number (booleans count)."""
    if data.dtype == np.bool_:
        return True
    if data.size == 0:
        return False
    if np.issubdtype(data.dtype, np.integer):
        return bool(data.min() >= 0)
    if not np.issubdtype(data.dtype, np.floating):
        return False
    return all(
        bool(np.all((slab >= 0) & (slab == np.floor(slab)))) for slab in _slabs(data)
    )


def count_distinct(data: np.ndarray, limit: int) -> int:
    """Number of distinct values in ``data``, or ``limit + 1`` as soon as there are more.

    Grey-value images are rejected from a coarse subsample, then the volume is
    scanned in slabs, so neither case sorts the whole array at once.
    """
    seen = set(np.unique(data[::4, ::4, ::4]).tolist()) if data.ndim == 3 else set()
    if len(seen) > limit:
        return limit + 1
    for slab in _slabs(data):
        seen.update(np.unique(slab).tolist())
        if len(seen) > limit:
            return limit + 1
    return len(seen)


def _words(name: str) -> set[str]:
    """``"aparc+aseg"`` -> ``{"aparc", "aseg"}``, ``"liverMask01"`` -> ``{"liver", "mask"}``."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return {word for word in re.split(r"[^a-z]+", spaced.lower()) if word}


def _slabs(data: np.ndarray) -> Iterator[np.ndarray]:
    """``data`` in chunks along its first axis of about ``_SLAB_VOXELS`` voxels each."""
    if data.ndim == 0 or data.shape[0] == 0:
        yield data.reshape(-1)
        return
    step = max(1, _SLAB_VOXELS // max(1, data[0].size))
    for start in range(0, data.shape[0], step):
        yield data[start:start + step]
