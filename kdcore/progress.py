"""Progress display on stderr (rich): spinners for one-off waits, a bar for long work.

Everything goes to stderr so stdout stays clean for machine-readable output (`kdgen info --json`).
When stderr is not a terminal (a log file, `nohup`), the bar becomes a plain line every
`LOG_EVERY_S` seconds, so a logged run shows how far it got. Set `KD_QUIET=1` to silence both
(tests and CI logs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# piped or logged (not a terminal): don't wrap summary lines at rich's default 80 columns
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
LOG_EVERY_S = 30.0


def quiet() -> bool:
    return os.environ.get("KD_QUIET", "") not in ("", "0")


def logged() -> bool:
    """stderr goes to a file (nohup, a job log) and KD_QUIET is off: progress as plain lines."""
    return not quiet() and not console.is_terminal


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner while something slow happens once (model conversion, engine start)."""
    if quiet():
        yield
        return
    with console.status(message):
        yield
    console.print(f"[dim]{message}: done[/dim]")


class RowProgress:
    """Bar over rows with a live tokens/s figure: `with RowProgress(total) as p: p.advance(rows, tokens)`."""

    def __init__(self, total_rows: int, description: str = "generating", done_rows: int = 0):
        self.total = total_rows
        self.tokens = 0
        self.start = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet() or not console.is_terminal,  # a log gets plain lines instead (advance)
        )
        self._task = self._progress.add_task(description, total=total_rows, completed=done_rows, rate="")
        self.description = description
        self.done = done_rows
        self._logged = self.start

    def __enter__(self) -> "RowProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.done += rows
        self._progress.update(self._task, advance=rows, rate=f"{self.tokens / elapsed:,.0f} tok/s")
        now = time.perf_counter()
        if logged() and now - self._logged >= LOG_EVERY_S:
            self._logged = now
            console.print(f"{self.description}: {self.done:,}/{self.total:,} rows, {self.tokens:,} tokens, "
                          f"{self.tokens / elapsed:,.0f} tok/s, {elapsed / 60:.1f} min")
