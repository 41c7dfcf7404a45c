"""Keeping key presses prompt while a job streams previews into the TUI process.

Traced with ``benchmarks/tui_latency.py``: a key waits when the event loop
shares the GIL with the thread that renders a preview, when it is compositing
a band of a frame, and when a garbage collection runs (100-250 ms for a full
one). So:

- ``KeyGate``: closed for a moment from when the input thread reads a key,
  while the event loop paints it; the preview thread waits at the gate
  between rows, and the preview widget holds back its next band.
- ``key_gated_driver``: the platform's driver, closing the gate on each key.
- ``QuietGC``: full collections only every 20 s, while no key is pressed (or
  at the latest after two minutes of typing); the young generations stay
  automatic (10-30 ms each; collecting them by hand less often cost more).
"""

from __future__ import annotations

import gc
import time

from textual import events
from textual.driver import Driver
from textual.message import Message

GC_TICK = 1.0  # seconds between checks for a due full collection
FULL_GC_INTERVAL = 20.0  # seconds between full collections, run when no key was pressed for
FULL_GC_QUIET = 2.0  # this long, or at the latest after
FULL_GC_LONGEST = 120.0  # seconds
TYPING_QUIET = 0.4  # seconds after a key press during which preview images wait (typing goes first)
TYPING_RECENT = 3.0  # seconds after a key press during which live frames and progress are redrawn at most
TYPING_REDRAW_INTERVAL = 1.0  # once a second (else 4 times): a key landing on such a repaint waits for it
KEY_PRIORITY = 0.05  # seconds after a key during which previews wait (a key paints in 10-35 ms here)


class KeyGate:
    """Closed for ``KEY_PRIORITY`` seconds after each key: the event loop's time to paint it.

    A deadline rather than "until painted": Textual gives no signal for when a key's repaint
    has been written, and callbacks after refresh can run before the widget has repainted.
    """

    def __init__(self) -> None:
        self._until = 0.0

    def close(self) -> None:
        self._until = time.monotonic() + KEY_PRIORITY

    def remaining(self) -> float:
        """Seconds until the gate opens (0 when open)."""
        return max(0.0, self._until - time.monotonic())

    def wait(self) -> None:
        """Block (a background thread) until the gate opens."""
        while (left := self.remaining()) > 0:
            time.sleep(left)


def key_gated_driver(base: type[Driver], gate: KeyGate) -> type[Driver]:
    """``base`` with its input thread closing ``gate`` as soon as a key is read."""

    class KeyGatedDriver(base):  # type: ignore[valid-type, misc]
        def process_message(self, message: Message) -> None:
            if isinstance(message, events.Key):
                gate.close()
            super().process_message(message)

    return KeyGatedDriver


class QuietGC:
    """Young generations collected automatically; full collections only by :meth:`tick`, without typing."""

    def __init__(self) -> None:
        self._threshold = gc.get_threshold()
        gc.set_threshold(self._threshold[0], self._threshold[1], 1_000_000)
        gc.freeze()  # the objects made at startup live as long as the app: never scan them again
        self._last = time.monotonic()

    def tick(self, last_key: float) -> None:
        """Run a full collection when one is due; call every ``GC_TICK`` seconds."""
        now = time.monotonic()
        since = now - self._last
        if since >= FULL_GC_LONGEST or (since >= FULL_GC_INTERVAL and now - last_key >= FULL_GC_QUIET):
            gc.collect()
            self._last = now

    def stop(self) -> None:
        gc.unfreeze()
        gc.set_threshold(*self._threshold)
