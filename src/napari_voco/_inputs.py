"""Input fields shared by the VoCo widgets, and the release of their viewer events.

* :class:`PathEdit`: a path typed or picked (*Folder…* and/or *File…*);
* :class:`DeviceCombo`: where a network runs (CPU, each CUDA device with its free
  memory, Apple MPS; optionally *auto*), its free memory re-read every few seconds
  while a run goes (:meth:`DeviceCombo.start_live`);
* :class:`LayerCombo`: the viewer's layers of one type, kept in sync;
* :class:`ScientificSpinBox`: a learning rate shown as ``3.0e-04``;
* :class:`CompactStack`: a stacked widget as tall as its current page;
* :func:`scrolling_layout`: a widget's content in a scroll area, so a tall widget
  never makes napari's window taller than the screen, with a usable minimum height
  (:data:`MIN_DOCK_HEIGHT`); the widget joins the other VoCo docks as a tab when it
  is docked (:func:`join_voco_tabs`), and :func:`reveal` scrolls to a line (a
  failure in the status line);
* :class:`ViewerEvents` / :func:`release_viewer_events_on_close`: connections to
  napari's viewer and layer events that a widget drops when it is closed or taken
  out of its dock, so a closed widget leaves nothing connected to the viewer
  (napari-animation's pattern).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtGui import QValidator
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QMainWindow,
    QPushButton,
    QScrollArea,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from napari_voco._layers import unwrap
from napari_voco._text import format_bytes, format_lr
from napari_voco._tooltips import TOOLTIPS
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer


# --------------------------------------------------------------------------- viewer events


class ViewerEvents:
    """Mixin for widgets that listen to napari events: :meth:`listen` connects and
    remembers, :meth:`release_viewer_events` disconnects all of them."""

    def listen(self, emitter: Any, callback: Callable) -> None:
        emitter.connect(callback)
        self.__dict__.setdefault("_viewer_connections", []).append((emitter, callback))

    def release_viewer_events(self) -> None:
        for emitter, callback in self.__dict__.pop("_viewer_connections", []):
            try:
                emitter.disconnect(callback)
            except (RuntimeError, ValueError, TypeError):  # already gone with its layer
                pass


class _ReleaseOnClose(QObject):
    """Event filter: on close, or when napari takes the widget out of its dock (its
    parent becomes None), release the viewer events of the widget and its children
    (widgets and helper objects)."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        kind = event.type()
        if kind == QEvent.Type.Close or (kind == QEvent.Type.ParentChange
                                         and watched.parent() is None):
            # QObject: helper objects (e.g. the finetune widget's TrainingData) too
            for child in (watched, *watched.findChildren(QObject)):
                if isinstance(child, ViewerEvents):
                    child.release_viewer_events()
        return False


def release_viewer_events_on_close(widget: QWidget) -> None:
    """Make ``widget`` drop its (and its children's) viewer connections when it closes
    or is removed from napari's dock (``viewer.window.remove_dock_widget``, the dock's
    close button)."""
    widget._release_filter = _ReleaseOnClose(widget)
    widget.installEventFilter(widget._release_filter)


# --------------------------------------------------------------------------- paths


class PathEdit(QWidget):
    """A path: a text field plus *Folder…* and/or *File…* pickers.

    ``file_filter`` (e.g. ``"Checkpoints (*.pt *.pth)"``) adds a *File…* button,
    ``folder`` a *Folder…* button. :meth:`path` is the path (``~`` expanded) or None.
    """

    changed = Signal(str)

    def __init__(self, placeholder: str = "", *, folder: bool = True,
                 file_filter: str | None = None, file_button: str = "File…",
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.line = QLineEdit()
        self.line.setPlaceholderText(placeholder)
        self.line.setToolTip(placeholder)
        self.line.textChanged.connect(self.changed.emit)
        self._filter = file_filter
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.line, 1)
        self.folder_button = self.file_button = None
        if file_filter is not None:
            self.file_button = QPushButton(file_button)
            self.file_button.setToolTip(f"choose a file ({file_filter})")
            self.file_button.clicked.connect(self._choose_file)
            layout.addWidget(self.file_button)
        if folder:
            self.folder_button = QPushButton("Folder…")
            self.folder_button.setToolTip("choose a folder")
            self.folder_button.clicked.connect(self._choose_folder)
            layout.addWidget(self.folder_button)

    def text(self) -> str:
        return self.line.text().strip()

    def path(self) -> Path | None:
        """The path typed or chosen (``~`` expanded), or None when the field is empty."""
        return Path(self.text()).expanduser() if self.text() else None

    def set_path(self, path: str | Path | None) -> None:
        self.line.setText("" if path is None else str(path))

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", self.text())
        if path:
            self.set_path(path)

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a file", self.text(),
                                              f"{self._filter};;All files (*)")
        if path:
            self.set_path(path)


