"""The lifecycle every destination worker shares: one daemon thread that waits to be woken and stops
on request, finishing what it has in hand (the C-STORE forwarder and the workers of other kinds)."""

from __future__ import annotations

import threading


class Background:
    """A thread running `self._run` until `request_stop`; `wake` says new work was queued."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New work was queued."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the work in hand, then stop (the rest stays queued for the next start)."""
        self.request_stop()
        self.join(timeout)

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:  # never started (the node failed to start): nothing to join
            self._thread.join(timeout)
