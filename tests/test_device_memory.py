"""Memory the training GUI shows (no GPU needed: CUDA is faked where it matters).

* while a run goes, the device list re-reads the CUDA devices' free memory every few
  seconds, in place (the choice and the signals stay), and stops when the run ends
  or the widget closes; without a CUDA device no timer runs;
* :func:`voco_core.train.common.reset_peak_memory` resets the CUDA peak (a no-op on
  CPU), and the status line names the peak for the run's device.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from voco_core.train import PretrainEvent
from voco_core.train.common import peak_memory_bytes, reset_peak_memory

GIB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two fake CUDA devices whose free memory drops by 1 GiB at every read."""
    free = itertools.count()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Fake GPU {index}")
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda index: ((100 - next(free)) * GIB, 128 * GIB))


@pytest.fixture
def no_cuda(monkeypatch):
    def forbidden(*args):
        raise AssertionError("no CUDA device: its memory must not be read")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", forbidden)


def _labels(combo) -> list[str]:
    return [combo.itemText(row) for row in range(combo.count())]


@pytest.mark.gui
def test_device_list_shows_free_memory_live_keeping_the_choice(qtbot, fake_cuda):
    pytest.importorskip("qtpy")
    from napari_voco._inputs import DeviceCombo

    combo = DeviceCombo()
    qtbot.addWidget(combo)
    assert combo.device() == "cuda:0"  # training: the first GPU by default
    combo.set_device("cuda:1")
    assert combo.currentText().startswith("cuda:1 · Fake GPU 1 · ")
    signals: list = []
    combo.currentIndexChanged.connect(signals.append)
    combo.currentTextChanged.connect(signals.append)
    before = _labels(combo)

    combo.start_live(10)
    assert combo.live_timer.isActive()
    qtbot.waitUntil(lambda: _labels(combo) != before, timeout=2000)
    labels = _labels(combo)
    assert labels[0] == "CPU" and len(labels) == 3
    assert labels[1].startswith("cuda:0 · Fake GPU 0 · ")
    assert labels[2].startswith("cuda:1 · Fake GPU 1 · ")
    assert labels[2].endswith("free of 128.0 GiB")
    assert labels[1:] != before[1:]  # re-read: the fake's free memory fell
    assert combo.device() == "cuda:1" and combo.currentText() == labels[2]
    assert signals == []  # the choice did not change, and no one was told it did

    combo.stop_live()
    assert not combo.live_timer.isActive()
    stopped = _labels(combo)
    qtbot.wait(50)
    assert _labels(combo) == stopped


@pytest.mark.gui
def test_run_panel_drives_the_live_memory_and_names_the_step_peak(qtbot, fake_cuda,
                                                                   monkeypatch):
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QFormLayout, QGroupBox

    from napari_voco._inputs import DeviceCombo
    from napari_voco._run_panel import RunPanel

    settings = QGroupBox("settings")
    form = QFormLayout(settings)
    device = DeviceCombo()
    form.addRow("Device", device)
    panel = RunPanel("pretrain", lambda: None, settings)
    qtbot.addWidget(settings)
    qtbot.addWidget(panel)
    monkeypatch.setattr(panel.runner, "start", lambda *args, **kwargs: None)  # no worker

    panel.launch(lambda context: iter(()), "test run", "run", resumed=False)
    assert panel.run_device == "cuda:0"
    assert device.live_timer.isActive()
    assert device.live_timer.interval() == RunPanel.LIVE_MEMORY_MS
    chosen = "optim.batch_size auto: 2 volume(s) per micro-batch x 1 accumulation"
    panel._on_event(PretrainEvent("start", 0, 4, message=chosen))
    assert chosen in panel.status.text()  # what auto chose, until the first step
    panel._on_event(PretrainEvent("step", 1, 4, loss=0.5, seconds_per_step=1.0,
                                  peak_memory_bytes=int(12.3 * GIB), lr=1e-4))
    assert "step peak 12.3 GiB" in panel.status.text()

    shown = device.currentText()
    panel.runner.finished.emit()  # the run ended
    assert not device.live_timer.isActive()
    assert device.currentText() != shown  # read once more: what the run left free
    assert device.device() == "cuda:0"


@pytest.mark.gui
def test_closing_the_widget_stops_the_live_memory(qtbot, fake_cuda):
    pytest.importorskip("qtpy")
    from qtpy.QtWidgets import QVBoxLayout, QWidget

    from napari_voco._inputs import DeviceCombo, release_viewer_events_on_close

    widget = QWidget()
    device = DeviceCombo()
    QVBoxLayout(widget).addWidget(device)
    release_viewer_events_on_close(widget)
    qtbot.addWidget(widget)
    device.start_live(10)
    assert device.live_timer.isActive()
    widget.close()
    assert not device.live_timer.isActive()

    dock = QWidget()  # taken out of napari's dock: its parent becomes None
    qtbot.addWidget(dock)
    widget.setParent(dock)
    device.start_live(10)
    widget.setParent(None)
    assert not device.live_timer.isActive()


@pytest.mark.gui
def test_opening_the_list_keeps_a_device_this_machine_lacks(qtbot, no_cuda):
    pytest.importorskip("qtpy")
    from napari_voco._inputs import DeviceCombo

    combo = DeviceCombo()
    qtbot.addWidget(combo)
    combo.set_device("cuda:1")  # e.g. from a config written on a GPU machine
    assert combo.device() == "cuda:1"
    combo.refresh()  # what opening the list does
    assert combo.device() == "cuda:1"
    assert combo.currentText() == "cuda:1 (not found on this machine)"
    assert _labels(combo).count("cuda:1 (not found on this machine)") == 1
    combo.set_device("cpu")  # once another is chosen, the missing one goes
    combo.refresh()
    assert combo.device() == "cpu" and combo.findData("cuda:1") < 0


@pytest.mark.gui
def test_no_timer_without_a_cuda_device(qtbot, no_cuda):
    pytest.importorskip("qtpy")
    from napari_voco._inputs import DeviceCombo

    combo = DeviceCombo()
    qtbot.addWidget(combo)
    assert combo.device() == "cpu"
    combo.start_live(10)
    assert not combo.live_timer.isActive()
    combo.update_memory()  # nothing to read
    assert _labels(combo)[-1] in ("CPU", "Apple MPS")


def test_reset_peak_memory_resets_cuda_only(monkeypatch):
    resets: list = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    before = peak_memory_bytes(torch.device("cpu"))
    reset_peak_memory(torch.device("cpu"))  # the peak RSS cannot be reset
    assert resets == [] and peak_memory_bytes(torch.device("cpu")) >= before > 0
    reset_peak_memory(torch.device("cuda:1"))
    assert resets == [torch.device("cuda:1")]


def test_step_status_names_the_peak_for_the_device():
    from napari_voco._text import step_status

    event = PretrainEvent("step", 3, 10, loss=0.25, lr=3e-4, seconds_per_step=2.0,
                          peak_memory_bytes=int(2.1 * GIB), crops_per_second=6.5)
    assert step_status(event, "cuda:0") == ("loss 0.2500 · 6.5 crops/s · 2.00 s/step · "
                                            "step peak 2.1 GiB · lr 3.0e-04")
    assert "peak RSS 2.1 GiB" in step_status(event, "cpu")
    assert "peak RSS 2.1 GiB" in step_status(event, "mps")
    assert "peak memory 2.1 GiB" in step_status(event)  # device unknown
    event.peak_memory_bytes = 0
    assert "peak" not in step_status(event, "cuda:0")
