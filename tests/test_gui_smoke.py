"""napari starts under the virtual X server and shows a phantom with its labels.

This proves the GUI test set-up (Xvfb, Qt xcb libraries, OpenGL) that the plugin
tests of later issues rely on.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def test_phantom_shows_in_napari_with_physical_scale(make_napari_viewer_proxy, phantom_dataset):
    from voco_core.data.io import read_volume

    image = read_volume(phantom_dataset / "imagesTr" / "phantom_000.nii.gz")
    label = read_volume(phantom_dataset / "labelsTr" / "phantom_000.nii.gz")
    viewer = make_napari_viewer_proxy()
    viewer.add_image(image.array, name=image.name, scale=image.spacing,
                     contrast_limits=(-175, 250))
    labels_layer = viewer.add_labels(label.array, name=f"{label.name} labels",
                                     scale=label.spacing)
    assert [layer.name for layer in viewer.layers] == ["phantom_000", "phantom_000 labels"]
    np.testing.assert_allclose(labels_layer.scale, image.spacing)
    assert labels_layer.data.max() == 10
    screenshot = viewer.screenshot(canvas_only=True)
    assert screenshot.ndim == 3 and screenshot.std() > 0  # something was rendered
