"""The one progress type every long step reports through.

Library code never prints: it calls ``progress(Progress(...))``. The CLI renders the events
as rich progress bars, the orchestrator stores ``percent`` as the API's ``progress`` field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """One progress report of a long step.

    Args:
        stage: short name of the step ("load", "curate", "train", "base-eval", ...).
        done: units finished so far.
        total: units in all (None when unknown).
        info: extra numbers for the step (loss, epochs_completed, steps_completed, ...).
    """

    stage: str
    done: int
    total: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        if not self.total:
            return 0.0
        return min(100.0, 100.0 * self.done / self.total)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    """Default progress callback: ignore."""


def never_stop() -> bool:
    """Default ``should_stop``: run to the end."""
    return False
