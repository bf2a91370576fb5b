"""The widgets' shared job runner and their life cycle in a viewer (no training here).

* :class:`napari_voco._jobs.JobRunner` relays a job's events in order (also those a
  job emits from a callback), stops it through its flag, reports a failure as one
  notification and keeps its :class:`RunState`;
* closing a widget (taking it out of napari's dock) leaves none of its callbacks
  connected to the viewer's, the layers' or a followed run's events;
* the pretrain widget plans its run through :func:`voco_core.plan.plan_pretrain`,
  with the loss variant as an override.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def _viewer_callbacks(viewer) -> list:
    """Every callback connected to the viewer's layer list, dims, camera and layers."""
    from napari.utils.events import EmitterGroup

    from napari_voco._layers import unwrap

    viewer = unwrap(viewer)
    groups = [viewer.layers.events, viewer.dims.events, viewer.camera.events,
              *(layer.events for layer in viewer.layers)]
    callbacks = []
    for group in groups:
        emitters = group.emitters.values() if isinstance(group, EmitterGroup) else [group]
        for emitter in emitters:
            callbacks.extend(emitter.callbacks)
    return callbacks


def _owner(callback):
    """The object a napari callback belongs to (a bound method's instance)."""
    if isinstance(callback, tuple):
        ref = callback[0]
        return ref() if isinstance(ref, weakref.ref) else ref
    return getattr(callback, "__self__", None)


def _owned_by(callbacks: list, widget) -> list:
    """The callbacks bound to ``widget`` or its children (widgets and helper objects)."""
    from qtpy.QtCore import QObject

    mine = {id(widget), *(id(child) for child in widget.findChildren(QObject))}
    return [cb for cb in callbacks if id(_owner(cb)) in mine]


def test_job_runner_relays_events_stops_and_reports_failures(qtbot, monkeypatch):
    from napari_voco import _notify
    from napari_voco._jobs import JobRunner, JobState

    notified: list[BaseException] = []
    monkeypatch.setattr(_notify, "notify_error", notified.append)
    seen: list = []
    finished: list[JobState] = []
    runner = JobRunner("test", on_event=seen.append, on_failed=_notify.notify_error,
                       on_finished=lambda: finished.append(runner.state.status))
    statuses: list[JobState] = []
    runner.state.events.status.connect(statuses.append)
    released = threading.Event()

    def counting(context):
        for step in range(1000):
            if context.stop.is_set():
                return
            context.emit(f"emitted {step}")  # as from a progress callback
            yield step
            released.wait(0.01)

    runner.start(counting, "counting")
    qtbot.waitUntil(lambda: len(seen) >= 6, timeout=60_000)  # a slow machine may take long
    runner.stop()
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    assert seen[:4] == ["emitted 0", 0, "emitted 1", 1]  # in order
    assert len(seen) < 2000
    assert statuses == [JobState.RUNNING, JobState.STOPPING, JobState.STOPPED]
    assert statuses == ["running", "stopping", "stopped"]  # a StrEnum: equal to its names
    assert finished == [JobState.STOPPED] and not notified

    def failing(context):
        yield "first"
        raise ValueError("bad value in the job")

    runner.start(failing, "failing")
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    assert seen[-1] == "first" and runner.state.status == JobState.FAILED
    assert finished == [JobState.STOPPED, JobState.FAILED]
    assert [str(err) for err in notified] == ["bad value in the job"]
    assert "bad value" in runner.state.message


@pytest.mark.parametrize("name", ["pretrain", "finetune", "positions", "segment"])
def test_closing_a_widget_releases_its_viewer_events(make_napari_viewer_proxy, name):
    from napari_voco._finetune_widget import FinetuneWidget
    from napari_voco._positions_widget import PositionsWidget
    from napari_voco._pretrain_widget import PretrainWidget
    from napari_voco._segment_widget import SegmentWidget

    viewer = make_napari_viewer_proxy()
    viewer.add_image(np.zeros((16, 16, 8), np.float32), name="image")
    viewer.add_labels(np.zeros((16, 16, 8), np.uint8), name="labels")
    widget_class = {"pretrain": PretrainWidget, "finetune": FinetuneWidget,
                    "positions": PositionsWidget, "segment": SegmentWidget}[name]
    widget = widget_class(viewer)
    viewer.window.add_dock_widget(widget, name=f"VoCo {name}")
    viewer.add_image(np.ones((16, 16, 8), np.float32), name="added later")
    assert _owned_by(_viewer_callbacks(viewer), widget)  # it listens while docked
    if name == "finetune":  # its training-data helper object listens too
        assert any(_owner(cb) is widget.data for cb in _viewer_callbacks(viewer))
    followed = None
    if name == "positions":
        pretrain = PretrainWidget(viewer)
        viewer.window.add_dock_widget(pretrain, name="VoCo pretrain")
        followed = pretrain.run_state
        widget.follow_run(followed)
        assert widget.followed is followed

    viewer.window.remove_dock_widget(widget)  # what the dock's close button does
    assert _owned_by(_viewer_callbacks(viewer), widget) == []
    if followed is not None:
        assert widget.followed is None
        assert len(followed.checkpoint_written) == 0  # nothing listens to the run any more


def test_pretrain_widget_plans_with_the_core_and_the_loss_variant(make_napari_viewer_proxy,
                                                                   tmp_path):
    from napari_voco._pretrain_widget import PretrainWidget
    from voco_core.errors import VoCoDataError

    viewer = make_napari_viewer_proxy()
    widget = PretrainWidget(viewer)
    widget.preset.setCurrentText("tiny")
    widget.device.set_device("cpu")
    widget.data_path.set_path(tmp_path)
    widget.output.set_path(tmp_path / "run")
    widget.teacher.setCurrentText("none")
    widget.variant.setCurrentText("v2")
    assert widget.teacher.currentText() == "head"  # v2 needs a teacher
    widget.steps.setValue(7)
    plan = widget.make_job().plan
    assert plan.kind == "pretrain" and plan.run_dir == tmp_path / "run"
    assert plan.config.loss.variant == "v2" and plan.config.model.teacher == "head"
    assert plan.config.optim.total_steps == 7 and plan.resume is None

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(VoCoDataError, match="already holds a run"):
        widget.make_job()
