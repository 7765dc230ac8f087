"""The learning progress bar, fed by `JobProgress` updates (WatchLearningJob, or the local trainer).

`tqdm` draws it when installed; otherwise one self-overwriting line on stderr (a plain line per phase when
stderr is not a terminal, so logs stay readable). While a job generates its class images (PREPARING) the bar
counts them, then it counts training steps.
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
        self.unit = None  # "image" while class images are made, then "step"
        self.last_phase = None
        self.last_ready = None
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False

    def __call__(self, p: JobProgress) -> None:
        if _tqdm is not None:
            self._tqdm(p)
        else:
            self._line(p)

    def _tqdm(self, p: JobProgress) -> None:
        images = _making_class_images(p)
        unit = "image" if images else "step"
        if self.bar is not None and unit != self.unit:
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = _tqdm(total=1, file=self.stream, unit=unit, desc="learning", dynamic_ncols=True, leave=True)
            self.unit = unit
        self.bar.total = max(p.class_images.count if images else p.total_steps, 1)
        self.bar.n = p.class_images.ready if images else p.step
        description = p.phase.lower() if p.state == "RUNNING" else p.state.lower()
        self.bar.set_description("preparing: class images" if images else description, refresh=False)
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
        elif p.phase != self.last_phase or p.done or (_making_class_images(p) and p.class_images.ready != self.last_ready):
            self.stream.write(p.line() + "\n")  # a line per phase, and per class-image batch made
        self.last_phase = p.phase
        self.last_ready = p.class_images.ready if p.class_images is not None else None
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _making_class_images(p: JobProgress) -> bool:
    return p.state == "RUNNING" and p.phase == "PREPARING" and p.class_images is not None and p.class_images.preparing


def _ascii_bar(p: JobProgress, width: int = 30) -> str:
    percent = 100.0 * p.class_images.ready / max(p.class_images.count, 1) if _making_class_images(p) else p.percent
    filled = int(width * min(max(percent, 0.0), 100.0) / 100)
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
