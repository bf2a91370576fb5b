"""Sample data (npe2 ``sample_data`` contribution): a synthetic CT phantom with organ labels.

File > Open Sample > VoCo > "VoCo phantom CT" adds two layers built like the
NIfTI reader builds them (see :mod:`napari_voco._io`): the CT in Hounsfield
units and its organ label map, both turned from the phantom's RAS storage order
into the display order (axial slices on the slider, anterior up, the patient's
right on the screen's left) with the same display-world affine, so they overlay
in world millimetres.
"""

from __future__ import annotations

from napari_voco._io import LayerDataTuple, volume_layer_data
from voco_core.data.io import VolumeRecord
from voco_core.data.phantoms import LABEL_NAMES, make_phantom

SAMPLE_SHAPE = (128, 128, 80)
"""Voxels (X, Y, Z) of the sample phantom: the standard 400 x 400 x 288 mm field of view
at 3.125 x 3.125 x 3.6 mm. Generated in about 0.15 s (the 160 x 160 x 96 default takes
0.3-0.7 s), so the sample opens well within 2 s on a busy machine (docs/gui.md)."""
SAMPLE_SEED = 0
SAMPLE_INDEX = 0


def make_phantom_sample() -> list[LayerDataTuple]:
    """The sample phantom as two napari layers: ``"VoCo phantom CT"`` (Image, int16 HU)
    and ``"VoCo phantom labels"`` (Labels, uint8, class names from
    :data:`~voco_core.data.phantoms.LABEL_NAMES` in ``metadata["voco"]["label_names"]``
    and the layer's ``features``). Both are in the display order and carry
    ``metadata["voco"]`` (the display array's RAS+ affine, the phantom's own in
    ``storage``) with ``path=None``."""
    phantom = make_phantom(SAMPLE_SEED, SAMPLE_INDEX, SAMPLE_SHAPE)
    image = VolumeRecord(array=phantom.image, affine=phantom.affine, spacing=phantom.spacing)
    labels = VolumeRecord(array=phantom.label, affine=phantom.affine, spacing=phantom.spacing)
    return [
        volume_layer_data(image, as_labels=False, name="VoCo phantom CT"),
        volume_layer_data(
            labels, as_labels=True, name="VoCo phantom labels", label_names=LABEL_NAMES
        ),
    ]
