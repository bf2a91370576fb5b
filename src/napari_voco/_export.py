"""*Export MONAI Bundle…* in the finetune widget: a finetuned run as a MONAI Bundle.

The button asks for a folder (:func:`ask_bundle_folder`, a ``QFileDialog``; tests
replace :attr:`BundleExporter.ask_folder`). The bundle goes into that folder when it
is empty (a new folder made in the dialog), else into a new ``<run name>_bundle``
inside it; an existing bundle there is never overwritten (the CLI's ``--force`` has
no GUI twin). :func:`voco_core.export.export_run` runs in a job worker (it loads the
checkpoint, saves the weights and builds the network once to check them: seconds for
a base model), so the GUI stays usable; success and failure are notifications.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QFileDialog, QLabel, QPushButton, QWidget

from napari_voco import _notify
from napari_voco._jobs import JobContext, JobRunner
from napari_voco._tooltips import TOOLTIPS
from voco_core.run_folder import RunFolder

BUTTON_TEXT = "Export MONAI Bundle…"


def ask_bundle_folder(parent: QWidget | None) -> Path | None:
    """The folder the user picks for the bundle (None when the dialog is cancelled)."""
    chosen = QFileDialog.getExistingDirectory(parent, "Export MONAI Bundle into folder")
    return Path(chosen) if chosen else None


def bundle_destination(chosen: Path, run: Path) -> Path:
    """The bundle folder for a chosen folder: itself when it is empty, else a new
    ``<run name>_bundle`` in it (``run``: a run folder or a checkpoint inside it)."""
    if chosen.is_dir() and not any(chosen.iterdir()):
        return chosen
    return chosen / f"{RunFolder.name_of(run)}_bundle"


def export_job(run: Path, out: Path, context: JobContext) -> Iterator[Any]:
    """The worker's body: one :class:`voco_core.export.ExportResult`."""
    from voco_core.export import export_run

    yield export_run(run, out)


class BundleExporter(QObject):
    """The *Export MONAI Bundle…* button and the job that writes the bundle.

    ``run_source()`` names the run to export (None: nothing to export yet);
    ``status`` shows the outcome; ``fail`` reports an error (a notification).

    Signals:
        exported(object): the :class:`~voco_core.export.ExportResult` of a finished export.
        finished(): an export ended, whatever the outcome.
    """

    exported = Signal(object)
    finished = Signal()

    def __init__(self, parent: QWidget, run_source: Callable[[], Path | None], status: QLabel,
                 fail: Callable[[BaseException], None]):
        super().__init__(parent)
        self.run_source, self.status, self.fail = run_source, status, fail
        self.ask_folder: Callable[[QWidget | None], Path | None] = ask_bundle_folder
        self.button = QPushButton(BUTTON_TEXT)
        self.button.setToolTip(TOOLTIPS["export_bundle"])
        self.button.clicked.connect(self.export)
        self.runner = JobRunner("export", self, on_event=self._on_result, on_failed=self.fail,
                                on_finished=self._on_finished)

    @property
    def running(self) -> bool:
        """True while an export runs."""
        return self.runner.running

    def export(self) -> bool:
        """Ask for a folder and start the export; False when nothing was started."""
        if self.running:
            return False
        run = self.run_source()
        if run is None:
            from voco_core.errors import VoCoDataError

            self.fail(VoCoDataError("nothing to export: finetune first, or choose a "
                                    "finetuning run in 'Resume from'"))
            return False
        chosen = self.ask_folder(self.parent())
        if chosen is None:
            return False
        out = bundle_destination(chosen, run)
        self.button.setEnabled(False)
        self.button.setText("Exporting…")
        self.status.setText(f"exporting {run} as a MONAI Bundle to {out}…")
        self.runner.start(lambda context: export_job(run, out, context),
                          f"VoCo MONAI Bundle export → {out}")
        return True

    def _on_result(self, result: Any) -> None:
        message = f"MONAI Bundle written to {result.path} ({len(result.class_names)} classes)"
        self.status.setText(message)
        _notify.notify_info(message)
        self.exported.emit(result)

    def _on_finished(self) -> None:
        self.button.setText(BUTTON_TEXT)
        self.finished.emit()
