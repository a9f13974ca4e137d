"""A uvicorn server whose first SIGTERM drains running requests instead of closing at once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the socket at once."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], idle: Callable[[], bool],
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._idle = idle
        self._drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and not self.should_exit:
            self._draining = True
            self._drain()
            threading.Thread(target=self._wait_idle, name="moepager-drain", daemon=True).start()
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it after a clean exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.should_exit = True
