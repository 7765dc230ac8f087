"""The learning progress bar, fed by `JobProgress` updates (WatchLearningJob, or the local trainer).

`tqdm` draws it when installed; otherwise one self-overwriting line on stderr (a plain line per phase when
stderr is not a terminal, so logs stay readable).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from client.types import JobProgress

try:  # optional: a nicer bar when present
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


class _Bar:
    def __init__(self, stream):
        self.stream = stream
        self.bar = None
        self.last_phase = None
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False

    def __call__(self, p: JobProgress) -> None:
        if _tqdm is not None:
            self._tqdm(p)
        else:
            self._line(p)

    def _tqdm(self, p: JobProgress) -> None:
        if self.bar is None:
            self.bar = _tqdm(total=max(p.total_steps, 1), file=self.stream, unit="step", desc="learning",
                             dynamic_ncols=True, leave=True)
        self.bar.total = max(p.total_steps, 1)
        self.bar.n = p.step
        self.bar.set_description(p.phase.lower() if p.state == "RUNNING" else p.state.lower(), refresh=False)
        postfix = {}
        if "total" in p.losses:
            postfix["loss"] = f"{p.losses['total']:.4g}"
        if p.state == "QUEUED":
            postfix["queue"] = p.queue_position
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def _line(self, p: JobProgress) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + _ascii_bar(p) + " " + p.line())
            if p.done:
                self.stream.write("\n")
        elif p.phase != self.last_phase or p.done:
            self.stream.write(p.line() + "\n")
        self.last_phase = p.phase
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ascii_bar(p: JobProgress, width: int = 30) -> str:
    filled = int(width * min(max(p.percent, 0.0), 100.0) / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


@contextmanager
def progress_reporter(progress: bool | Callable[[JobProgress], None], stream=None) -> Iterator[Callable[[JobProgress], None]]:
    """A callable to feed `JobProgress` to: a bar (True), the caller's callable, or nothing (False)."""
    if callable(progress):
        yield progress
        return
    if not progress:
        yield lambda _p: None
        return
    bar = _Bar(stream or sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
