"""The positions inspector and the segment widget, driven as a user would in napari.

One tiny pretraining and one tiny finetuning checkpoint are made per session
(1 step each, CPU); images are 64 x 64 x 48 phantoms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


WAIT_MS = 60_000
ANISOTROPIC = (2.5, 1.0, 3.0)


@pytest.fixture(scope="session")
def checkpoints(train_dataset, pretrain_run, finetune_run) -> dict[str, Path]:
    """A pretraining run folder and a finetuning run folder (the shared tiny runs)."""
    return {"pretrain": pretrain_run, "segment": finetune_run, "data": train_dataset}


@pytest.fixture(scope="session")
def phantom(checkpoints):
    from voco_core.data.io import read_volume

    return read_volume(checkpoints["data"] / "imagesTr" / "phantom_000.nii.gz")


@pytest.fixture
def errors():
    """Error notifications shown during the test (napari's notification manager)."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    start = len(notification_manager.records)

    def shown() -> list[str]:
        return [str(n.message) for n in notification_manager.records[start:]
                if n.severity == NotificationSeverity.ERROR]

    return shown


def _positions_widget(viewer, qtbot, checkpoint):
    from napari_voco._positions_widget import PositionsWidget

    widget = PositionsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo positions")
    if checkpoint is not None:
        widget.checkpoint.set_path(checkpoint)
    return widget


def _wait(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)


def _assert_usable(widget) -> None:
    assert not widget.running
    buttons = getattr(widget, "buttons", None) or (widget.run_button,)
    assert all(button.isEnabled() for button in buttons)


def _world_bounds(layer, vertices: np.ndarray) -> np.ndarray:
    """Per-axis (min, max) of data-coordinate points mapped to the world."""
    world = np.array([layer.data_to_world(v) for v in np.asarray(vertices)])
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=-1)


# --------------------------------------------------------------------------- positions


def test_grid_aligned_with_anisotropic_image_and_crop_opens_in_place(
        make_napari_viewer_proxy, qtbot, checkpoints, phantom, errors):
    from napari_voco._io import DISPLAY_TO_RAS
    from napari_voco._layers import layer_to_record, plane_axes
    from napari_voco._positions_widget import GRID_LAYER
    from voco_core.inference import base_crop_boxes, load_position_model, prepare_volume

    viewer = make_napari_viewer_proxy()
    image = viewer.add_image(phantom.array, name="phantom", scale=ANISOTROPIC)
    widget = _positions_widget(viewer, qtbot, checkpoints["pretrain"])
    assert widget.image_combo.layer() == image
    widget.show_grid()
    _wait(qtbot, widget)
    assert errors() == []

    grid = viewer.layers[GRID_LAYER]
    record = layer_to_record(image)
    # a layer without voco metadata: its napari world is the display world (S, P, L mm)
    np.testing.assert_allclose(record.affine, DISPLAY_TO_RAS @ np.diag([*ANISOTROPIC, 1.0]))
    model = load_position_model(checkpoints["pretrain"], "cpu")
    base = base_crop_boxes(record, model)  # (K, 3, 2) image boxes
    assert grid.nshapes == base.shape[0] == 4
    assert list(grid.features["index"]) == [0, 1, 2, 3]
    a, b, c = plane_axes(prepare_volume(record, model).sample_to_image)
    for k in range(base.shape[0]):
        bounds = _world_bounds(grid, grid.data[k])
        for axis in (a, b):  # rectangle = box extent in world mm on the sample's x-y axes
            expected = (base[k, axis] - 0.5) * ANISOTROPIC[axis]
            np.testing.assert_allclose(bounds[axis], expected, atol=1e-6)
        assert bounds[c, 0] == bounds[c, 1]  # flat, on the slice being viewed
    # the view shows the grid's plane (turned to it when needed; axial here)
    assert sorted(viewer.dims.displayed) == sorted((a, b))
    viewer.dims.set_point(c, ANISOTROPIC[c] * 10)  # the rectangles follow the slider
    assert all(np.all(np.asarray(v)[:, c] == 10) for v in grid.data)

    # a base crop as the network sees it, placed where it lies
    widget.crop_combo.setCurrentText("base crop 1")
    widget.open_crop()
    _wait(qtbot, widget)
    assert errors() == []
    crop = widget.crop_layers[-1]
    size = model.config.geometry.input_size
    assert crop.data.shape == (size, size, size)
    assert 0.0 <= crop.data.min() and crop.data.max() <= 1.0
    corners = np.array([[-0.5] * 3, [size - 0.5] * 3])
    expected = (base[1] - 0.5) * np.array(ANISOTROPIC)[:, None]
    np.testing.assert_allclose(_world_bounds(crop, corners), expected, atol=1e-5)
    _assert_usable(widget)


