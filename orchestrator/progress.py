"""Progress of a long command on stderr (a CLI helper; library code logs instead): each stage
as it starts and, while it runs, the elapsed time: a line rewritten in place on a terminal,
a new line every ``every_s`` seconds otherwise (a log file, CI)."""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["Ticker", "duration"]


class Ticker:
    """Progress of a long command on stderr: each stage as it starts and, while it runs, the
    elapsed time (a rewritten line on a terminal, a line every ``every_s`` otherwise)."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = 0.5 if sys.stderr.isatty() else every_s
        self.tty = sys.stderr.isatty()
        self.label, self.started, self.stage_started = "", time.monotonic(), time.monotonic()
        self.counted: tuple[int, int] | None = None  # (done, total) of the current stage
        self.dirty = False  # a terminal line is open (written without its newline)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def stage(self, message: str) -> None:
        self._end_line()
        self.label, self.stage_started, self.counted = message, time.monotonic(), None
        print(f"  {message} ...", file=sys.stderr, flush=True)

    def count(self, done: int, total: int) -> None:
        """How far the current stage is (batches, images): a bar on a terminal."""
        self.counted = (done, total)

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            if not self.label:
                continue
            spent = duration(time.monotonic() - self.stage_started)
            total = duration(time.monotonic() - self.started)
            line = f"  {self.label}: {spent} (total {total})"
            if self.counted is not None:
                done, of = self.counted
                width = 24
                filled = int(width * done / of) if of else width
                bar = "#" * filled + "." * (width - filled)
                line = f"  [{bar}] {done}/{of}  {self.label}: {spent}"
            end = "" if self.tty else "\n"
            print(("\r" + line) if self.tty else line, end=end, file=sys.stderr, flush=True)
            self.dirty = self.tty

    def _end_line(self) -> None:
        if self.dirty:
            print(file=sys.stderr)
            self.dirty = False

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self._end_line()
        if exc[0] is None:
            print(f"  done in {duration(time.monotonic() - self.started)}", file=sys.stderr)


def duration(seconds: float) -> str:
    """``42 s``, ``1 min 46 s``."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.0f} s"
