"""Turn exceptions raised in GUI callbacks into napari notifications.

Errors this project raises on purpose (:class:`voco_core.errors.VoCoError`)
already say what is wrong and with which file, so they are shown as their
message alone and logged without a traceback. Any other exception is shown as
``"TypeName: message"`` and logged with its traceback, since it is a bug or an
unexpected condition worth reporting.

Usage in a widget::

    with reporting_errors():
        run_the_thing()

or as a decorator, ``@reporting_errors()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from napari.utils.notifications import show_error, show_info, show_warning

from voco_core.errors import VoCoError

logger = logging.getLogger(__name__)


def error_message(err: BaseException) -> str:
    """One-line text for ``err``: its message for a :class:`VoCoError`, else
    ``"TypeName: message"`` (just ``"TypeName"`` when the message is empty)."""
    if isinstance(err, VoCoError):
        return str(err)
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def notify_error(err: BaseException) -> None:
    """Show ``err`` as a napari error notification and log it (module doc)."""
    message = error_message(err)
    if isinstance(err, VoCoError):
        logger.error(message)
    else:
        logger.error(message, exc_info=(type(err), err, err.__traceback__))
    show_error(message)


def notify_info(message: str) -> None:
    """Show ``message`` as a napari information notification (an action's outcome)."""
    show_info(message)


def split_notes(text: str) -> tuple[list[str], list[str]]:
    """A trainer's notes (an event's ``message``) as ``(information lines, warning
    lines)``: ``warning:`` lines are warnings."""
    lines = [line for line in text.splitlines() if line.strip()]
    return ([line for line in lines if not line.startswith("warning:")],
            [line for line in lines if line.startswith("warning:")])


def notify_notes(text: str, information: bool = True) -> None:
    """Show each line of a trainer's notes (an event's ``message``): ``warning:`` lines
    as warnings, the others as information unless ``information`` is False (the run
    panel writes those in its status line instead of covering the canvas with them)."""
    infos, warnings = split_notes(text)
    for line in warnings:
        show_warning(line)
    for line in infos if information else ():
        show_info(line)


def status_with_notes(status: str, notes: list[str], most: int = 3) -> str:
    """``status`` with the run's notes below it, the ``most`` latest of them (and how
    many earlier ones there were)."""
    if not notes:
        return status
    shown = notes[-most:]
    earlier = len(notes) - len(shown)
    lines = ([f"({earlier} earlier notes)"] if earlier else []) + shown
    return "\n".join([status, *lines])


@contextmanager
def reporting_errors() -> Iterator[None]:
    """Context manager (or decorator) that reports any ``Exception`` raised in its
    body with :func:`notify_error` instead of letting it propagate.
    ``KeyboardInterrupt`` and other non-``Exception`` errors still propagate."""
    try:
        yield
    except Exception as err:
        notify_error(err)
