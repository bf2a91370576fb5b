"""The run folder: one layout shared by both trainers, the CLI, inference and the plugin.

::

    RUN_DIR/config.yaml              the full config of the run
    RUN_DIR/checkpoints/last.pt      everything needed to resume exactly
    RUN_DIR/checkpoints/best.pt      finetuning: the model of the best validation Dice
    RUN_DIR/meta.json                step, loss, time of the last checkpoint (plain JSON)
    RUN_DIR/log.jsonl                one JSON record per logged step (and validation)
    RUN_DIR/tensorboard/             the same scalars for TensorBoard
    RUN_DIR/loss.png / curves.png    pretraining loss / finetuning loss and Dice figure
    RUN_DIR/.lock                    pid and host of the run writing here (while it runs)

A run holds :meth:`RunFolder.lock` for as long as it writes, so a second run on the
same folder is refused instead of interleaving checkpoints and logs. A new run never
starts in a folder that already holds one (:meth:`RunFolder.holds_run`): the user
resumes it, chooses another folder, or asks for it to be moved aside
(:meth:`RunFolder.move_aside`, ``RUN_DIR.old-<time>``); nothing is deleted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from voco_core.errors import VoCoDataError

LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class RunFolder:
    """Path names inside one run folder (nothing is created by constructing one)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST_NAME

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST_NAME

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def loss_figure(self) -> Path:
        return self.root / "loss.png"

    @property
    def curves_figure(self) -> Path:
        return self.root / "curves.png"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @classmethod
    def of(cls, path: str | Path) -> RunFolder | None:
        """The run folder ``path`` names: the folder itself, or ``RUN_DIR`` for
        ``RUN_DIR/checkpoints/*.pt``; None for a loose checkpoint file."""
        path = Path(path)
        if path.is_dir():
            return cls(path)
        if path.parent.name == "checkpoints":
            return cls(path.parent.parent)
        return None

    @classmethod
    def name_of(cls, path: str | Path) -> str:
        """A run's name: the run folder's, for the folder or a checkpoint inside it; a
        loose checkpoint file's stem."""
        folder = cls.of(path)
        return folder.root.name if folder is not None else Path(path).stem

    def held(self) -> bool:
        """Whether a run holds the folder now: its lock names a live process on this
        host, or a process on another host (which cannot be checked from here)."""
        return self.lock_file.exists() and _is_alive(_read_lock(self.lock_file))

    def holds_run(self) -> bool:
        """Whether the folder holds anything a run wrote: its config, log, meta.json or
        a checkpoint (a lock or an empty ``checkpoints/`` alone is not a run)."""
        if any(path.is_file() for path in (self.config_file, self.log, self.meta)):
            return True
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.pt"))

    def require_no_run(self) -> None:
        """The trainers' own guard (planning refuses first, :func:`voco_core.plan.
        claim_run_folder`): a new run never writes into a folder that holds one."""
        from voco_core.errors import ExistingRunError

        if self.holds_run():
            raise ExistingRunError("already holds a run; resume it, or start the new run "
                                   "in another folder", self.root)

    def contains(self, path: str | Path) -> bool:
        """Whether ``path`` lies inside this folder (both resolved; the folder itself
        counts)."""
        root, path = self.root.resolve(), Path(path).resolve()
        return path == root or root in path.parents

    def move_aside(self) -> Path:
        """Rename the folder to ``RUN_DIR.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when
        that exists) and return the new path; refused while a run writes here."""
        if self.held():
            holder = _read_lock(self.lock_file)
            raise VoCoDataError(f"another run is writing to this folder (pid "
                                f"{holder.get('pid')} on {holder.get('host')}); stop it "
                                "first or choose another output folder", self.root)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, index = self.root.with_name(f"{self.root.name}.old-{stamp}"), 2
        while target.exists():
            target = self.root.with_name(f"{self.root.name}.old-{stamp}-{index}")
            index += 1
        try:
            os.rename(self.root, target)
        except OSError as err:
            raise VoCoDataError(f"cannot move the existing run aside to {target.name} "
                                f"({err.strerror or err})", self.root) from err
        return target

    def create(self) -> None:
        """Make the folder and its ``checkpoints/``; one typed line when that fails."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                                self.root) from err

    @contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold the folder for one run: a lock file with this process's pid and host.

        Refuses (:class:`VoCoDataError`) while another live process holds it; a lock
        left by a process that is gone (same host, dead pid) is stale and taken over,
        so a crashed run never blocks its folder. Released on exit, whatever happens.
        """
        self.create()
        mine = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.lock_file)
                if _is_alive(holder):
                    elsewhere = holder.get("host") != mine["host"]
                    raise VoCoDataError(
                        f"another run is writing to this folder (pid {holder.get('pid')} on "
                        f"{holder.get('host')}); wait for it, stop it, or choose another "
                        "output folder" + (f" (if that run is gone, delete {self.lock_file})"
                                           if elsewhere else ""), self.root) from None
                self.lock_file.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                                    self.root) from err
            with os.fdopen(fd, "w") as file:
                json.dump(mine, file)
            break
        else:
            raise VoCoDataError("cannot take the run folder's lock file", self.lock_file)
        try:
            yield self
        finally:
            if _read_lock(self.lock_file) == mine:
                self.lock_file.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files a killed write left (``.last.pt.<pid>.tmp``, ...) whose
        writer is no longer running; returns what was removed."""
        removed = []
        for folder in (self.root, self.checkpoints):
            if not folder.is_dir():
                continue
            for tmp in folder.glob(".*.tmp"):
                pid = tmp.name.rsplit(".", 2)[-2] if tmp.name.count(".") >= 3 else ""
                if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                    continue  # another live process is writing it right now
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed


def _read_lock(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_alive(holder: dict) -> bool:
    """Whether a lock's holder may still be running (another host: assume it is)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False  # unreadable or half-written lock: nobody can be holding it
    if holder.get("host") != socket.gethostname() or pid == os.getpid():
        return True  # another host's run, or another run in this process (e.g. napari)
    return _pid_alive(pid)


def read_log(path: str | Path) -> list[dict]:
    """Records of a run's ``log.jsonl``, one per step in step order (a later record of
    the same step, e.g. after a resume, wins). Validation records (finetuning) are
    merged into their step's record."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
