"""Calls that last long: deadlines derived from their work, and job watches that survive closed connections.

Deadlines (`ChannelConfig`): every unary call gets `timeout` (600 s). Calls whose work is known when they are
made get more, so that a slow machine does not cut them short while a hung server is still noticed:

- Localize: `timeout + seconds_per_round × rounds`, rounds = the request's `max_rounds` or the published 11
  (600 + 120 × 11 = 1,920 s by default);
- Evaluate and EvaluateSet: `timeout + seconds_per_image × images` (2 s an image: 1,024 images → 2,648 s).

Watching a job (`WatchLearningJob`): servers close every connection after a maximum age (and a grace period
for the calls in flight) so that clients rebalance, and restart during rolling updates; a stream cut that way
ends with UNAVAILABLE. `Resume` decides what the watch does then: re-open at once (the usual case: only the
connection aged out), then with backoff (0.2 s doubling to 5 s) while the learner cannot be reached, and give
up after `watch_reconnect_s` (900 s) without contact. The re-opened stream starts with the job's current state,
so an update already seen (the same state, phase, step, losses and queue position) is skipped: the caller sees
each update once, in order.
"""

from __future__ import annotations

import time

import grpc

from client.channel import ChannelConfig
from client.errors import ServiceError

PUBLISHED_ROUNDS = 11  # the localizer's default max_rounds (the published value)
RECONNECT_BACKOFF = (0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0)


def localize_timeout(config: ChannelConfig, max_rounds: int | None) -> float:
    return config.timeout + config.seconds_per_round * (max_rounds or PUBLISHED_ROUNDS)


def evaluate_timeout(config: ChannelConfig, images: int) -> float:
    return config.timeout + config.seconds_per_image * images


class Resume:
    """What a watch does after its stream ends: `fresh` filters updates, `after_error` says whether (and after how
    long) to re-open the stream or to give up (raise)."""

    def __init__(self, config: ChannelConfig, timeout: float | None = None):
        self.config = config
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last: tuple | None = None
        self.failures = 0
        self.lost_since: float | None = None
        self.reopened = 0  # streams opened after the first

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def fresh(self, progress) -> bool:
        """True for an update the caller has not seen yet (records it)."""
        self.failures, self.lost_since = 0, None
        key = (progress.state, progress.phase, progress.step, tuple(sorted(progress.losses.items())),
               progress.queue_position, progress.cancel_requested, progress.done)  # all but the ETA, recomputed
        if key == self.last:
            return False
        self.last = key
        return True

    def after_error(self, error: ServiceError) -> float | None:
        """Seconds to wait before re-opening the stream, or None to give up and raise `error`."""
        if error.code != grpc.StatusCode.UNAVAILABLE:
            return None
        now = time.monotonic()
        if self.lost_since is None:
            self.lost_since = now
        if now - self.lost_since > self.config.watch_reconnect_s:
            return None
        delay = RECONNECT_BACKOFF[min(self.failures, len(RECONNECT_BACKOFF) - 1)]
        self.failures += 1
        if self.deadline is not None and now + delay >= self.deadline:
            return None
        self.reopened += 1
        return delay

    def after_end(self) -> float | None:
        """The stream ended without a final update (the server stopped sending): seconds to wait before re-opening
        it (backing off as after an error), or None to stop watching."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        if self.failures >= len(RECONNECT_BACKOFF):
            return None
        delay = RECONNECT_BACKOFF[self.failures]
        self.reopened += 1
        self.failures += 1
        return delay