def test_placed_box_predicts_true_overlap_and_follows_a_drag(
        make_napari_viewer_proxy, qtbot, checkpoints, phantom, errors, monkeypatch):
    import napari_voco._positions_view as module
    from napari_voco._layers import layer_to_record, rectangle_to_box
    from napari_voco._positions_widget import BOX_LAYER
    from voco_core.geometry import base_crop_grid, overlap_labels
    from voco_core.inference import positions

    loads = []
    for name in ("load_position_model", "prepare_volume"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _f=original, _n=name, **k: loads.append(_n) or _f(*a, **k))

    viewer = make_napari_viewer_proxy()
    [image] = viewer.open(phantom.path, plugin="napari-voco")  # axial slices on the slider
    widget = _positions_widget(viewer, qtbot, checkpoints["pretrain"])
    widget.device.set_device("cpu")
    widget.place_box()
    _wait(qtbot, widget)
    assert errors() == []
    layer = viewer.layers[BOX_LAYER]
    assert layer.nshapes == 1
    view = widget._view

    def check_against_direct_call():
        result = widget.box_result
        box = rectangle_to_box(layer.data[-1], view.axes, image.data.shape)
        direct = positions(layer_to_record(image), checkpoints["pretrain"], boxes=box[None],
                           device="cpu")
        np.testing.assert_array_equal(result.sample_boxes, direct.sample_boxes)
        grid = base_crop_grid(view.prepared.sample.shape[1:], direct.grid_size)
        np.testing.assert_array_equal(widget.heatmaps.true,
                                      overlap_labels(direct.sample_boxes, grid)[0])
        np.testing.assert_allclose(widget.heatmaps.predicted, direct.predicted[0], atol=1e-4)
        return result

    first = check_against_direct_call()
    np.testing.assert_allclose(first.true[0], 0.25)  # centred: a quarter of each crop
    # the boxes lie in the axial plane the viewer shows (RAS x-y: display axes 1, 2)
    assert sorted(view.axes[:2]) == [1, 2] and view.axes[2] == 0
    assert viewer.dims.not_displayed == (0,)

    # drag the box: the prediction follows, re-running only positions()
    a = view.axes[0]
    moved = np.array(layer.data[0])
    moved[:, a] -= 8
    layer.data = [moved]
    qtbot.waitUntil(lambda: widget.box_result is not first and not widget.running,
                    timeout=WAIT_MS)
    second = check_against_direct_call()
    assert not np.array_equal(second.sample_boxes, first.sample_boxes)

    # another slice: the box follows without a new prediction (it spans the full depth)
    c = view.axes[2]
    viewer.dims.set_point(c, image.data_to_world(np.eye(3)[c] * 5)[c])
    assert np.all(np.asarray(layer.data[0])[:, c] == 5)
    qtbot.wait(500)
    assert widget.box_result is second and not widget.running
    assert loads == ["load_position_model", "prepare_volume"]  # cached after the first run
    _assert_usable(widget)


def test_random_sub_volumes_coloured_by_error(make_napari_viewer_proxy, qtbot, checkpoints,
                                              phantom, errors):
    from napari_voco._layers import layer_to_record
    from napari_voco._positions_view import heatmap_layout
    from napari_voco._positions_widget import GRID_LAYER, SAMPLES_LAYER
    from voco_core.inference import positions

    viewer = make_napari_viewer_proxy()
    flipped = np.diag([2.5, 1.0, -3.0, 1.0])  # columns run to the patient's right: a flip
    image = viewer.add_image(phantom.array, name="phantom", affine=flipped)
    widget = _positions_widget(viewer, qtbot, checkpoints["pretrain"])
    widget.count.setValue(3)
    widget.seed.setValue(7)
    widget.sample()
    _wait(qtbot, widget)
    assert errors() == []
    layer = viewer.layers[SAMPLES_LAYER]
    assert layer.nshapes == 3
    direct = positions(layer_to_record(image), checkpoints["pretrain"], n=3, seed=7,
                       device="cpu")
    np.testing.assert_allclose(layer.features["abs_error"], direct.abs_error, atol=1e-4)
    np.testing.assert_array_equal(widget.sample_result.sample_boxes, direct.sample_boxes)
    colours = np.asarray(layer.edge_color)
    order = np.argsort(direct.abs_error)
    assert not np.allclose(colours[order[0]], colours[order[-1]])  # coloured by |error|
    widget.show_sample.setValue(2)
    np.testing.assert_allclose(widget.heatmaps.true, direct.true[2])

    # the heat-map cells are laid out as the base crops appear on screen, also after
    # flipping the camera or swapping the displayed axes
    grid = viewer.layers[GRID_LAYER]
    n = direct.grid_size
    centres = np.array([np.mean([grid.data_to_world(v) for v in grid.data[k]], axis=0)
                        for k in range(n * n)])
    a, b, c = widget._view.axes  # the grid's plane, seen both ways round
    for orientation, order in ((("down", "right"), (c, a, b)), (("up", "right"), (c, a, b)),
                               (("down", "left"), (c, b, a))):
        viewer.camera.orientation2d = orientation
        viewer.dims.order = order
        cells = widget.heatmaps.arrange(np.arange(n * n), n,
                                        heatmap_layout(viewer, widget._view))
        rows, columns = viewer.dims.displayed
        down = np.diff(centres[cells][..., rows], axis=0)  # world change down the heat map
        right = np.diff(centres[cells][..., columns], axis=1)
        assert np.all(down > 0) if orientation[0] == "down" else np.all(down < 0)
        assert np.all(right > 0) if orientation[1] == "right" else np.all(right < 0)
    _assert_usable(widget)


