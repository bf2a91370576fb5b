"""Data: NIfTI I/O and checks, datalists, image-or-label-map rule, pre-processing and VoCo
crop sampling (:mod:`~voco_core.data.sampling`), segmentation pairs
(:mod:`~voco_core.data.segmentation`), synthetic phantoms."""

from voco_core.data.io import (
    DatalistEntry,
    VolumeRecord,
    check_min_shape,
    check_pair,
    dataset_class_names,
    load_datalist,
    looks_like_labels,
    read_dataset_json,
    read_volume,
    write_volume,
)

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
