"""The settings the *VoCo pretrain* and *VoCo finetune* widgets share, made in one place.

Both training widgets have a Preset, Steps, Learning rate, Device, Output folder and
Resume from; both plan their run the same way (a fresh run in the GUI thread, a resumed
one in the worker), run it in a :class:`~napari_voco._run_panel.RunPanel` and lock the
fields a resumed run takes from its checkpoint. :class:`TrainingFields` is the mixin
that does all of that once; a widget adds only its own fields, its ``apply_preset``,
``make_job`` and job body. Tooltips come from :data:`~napari_voco._tooltips.TOOLTIPS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QSpinBox, QVBoxLayout, QWidget

from napari_voco._inputs import DeviceCombo, PathEdit, ScientificSpinBox, scrolling_layout
from napari_voco._jobs import RunState
from napari_voco._run_panel import RunPanel, TrainingJob, default_run_dir, plan_new_run
from napari_voco._tooltips import TOOLTIPS
from voco_core.errors import VoCoDataError
from voco_core.plan import RunPlan, default_preset

MAX_STEPS = 100_000_000
"""The largest step count or step interval a spin box takes."""

SHARED_ROWS = {"preset": "Preset", "steps": "Steps", "lr": "Learning rate",
               "device": "Device", "output": "Output folder", "resume": "Resume from"}
"""The shared fields (attribute names) and their labels in the settings form."""

Row = str | tuple[str, QWidget]
"""A settings row: a shared field's name (:data:`SHARED_ROWS`) or ``(label, field)``."""


def spin(maximum: int, tooltip: str, minimum: int = 1) -> QSpinBox:
    """An integer field from ``minimum`` to ``maximum``."""
    box = QSpinBox()
    box.setRange(minimum, maximum)
    box.setToolTip(tooltip)
    return box


def combo(items: Iterable[str], tooltip: str = "") -> QComboBox:
    """A choice among ``items``."""
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tooltip)
    return box


