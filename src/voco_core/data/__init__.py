"""Data: volume I/O (:mod:`~voco_core.data.io`; NIfTI, NRRD, MetaImage, DICOM series
readers and their checks in :mod:`~voco_core.data.readers`), datalists,
image-or-label-map rule (:mod:`~voco_core.data.labelmaps`), pre-processing and VoCo
crop sampling (:mod:`~voco_core.data.sampling`), segmentation pairs
(:mod:`~voco_core.data.segmentation`), synthetic phantoms."""

from voco_core.data.datalists import (
    DatalistEntry,
    dataset_class_names,
    load_datalist,
    read_dataset_json,
)
from voco_core.data.io import (
    VolumeRecord,
    check_min_shape,
    check_pair,
    read_volume,
    write_volume,
)
from voco_core.data.labelmaps import looks_like_labels

__all__ = [
    "DatalistEntry",
    "VolumeRecord",
    "check_min_shape",
    "check_pair",
    "dataset_class_names",
    "load_datalist",
    "looks_like_labels",
    "read_dataset_json",
    "read_volume",
    "write_volume",
]
