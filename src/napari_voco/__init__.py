"""napari-voco: the napari plugin over :mod:`voco_core`.

This package holds only GUI code (readers, writers, widgets); the maths lives
in :mod:`voco_core`. Its npe2 manifest is ``napari.yaml`` beside this file.
"""

from voco_core import __version__

__all__ = ["__version__"]