# --------------------------------------------------------------------------- segment


def _segment_widget(viewer, checkpoint):
    from napari_voco._segment_widget import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo segment")
    if checkpoint is not None:
        widget.checkpoint.set_path(checkpoint)
    widget.device.set_device("cpu")
    return widget


def test_segmentation_overlays_the_image(make_napari_viewer_proxy, qtbot, checkpoints,
                                         phantom, errors, monkeypatch, tmp_path):
    from voco_core.inference import Segmenter

    released = []
    original = Segmenter.release
    monkeypatch.setattr(Segmenter, "release", lambda self: released.append(1) or original(self))
    viewer = make_napari_viewer_proxy()
    [image] = viewer.open(phantom.path, plugin="napari-voco")  # display order, voco metadata
    widget = _segment_widget(viewer, checkpoints["segment"])
    widget.run()
    assert widget.running and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors() == []
    labels = viewer.layers["phantom_000 segmentation"]
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_allclose(labels.scale, image.scale)
    names = list(labels.features["name"])
    assert names[0] == "background" and len(names) == 11
    assert labels.metadata["voco"]["label_names"][1] == names[1]
    # saved, the segmentation lies on the image file's grid, in its storage order
    from napari_voco._io import write_labels
    from voco_core.data.io import read_volume

    out = tmp_path / "segmentation.nii.gz"
    write_labels(str(out), labels.data, labels.as_layer_data_tuple()[1])
    saved = read_volume(out)
    assert saved.shape == phantom.shape
    np.testing.assert_allclose(saved.affine, phantom.affine, atol=1e-6)
    np.testing.assert_array_equal(saved.array.transpose(2, 1, 0)[:, ::-1, ::-1], labels.data)
    assert sum(widget.counts.values()) == phantom.array.size
    assert widget.info["classes"] == names
    assert widget.progress.value() == widget.progress.maximum()
    assert released == [1]
    assert widget.last_status.startswith("done")
    _assert_usable(widget)


def test_segmentation_cancel(make_napari_viewer_proxy, qtbot, checkpoints, phantom, errors):
    viewer = make_napari_viewer_proxy()
    viewer.add_image(phantom.array, name="phantom", scale=ANISOTROPIC)
    widget = _segment_widget(viewer, checkpoints["segment"])
    widget.run()
    assert widget.cancel_button.isEnabled()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.last_status == "cancelled"
    assert errors() == []
    assert "phantom segmentation" not in [layer.name for layer in viewer.layers]
    assert not widget.cancel_button.isEnabled()
    _assert_usable(widget)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_notify_and_leave_widgets_usable(make_napari_viewer_proxy, qtbot,
                                                     checkpoints, phantom, errors, tmp_path):
    viewer = make_napari_viewer_proxy()
    flat = viewer.add_image(np.zeros((32, 32), dtype=np.float32), name="flat")
    volume = viewer.add_image(phantom.array, name="phantom")
    positions = _positions_widget(viewer, qtbot, None)
    segment = _segment_widget(viewer, None)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")

    cases = [
        (volume, "", "no checkpoint chosen"),
        (volume, tmp_path / "missing", "not found"),
        (flat, None, "expected a 3-D image layer"),
        (volume, corrupt, "not a readable PyTorch checkpoint"),
    ]
    for widget, own, other in ((positions, "pretrain", "segment"),
                               (segment, "segment", "pretrain")):
        start = widget.run if widget is segment else widget.show_grid
        for layer, path, message in [*cases, (volume, checkpoints[other], "not a napari-voco")]:
            widget.image_combo.set_layer(layer)
            widget.checkpoint.set_path(checkpoints[own] if path is None else path)
            before = len(errors())
            start()
            _wait(qtbot, widget)
            shown = errors()[before:]
            assert len(shown) == 1 and message in shown[0], (widget, path, shown)
            # the widget's own status line says it too, in full (pop-ups get cut off)
            assert widget.status.text() == f"failed: {shown[0]}", widget.status.text()
            _assert_usable(widget)

    # still works afterwards
    positions.image_combo.set_layer(volume)
    positions.checkpoint.set_path(checkpoints["pretrain"])
    before = len(errors())
    positions.show_grid()
    _wait(qtbot, positions)
    assert errors()[before:] == [] and positions.grid_layer.nshapes == 4