class TrainingFields:
    """Mixin of the training widgets (before ``QWidget`` in the bases): the shared
    fields, the settings box with the run panel, and starting and stopping the run.

    A widget sets :attr:`KIND` (``"pretrain"``/``"finetune"``: its tooltips
    ``<kind>_steps``/``<kind>_lr``, default run folder and run panel), :attr:`TITLE`
    (the settings box; the job is described as "VoCo <title>"), :attr:`RESUMED_FIELDS`
    (its own fields a resumed run takes from its checkpoint, each named as its
    attribute and its tooltip) and :attr:`job_body`, and provides
    ``apply_preset(preset)`` and ``make_job()``. In its ``__init__`` it calls
    :meth:`add_run_fields`, makes its own fields, then :meth:`choose_default_preset`
    and :meth:`add_settings`.
    """

    KIND: ClassVar[str]
    TITLE: ClassVar[str]
    RESUMED_FIELDS: ClassVar[tuple[str, ...]] = ()
    job_body: ClassVar[staticmethod]
    """The worker's body of a job, ``job_body(job, context)`` (a ``staticmethod``)."""

    preset: QComboBox
    steps: QSpinBox
    lr: ScientificSpinBox
    device: DeviceCombo
    output: PathEdit
    resume: PathEdit
    settings: QGroupBox
    panel: RunPanel

    # ------------------------------------------------------------------ set-up

    def add_run_fields(self, presets: Iterable[str], lr: float, resume_hint: str) -> None:
        """Make the shared fields (``resume_hint``: the Resume from placeholder)."""
        self.preset = combo(presets)
        self.steps = spin(MAX_STEPS, TOOLTIPS[f"{self.KIND}_steps"])
        self.lr = ScientificSpinBox(lr)
        self.lr.setToolTip(TOOLTIPS[f"{self.KIND}_lr"])
        self.device = DeviceCombo()
        self.output = PathEdit(f"run folder (default: ~/napari-voco/runs/{self.KIND}-<time>)")
        self.output.setToolTip(TOOLTIPS["output"])
        self.resume = PathEdit(resume_hint, file_filter="Checkpoints (*.pt)")
        self.resume.setToolTip(TOOLTIPS["resume"])
        self.resume.changed.connect(self._on_resume_changed)

    def choose_default_preset(self) -> None:
        """Follow the preset with ``apply_preset`` and choose the device's default."""
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.preset.setCurrentText(default_preset(self.device.device())[0])
        self.apply_preset(self.preset.currentText())

    def add_settings(self, rows: Sequence[Row], form: QFormLayout | None = None,
                     **panel_options: Any) -> QVBoxLayout:
        """Lay ``rows`` out (after what ``form`` holds) in the settings box
        (:attr:`settings`) and make the run panel (:attr:`panel`, with
        ``panel_options``); returns the widget's layout, holding both."""
        form = QFormLayout() if form is None else form
        for row in rows:
            label, field = (SHARED_ROWS[row], getattr(self, row)) if isinstance(row, str) else row
            form.addRow(label, field)
        self.settings = QGroupBox(self.TITLE)
        self.settings.setLayout(form)
        self.panel = RunPanel(self.KIND, self.start, self.settings, **panel_options)
        layout = scrolling_layout(self)
        layout.addWidget(self.settings)
        layout.addWidget(self.panel, 1)
        return layout

    @property
    def run_state(self) -> RunState:
        """The run's evented state (status, step, total, newest checkpoint)."""
        return self.panel.state

    def apply_preset(self, preset: str) -> None:  # pragma: no cover - every widget has one
        raise NotImplementedError

    def make_job(self) -> TrainingJob:  # pragma: no cover - every widget has one
        raise NotImplementedError

    def _on_resume_changed(self, text: str) -> None:
        """A resumed run takes its preset, learning rate and :attr:`RESUMED_FIELDS` from
        its checkpoint: those fields are locked, their tooltips say so."""
        resuming = bool(text.strip())
        locked = [(self.preset, ""), (self.lr, f"{self.KIND}_lr"),
                  *((getattr(self, name), name) for name in self.RESUMED_FIELDS)]
        for widget, key in locked:
            widget.setEnabled(not resuming)
            widget.setToolTip(TOOLTIPS["resumed"] if resuming else TOOLTIPS.get(key, ""))

    # ------------------------------------------------------------------ planning

    def resume_path(self, what: str) -> Path | None:
        """The Resume from path (None: a fresh run); :class:`VoCoDataError` naming
        ``what`` is expected there when it does not exist."""
        resume = self.resume.path()
        if resume is not None and not resume.exists():
            raise VoCoDataError(f"{what} to resume not found", resume)
        return resume

    def output_folder(self, resume: Path | None) -> Path | None:
        """The Output folder; for a fresh run without one, a new default run folder
        (:func:`~napari_voco._run_panel.default_run_dir`, shown in the field)."""
        out = self.output.path()
        if out is None and resume is None:
            out = default_run_dir(self.KIND)
            self.output.set_path(out)
        return out

    def training_job(self, job_class: type[TrainingJob], plan: Callable[..., RunPlan], *,
                     fresh: bool, overrides: dict, out: Path | None,
                     plan_options: dict | None = None, **later: Any) -> TrainingJob:
        """A fresh run planned now with the chosen preset (GUI thread: typed errors for
        bad input), else a ``job_class(**later)`` planned in the worker (planning a
        resumed run loads its checkpoint), its device checked now."""
        if fresh:
            return job_class(plan_new_run(plan, preset=self.preset.currentText(),
                                          overrides=overrides, out=out, **(plan_options or {})))
        from voco_core.config import resolve_device

        resolve_device(self.device.device())  # a missing GPU is reported at once
        return job_class(overrides=overrides, out=out, **later)

    # ------------------------------------------------------------------ actions

    def planned_job(self, make_job: Callable[[], TrainingJob] | None = None
                    ) -> TrainingJob | None:
        """``make_job()`` (default: :meth:`make_job`) when no run goes; None when one
        goes, or when the inputs are bad (then shown: the panel's ``fail``)."""
        if self.panel.running:
            return None
        try:
            return (make_job or self.make_job)()
        except Exception as err:
            self.panel.fail(err)
            return None

    def launch_job(self, job: TrainingJob) -> None:
        """Run ``job`` in the run panel (napari's task list names it)."""
        self.panel.launch(functools.partial(self.job_body, job),
                          f"VoCo {self.TITLE.lower()} → {job.run_dir}", job.run_dir,
                          resumed=job.resume is not None)

    def start(self) -> bool:
        """Start a run with the current settings; False (and a notification) when the
        inputs are bad or a run is already going."""
        job = self.planned_job()
        if job is None:
            return False
        self.launch_job(job)
        return True

    def stop(self) -> None:
        """Stop the run before its next step (a checkpoint is written)."""
        self.panel.stop()
