"""The VoCo docks fit the window they are added to, and say what happens where it shows.

* widgets opened from napari's Plugins menu join the other VoCo docks as tabs (the new
  one in front) instead of a column of 90-pixel slices, and no dock is shorter than a
  usable minimum (its content scrolls);
* a failure shows in the widget's own status line (scrolled to) as well as in the
  notification;
* what pre-processing chose for the volumes ("intensity auto: ...") is written into
  the run panel's status line, not shown as a notification over the canvas for the
  whole run (warnings still notify);
* the positions inspector's box labels stay legible at any zoom: a fixed size on
  screen, shown only where they fit inside their box without overlapping.

The launcher's own window on 1280 x 1024 and 1600 x 1000 screens is measured in
``tests/test_launch.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

MENU_COMMANDS = {"VoCo pretrain": "napari-voco.pretrain_widget",
                 "VoCo segment": "napari-voco.segment_widget",
                 "VoCo positions": "napari-voco.positions_widget",
                 "VoCo finetune": "napari-voco.finetune_widget"}


def _open_from_menu(qtbot, name: str):
    """What choosing Plugins > VoCo > ``name`` does (napari's app-model action)."""
    from napari._app_model import get_app_model

    get_app_model().commands.execute_command(MENU_COMMANDS[name]).result()
    qtbot.wait(50)  # the widget joins the tabs once napari has placed its dock


def _front_dock(docks):
    [front] = [dock for dock in docks if not dock.widget().visibleRegion().isEmpty()]
    return front


def test_widgets_opened_from_the_menu_join_the_voco_tabs(make_napari_viewer_proxy, qtbot):
    from qtpy.QtWidgets import QDockWidget, QLabel, QProgressBar, QTableWidget

    from napari_voco._inputs import MIN_DOCK_HEIGHT, is_voco_dock
    from napari_voco._layers import unwrap

    viewer = make_napari_viewer_proxy(show=True)
    viewer.add_image(np.zeros((16, 16, 8), np.float32), name="image")
    window = unwrap(viewer).window._qt_window
    opened = []
    for name in MENU_COMMANDS:
        _open_from_menu(qtbot, name)
        opened.append(name)
        docks = [dock for dock in window.findChildren(QDockWidget) if is_voco_dock(dock)]
        assert len(docks) == len(opened)
        for dock in docks:  # one tab group: each dock is tabbed with all the others
            assert len(window.tabifiedDockWidgets(dock)) == len(opened) - 1, dock.windowTitle()
        front = _front_dock(docks)
        assert front.windowTitle().startswith(name)  # the widget just opened is in front
        inner = front.widget()
        assert inner.height() >= max(MIN_DOCK_HEIGHT, inner.minimumSizeHint().height())
        assert inner.width() >= inner.minimumSizeHint().width()
    # the segment widget's progress bar, status line and table are not hidden
    segment = unwrap(viewer.window.dock_widgets["VoCo segment (VoCo)"])
    segment.parent().raise_()
    qtbot.wait(50)
    for widget in (segment.progress, segment.status, segment.table):
        assert isinstance(widget, QProgressBar | QLabel | QTableWidget)
        assert widget.isVisible() and not widget.visibleRegion().isEmpty(), widget
    # closing and reopening from the menu (napari toggles the dock) keeps the group
    _open_from_menu(qtbot, "VoCo segment")
    assert segment.parent().isHidden()
    _open_from_menu(qtbot, "VoCo segment")
    assert not segment.parent().isHidden()


def test_every_voco_widget_has_a_usable_minimum_height(make_napari_viewer_proxy):
    from qtpy.QtWidgets import QScrollArea

    from napari_voco._finetune_widget import FinetuneWidget
    from napari_voco._inputs import MIN_DOCK_HEIGHT
    from napari_voco._positions_widget import PositionsWidget
    from napari_voco._pretrain_widget import PretrainWidget
    from napari_voco._segment_widget import SegmentWidget

    viewer = make_napari_viewer_proxy()
    for widget_class in (PretrainWidget, FinetuneWidget, PositionsWidget, SegmentWidget):
        widget = widget_class(viewer)
        assert widget.minimumSizeHint().height() >= MIN_DOCK_HEIGHT, widget_class
        scroll = widget.findChild(QScrollArea)  # taller content scrolls, never clips
        assert scroll.verticalScrollBarPolicy().name == "ScrollBarAsNeeded"
        assert scroll.widgetResizable()


def test_a_dock_placed_on_purpose_stays_where_it_is(make_napari_viewer_proxy, qtbot):
    from napari_voco._inputs import keep_placement
    from napari_voco._layers import unwrap
    from napari_voco._positions_widget import PositionsWidget
    from napari_voco._pretrain_widget import PretrainWidget

    viewer = unwrap(make_napari_viewer_proxy(show=True))
    window = viewer.window._qt_window
    pretrain, positions = PretrainWidget(viewer), PositionsWidget(viewer)
    first = viewer.window.add_dock_widget(pretrain, name="VoCo pretrain")
    second = viewer.window.add_dock_widget(positions, name="VoCo positions")
    keep_placement(second)  # what the launcher does before its own layout
    qtbot.wait(50)
    assert window.tabifiedDockWidgets(first) == []


@pytest.mark.parametrize("name", ["segment", "positions"])
def test_a_failure_shows_in_the_widgets_status_line(make_napari_viewer_proxy, qtbot,
                                                    monkeypatch, name):
    from napari_voco import _notify
    from napari_voco._positions_widget import PositionsWidget
    from napari_voco._segment_widget import SegmentWidget

    notified: list = []
    monkeypatch.setattr(_notify, "notify_error", notified.append)
    viewer = make_napari_viewer_proxy(show=True)
    viewer.add_image(np.zeros((16, 16, 8), np.float32), name="image")
    widget = (SegmentWidget if name == "segment" else PositionsWidget)(viewer)
    dock = viewer.window.add_dock_widget(widget, name=f"VoCo {name}")
    dock.setFloating(True)  # a short dock: the status line is below the fold
    dock.resize(420, 300)
    qtbot.wait(50)
    widget.checkpoint.set_path("")
    (widget.run if name == "segment" else widget.show_grid)()
    qtbot.waitUntil(lambda: not widget.running, timeout=10_000)
    assert len(notified) == 1 and "no checkpoint chosen" in str(notified[0])
    assert widget.status.text() == f"failed: {_notify.error_message(notified[0])}"
    qtbot.wait(50)
    assert not widget.status.visibleRegion().isEmpty()  # scrolled into view


def test_preprocessing_notes_go_to_the_status_line_once(qtbot, monkeypatch):
    from qtpy.QtWidgets import QWidget

    from napari_voco import _notify
    from napari_voco._run_panel import RunPanel
    from voco_core.train.events import PretrainEvent

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(_notify, "show_info", lambda text: shown.append(("info", text)))
    monkeypatch.setattr(_notify, "show_warning", lambda text: shown.append(("warning", text)))
    panel = RunPanel("pretrain", lambda: None, QWidget())
    qtbot.addWidget(panel)
    first = "intensity auto: phantom_000 as CT (decided per volume; volumes that differ ...)"
    warning = "warning: the foreground crop kept the whole volume for 1 of 1 volumes"

    def step(n: int, message: str = "", run_dir: str = "/runs/a") -> None:
        panel._on_event(PretrainEvent("step", n, 10, loss=1.0 / n, run_dir=run_dir,
                                      message=message))

    step(1, first)
    assert shown == []  # no notification over the canvas
    assert panel.status.text().startswith("loss 1.0000")
    assert first in panel.status.text()
    step(2)  # kept under the next step's status, written once
    assert panel.status.text().startswith("loss 0.5000")
    assert panel.status.text().count(first) == 1
    step(3, f"intensity auto: phantom_002 as percentile\n{warning}")
    assert shown == [("warning", warning)]  # warnings are notified too
    lines = panel.status.text().splitlines()
    assert lines[1:] == [first, "intensity auto: phantom_002 as percentile", warning]
    step(4, first)  # the same note again is not repeated
    assert panel.status.text().count(first) == 1
    step(1, run_dir="/runs/b")  # another run starts without the old notes
    assert panel.status.text().splitlines() == [panel.status.text().splitlines()[0]]


def _boxes_layer(viewer, boxes: list[tuple[float, float, float, float]]):
    """A Shapes layer of rectangles ``(row0, col0, row1, col1)`` labelled like the
    inspector's sampled sub-volumes."""
    from napari_voco._layers import unwrap
    from napari_voco._positions_view import SAMPLE_TEXT_SIZE, update_box_labels

    rectangles = [np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], float)
                  for r0, c0, r1, c1 in boxes]
    labels = [f"{i}: 0.{i:02d}" for i in range(len(boxes))]
    layer = unwrap(viewer.add_shapes(
        rectangles, shape_type="rectangle", face_color="transparent",
        features={"label": labels, "shown_label": labels},
        text={"string": "{shown_label}", "size": SAMPLE_TEXT_SIZE}))
    update_box_labels(layer, viewer)
    return layer


