"""Data: NIfTI I/O, datalists, synthetic phantoms (and, later, crop sampling)."""

from voco_core.data.io import (
    DatalistEntry,
    VolumeRecord,
    check_min_shape,
    check_pair,
    load_datalist,
    read_volume,
    write_volume,
)

__all__ = [
    "DatalistEntry",
    "VolumeRecord",
    "check_min_shape",
    "check_pair",
    "load_datalist",
    "read_volume",
    "write_volume",
]