def checkpoint_edit(placeholder: str) -> PathEdit:
    """A :class:`PathEdit` for a run folder or a ``.pt`` checkpoint."""
    return PathEdit(placeholder, file_filter="Checkpoints (*.pt *.pth)")


def checkpoint_path(edit: PathEdit, kind: str) -> Path:
    """The edit's path, or :class:`VoCoDataError` when it is empty or does not exist
    (``kind``: "pretraining", "finetuning")."""
    path = edit.path()
    if path is None:
        raise VoCoDataError(f"no checkpoint chosen: pick a {kind} run folder or .pt file")
    if not path.exists():
        raise VoCoDataError("checkpoint or run folder not found", path)
    return path


# --------------------------------------------------------------------------- devices


def device_choices(auto: bool = False) -> list[tuple[str, str]]:
    """``(label, device)`` pairs: with ``auto`` first ``("auto (CUDA when available)",
    "auto")``; then ``("CPU", "cpu")``; every CUDA device as ``("cuda:0 · NVIDIA H200 ·
    130.2 GiB free of 139.8 GiB", "cuda:0")`` (``torch.cuda.mem_get_info``); Apple
    ``mps`` when available."""
    import torch

    choices = [("auto (CUDA when available)", "auto")] if auto else []
    choices.append(("CPU", "cpu"))
    choices += [(cuda_label(index, name), f"cuda:{index}")
                for index, name in cuda_device_names().items()]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(("Apple MPS", "mps"))
    return choices


def cuda_device_names() -> dict[int, str]:
    """Index -> name of every CUDA device (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    names = {}
    for index in range(torch.cuda.device_count()):
        try:
            names[index] = torch.cuda.get_device_name(index)
        except (RuntimeError, AssertionError):
            names[index] = "CUDA device"
    return names


def cuda_label(index: int, name: str) -> str:
    """A CUDA device's entry: ``"cuda:0 · NVIDIA H200 · 130.2 GiB free of 139.8 GiB"``
    (``torch.cuda.mem_get_info``: the whole device's free memory, other processes
    included)."""
    import torch

    try:
        free, total = torch.cuda.mem_get_info(index)
        memory = f"{format_bytes(free)} free of {format_bytes(total)}"
    except (RuntimeError, AssertionError):
        memory = "free memory unknown"
    return f"cuda:{index} · {name} · {memory}"


class DeviceCombo(ViewerEvents, QComboBox):
    """Where a network runs: CPU and each CUDA device (name, free memory, re-read every
    time the list opens). With ``auto`` (inference widgets) *auto* comes first and is
    chosen; otherwise (training) the first CUDA device is chosen when there is one.
    :meth:`device` is the ``run.device`` value (``"auto"``, ``"cpu"``, ``"cuda:0"``…).

    While a run goes (:class:`~napari_voco._run_panel.RunPanel` calls :meth:`start_live`
    and :meth:`stop_live`), the CUDA entries' free memory is re-read every few seconds,
    in place: the choice stays and no signal is emitted. Without a CUDA device no timer
    runs. Closing the widget (:func:`release_viewer_events_on_close`) stops it too.
    """

    def __init__(self, auto: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self._auto = auto
        self._cuda_names: dict[int, str] = {}  # the listed CUDA devices: index -> name
        self.live_timer = QTimer(self)
        self.live_timer.timeout.connect(self.update_memory)
        self.setToolTip(TOOLTIPS["device"])
        self.refresh()
        if not auto and self.count() > 1 and str(self.itemData(1)).startswith("cuda"):
            self.setCurrentIndex(1)

    def refresh(self) -> None:
        """Re-read the devices and their free memory, keeping the chosen one (also a
        device this machine lacks, e.g. from a loaded config: starting a job then says
        so, instead of the list quietly switching to another device)."""
        current = self.device() if self.count() else None
        self.blockSignals(True)
        try:
            self.clear()
            for label, spec in device_choices(self._auto):
                self.addItem(label, spec)
            if current is not None:
                self.set_device(current)
        finally:
            self.blockSignals(False)
        self._cuda_names = cuda_device_names()

    def update_memory(self) -> None:
        """Re-read the free memory of the listed CUDA devices, changing only their
        labels (the list, the choice and the signals stay)."""
        self.blockSignals(True)
        try:
            for index, name in self._cuda_names.items():
                row = self.findData(f"cuda:{index}")
                if row >= 0:
                    self.setItemText(row, cuda_label(index, name))
        finally:
            self.blockSignals(False)

    def start_live(self, interval_ms: int = 2000) -> None:
        """Re-read the CUDA devices' free memory every ``interval_ms`` until
        :meth:`stop_live` (nothing to do, so no timer, without a CUDA device)."""
        if self._cuda_names:
            self.live_timer.start(interval_ms)

    def stop_live(self) -> None:
        self.live_timer.stop()

    def release_viewer_events(self) -> None:
        """On close: stop the live memory read-out."""
        self.stop_live()
        super().release_viewer_events()

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()

    def device(self) -> str:
        """The chosen device value."""
        return str(self.currentData()) if self.count() else "cpu"

    def set_device(self, spec: str, add: bool = True) -> None:
        """Choose ``spec`` (e.g. ``"cuda:0"``); with ``add``, list it when the machine
        does not have it (starting a job then reports the missing device)."""
        index = self.findData(spec)
        if index < 0:
            if not add:
                return
            self.addItem(f"{spec} (not found on this machine)", spec)
            index = self.count() - 1
        self.setCurrentIndex(index)


def narrow(combo: QComboBox, characters: int = 10) -> QComboBox:
    """Let ``combo`` shrink to ``characters`` wide (its longest item no longer sets its
    minimum width): a dock beside another on a 1600-pixel screen is about 470 pixels
    wide, and one long item would otherwise push the widget past it (clipping its
    right side behind a horizontal scroll bar)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(characters)
    return combo


