"""Deterministic crash points, so the exactly-once tests can kill ``stream`` exactly where they mean to.

``KSA_REC_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it reaches ``<point>``
(1-based). Points, in the order one micro-batch passes them (``serving.jobs.StreamCommitWriter``):

    before-output   the micro-batch is computed; nothing of it is written yet
    after-output    its recommendations are in the output, its states are not committed
    after-commit    states (with their replay windows) and output length are committed together

Unset (every normal run), ``crash_point`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "KSA_REC_CRASH_AT"
POINTS = ("before-output", "after-output", "after-commit")

_reached: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Kill this process (SIGKILL: no cleanup, like ``kill -9``) if ``KSA_REC_CRASH_AT`` names this visit."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.isdigit():
        raise ValueError(f"{CRASH_ENV}={spec!r}: expected <point>:<n> with point one of {', '.join(POINTS)}")
    _reached[point] = _reached.get(point, 0) + 1
    if name == point and _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
