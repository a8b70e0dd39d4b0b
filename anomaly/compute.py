"""Taking turns on the CPU: heavy tensor work runs one piece at a time, in arrival order.

PyTorch and OpenVINO each spread one operation over every core. The app serves many
visitors from threads of one process, and two threads computing at once oversubscribe the
cores, and each slows far more than twofold. So every piece of heavy
work (a batch through the backbones, a training step, a batch of anomaly maps, a block of the
coreset search) runs inside ``with CPU_TURN:``. The pieces are short (tens of ms), so an
inspection waits for at most one piece of another visitor's fit, not for the whole fit, and
each piece still uses every core.
"""
from __future__ import annotations

import threading
from collections import deque


class FairTurn:
    """A re-entrant lock granted in arrival order (``threading.Lock`` is not fair: a thread that
    releases and at once re-acquires it, as a training loop does, can starve the others)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: deque[tuple[int, threading.Event]] = deque()   # (thread id, its grant)
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> "FairTurn":
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return self
            if self._owner is None and not self._waiting:
                self._owner, self._depth = me, 1
                return self
            granted = threading.Event()
            self._waiting.append((me, granted))
        granted.wait()                      # the releasing thread made us the owner
        return self

    def __exit__(self, *exc) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth:
                return
            if self._waiting:
                self._owner, granted = self._waiting.popleft()
                self._depth = 1
                granted.set()
            else:
                self._owner = None


CPU_TURN = FairTurn()