# --------------------------------------------------------------------------- layers


class LayerCombo(ViewerEvents, QComboBox):
    """A combo box listing the viewer's layers of one type (by name), kept in sync."""

    def __init__(self, viewer: napari.Viewer, layer_type: type | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        if layer_type is None:
            from napari.layers import Image

            layer_type = Image
        self._viewer = viewer
        self._type = layer_type
        narrow(self)  # layer names can be long
        self.setToolTip(f"{layer_type.__name__} layer to work on")
        events = viewer.layers.events
        self.listen(events.inserted, self._on_inserted)
        self.listen(events.removed, self.refresh)
        self.listen(events.reordered, self.refresh)
        for layer in viewer.layers:
            self.listen(layer.events.name, self.refresh)
        self.refresh()

    def _on_inserted(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self.listen(layer.events.name, self.refresh)
        self.refresh()

    def refresh(self, event: Any = None) -> None:
        """Rebuild the list, keeping the current layer selected while it exists."""
        current = self.layer()
        layers = [unwrap(layer) for layer in self._viewer.layers
                  if isinstance(layer, self._type)]
        self.blockSignals(True)
        try:
            self.clear()
            for layer in layers:
                self.addItem(layer.name, layer)
            if current is not None and current in layers:
                self.setCurrentIndex(layers.index(current))
        finally:
            self.blockSignals(False)
        if current is None or current not in layers:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Layer | None:
        """The chosen layer (None when the list is empty)."""
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Layer) -> None:
        for index in range(self.count()):
            if self.itemData(index) is unwrap(layer):
                self.setCurrentIndex(index)
                return
        raise ValueError(f"layer {getattr(layer, 'name', layer)!r} is not in the list")


# --------------------------------------------------------------------------- numbers, pages


class ScientificSpinBox(QDoubleSpinBox):
    """A positive number shown in scientific notation (``3.0e-04``); typing any float
    (``0.0003``, ``3e-4``) works, the arrows multiply or divide by 2."""

    def __init__(self, value: float = 1e-4, minimum: float = 1e-9, maximum: float = 10.0,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setDecimals(15)
        self.setRange(minimum, maximum)
        self.setValue(value)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:
        return format_lr(value)

    def valueFromText(self, text: str) -> float:
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        stripped = text.strip()
        try:
            value = float(stripped)
        except ValueError:
            if re.fullmatch(r"[0-9.eE+-]*", stripped):
                return QValidator.State.Intermediate, text, pos
            return QValidator.State.Invalid, text, pos
        if self.minimum() <= value <= self.maximum():
            return QValidator.State.Acceptable, text, pos
        return QValidator.State.Intermediate, text, pos

    def fixup(self, text: str) -> str:
        return self.textFromValue(self.value())

    def stepBy(self, steps: int) -> None:
        self.setValue(min(self.maximum(), max(self.minimum(), self.value() * 2.0**steps)))


class CompactStack(QStackedWidget):
    """A stacked widget as large as its current page (not its largest one)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.currentChanged.connect(lambda index: self.updateGeometry())

    def sizeHint(self):
        page = self.currentWidget()
        return page.sizeHint() if page is not None else super().sizeHint()

    def minimumSizeHint(self):
        page = self.currentWidget()
        return page.minimumSizeHint() if page is not None else super().minimumSizeHint()


MIN_DOCK_HEIGHT = 260
"""The least height (pixels) of a VoCo widget's scroll area: its inputs, buttons and
progress bar show, whatever share of the window napari gives its dock (napari stacks
docks added from the Plugins menu at about 90 pixels each otherwise)."""


class _VerticalScroll(QScrollArea):
    """Scrolls vertically only: as wide as its content needs; as short as wanted down to
    :data:`MIN_DOCK_HEIGHT` (or its content's height, when that is less)."""

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        content = self.widget()
        if content is not None:
            bar = self.verticalScrollBar().sizeHint().width()
            hint.setWidth(content.minimumSizeHint().width() + bar)
            hint.setHeight(max(hint.height(),
                               min(content.sizeHint().height(), MIN_DOCK_HEIGHT)))
        return hint


def scrolling_layout(widget: QWidget) -> QVBoxLayout:
    """The layout to fill with ``widget``'s content, inside a vertical scroll area that
    fills ``widget``. A docked widget is then as short as napari's window allows (it
    scrolls), instead of stretching the window past the bottom of the screen (the
    dims slider and status bar off screen on a 1280 x 1024 or 1600 x 1000 display),
    but not shorter than :data:`MIN_DOCK_HEIGHT`. Docked, ``widget`` joins the other
    VoCo docks as a tab (:func:`join_voco_tabs`)."""
    content = QWidget()
    scroll = _VerticalScroll()
    scroll.setWidget(content)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    join_voco_tabs(widget)
    return QVBoxLayout(content)


def reveal(widget: QWidget) -> None:
    """Scroll the scroll area holding ``widget`` (if any) so that it shows, e.g. the
    status line after a failure, below the fold of a long widget."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QScrollArea):
        parent = parent.parentWidget()
    if parent is not None:
        parent.ensureWidgetVisible(widget, 0, 10)


# --------------------------------------------------------------------------- docks as tabs


KEEP_PLACEMENT = "voco_keep_placement"
"""Dock property: the dock was placed on purpose (the launcher's layout); it does not
join the other VoCo docks as a tab (:func:`keep_placement`)."""


def is_voco_dock(dock: QDockWidget) -> bool:
    """Whether ``dock`` holds a VoCo widget (one set up by :func:`join_voco_tabs`)."""
    return bool(getattr(dock.widget(), "_voco_tabs", False))


def keep_placement(dock: QDockWidget) -> None:
    """Leave ``dock`` where it was put: it does not join the VoCo tabs when shown."""
    dock.setProperty(KEEP_PLACEMENT, True)


def tabify_with_voco_docks(dock: QDockWidget) -> bool:
    """Put ``dock`` as a tab (in front) over the last other VoCo dock in the same area of
    its main window, unless it is kept in place (:func:`keep_placement`), floating,
    already a tab, or alone. True when it was tabified."""
    window = dock.parentWidget()
    if (not isinstance(window, QMainWindow) or dock.property(KEEP_PLACEMENT)
            or dock.isFloating() or window.tabifiedDockWidgets(dock)):
        return False
    area = window.dockWidgetArea(dock)
    others = [other for other in window.findChildren(QDockWidget)
              if other is not dock and is_voco_dock(other) and not other.isFloating()
              and not other.isHidden() and window.dockWidgetArea(other) == area]
    if not others:
        return False
    window.tabifyDockWidget(others[-1], dock)
    dock.show()
    dock.raise_()
    return True


class _JoinVoCoTabs(QObject):
    """Event filter: when the widget is first put in a dock, tabify that dock with the
    other VoCo docks once napari has placed it (napari's Plugins menu adds a widget's
    dock below the others, each about 90 pixels high)."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ParentChange and not watched.__dict__.get(
                "_voco_tab_joined") and isinstance(watched.parent(), QDockWidget):
            watched._voco_tab_joined = True
            dock = watched.parent()

            def join() -> None:
                try:
                    if watched.parent() is dock:
                        tabify_with_voco_docks(dock)
                except RuntimeError:  # closed before the event loop came round
                    pass

            QTimer.singleShot(0, join)  # after napari's addDockWidget and resizeDocks
        return False


def join_voco_tabs(widget: QWidget) -> None:
    """Make ``widget``'s dock, once napari docks it (from the Plugins menu,
    ``add_dock_widget`` or ``add_plugin_dock_widget``), a tab of the other VoCo docks
    in its area, in front, instead of a thin slice under them
    (:func:`tabify_with_voco_docks`); a dock marked with :func:`keep_placement`
    before the event loop runs stays where it was put."""
    widget._voco_tabs = True
    widget._join_tabs_filter = _JoinVoCoTabs(widget)
    widget.installEventFilter(widget._join_tabs_filter)