def _label_rects(layer, viewer) -> list[np.ndarray]:
    from napari_voco._positions_view import _label_pixels

    rects = []
    zoom = viewer.scene.camera.zoom
    for vertices, text in zip(layer.data, layer.features["shown_label"], strict=True):
        if not text:
            continue
        screen = np.asarray(vertices)[:, -2:] * zoom
        low, high = screen.min(axis=0), screen.max(axis=0)
        width, height = _label_pixels([text], layer.text.size)[0]
        centre = (low + high) / 2
        rect = np.array([centre[1] - width / 2, centre[0] - height / 2,
                         centre[1] + width / 2, centre[0] + height / 2])
        assert width <= high[1] - low[1] and height <= high[0] - low[0]  # inside its box
        rects.append(rect)
    return rects


def test_box_labels_stay_legible_at_any_zoom(make_napari_viewer_proxy):
    from napari_voco._positions_view import update_box_labels

    viewer = make_napari_viewer_proxy()
    viewer.add_image(np.zeros((200, 200), np.float32))
    # four separate boxes and two overlapping ones whose labels would collide
    layer = _boxes_layer(viewer, [(0, 0, 40, 60), (0, 100, 40, 160), (100, 0, 140, 60),
                                  (100, 100, 140, 160), (150, 150, 190, 190),
                                  (152, 152, 192, 192)])
    size = layer.text.size
    assert size >= 10 and not layer.text.scaling  # a fixed, readable size on screen
    counts = {}
    for zoom in (0.2, 1.0, 4.0, 20.0):
        viewer.scene.camera.zoom = zoom
        update_box_labels(layer, viewer)
        shown = [bool(text) for text in layer.features["shown_label"]]
        counts[zoom] = sum(shown)
        rects = _label_rects(layer, viewer)
        for i, a in enumerate(rects):  # no two labels shown overlap
            for b in rects[i + 1:]:
                assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
        assert layer.text.size == size
    assert counts[0.2] == 0  # boxes a few pixels wide: no pile of text
    assert counts[1.0] == 4  # the two smaller boxes are narrower than their labels
    assert counts[4.0] == 5  # the labels of the two overlapping boxes would collide
    assert counts[20.0] == 6  # zoomed in, they no longer do


def test_inspector_layers_update_their_labels_with_the_zoom(make_napari_viewer_proxy):
    """The positions widget re-picks its grid and samples layers' labels on zoom, the
    sampled sub-volumes' clear of the base crops' (no label drawn over another)."""
    from napari_voco._positions_widget import PositionsWidget

    viewer = make_napari_viewer_proxy()
    viewer.add_image(np.zeros((200, 200), np.float32))
    widget = PositionsWidget(viewer)
    widget.grid_layer = _boxes_layer(viewer, [(0, 0, 100, 100)])  # centred on (50, 50)
    widget.samples_layer = _boxes_layer(viewer, [(10, 10, 90, 90), (100, 100, 140, 160)])
    viewer.scene.camera.zoom = 0.2
    assert list(widget.samples_layer.features["shown_label"]) == ["", ""]
    viewer.scene.camera.zoom = 5.0
    assert list(widget.grid_layer.features["shown_label"]) == ["0: 0.00"]
    # the first sample's label would lie on the grid's, at the same centre: left out
    assert list(widget.samples_layer.features["shown_label"]) == ["", "1: 0.01"]
    rects = [*_label_rects(widget.grid_layer, viewer),
             *_label_rects(widget.samples_layer, viewer)]
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
