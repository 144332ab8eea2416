"""Progress bars that also report into a log file.

rich draws a bar only on a terminal: redirected to a file, the log of a job run in the background, it prints
nothing until the work ends. `Bar` is rich's Progress plus, where there is no terminal, one plain line per
unfinished task at most every `every` seconds, so such a log says how far the job is and how long is left.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TaskID, TextColumn, TimeRemainingColumn

T = TypeVar("T")
LOG_EVERY_S = 30.0


class Bar(Progress):
    def __init__(self, *columns: Any, label: str = "", every: float = LOG_EVERY_S, **kwargs: Any):
        super().__init__(*(columns or Progress.get_default_columns()), **kwargs)
        self.label, self.every = label, every
        self._logged_at = time.monotonic()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log()

    def _log(self) -> None:
        if self.disable or self.console.is_terminal or time.monotonic() - self._logged_at < self.every:
            return
        self._logged_at = time.monotonic()
        for task in self.tasks:
            if task.visible and not task.finished:
                self.console.print(progress_line(task, self.label), markup=False, highlight=False, soft_wrap=True)


def progress_line(task: Task, label: str = "") -> str:
    """'features shards: 3/12 (25%), 0:04:10 elapsed, ~0:12:30 left' (the estimate once rich has one)."""
    done = f"{task.completed:.0f}/{task.total:.0f} ({task.percentage:.0f}%)" if task.total else f"{task.completed:.0f}"
    line = f"{label} {task.description}".strip() + f": {done}, {_clock(task.elapsed)} elapsed"
    return line + (f", ~{_clock(task.time_remaining)} left" if task.time_remaining is not None else "")


def _clock(seconds: float | None) -> str:
    return str(datetime.timedelta(seconds=round(seconds or 0)))


def counted(what: str, **kwargs: Any) -> Bar:
    """A bar for a count of items: its label, the bar, done/total and the time left."""
    return Bar(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), label=what, **kwargs)


def track(items: Iterable[T], description: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """rich's `track`, reporting into log files too (`kwargs` go to `Bar`)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with Bar(**kwargs) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
