"""Stopping a sweep from outside, at once or after the epoch in progress:

- SIGTERM (a batch system's time limit, ``kill``) or SIGINT (Ctrl-C): at once. The trial in progress is marked
  interrupted and reruns from its last saved epoch; the tables are written.
- SIGUSR1: after the epoch in progress, once it is saved; a worker between trials starts none. The trial is marked
  interrupted as above, and its rerun loses nothing. ``--workers N`` passes the signal on to its workers, so
  ``kill -USR1 PID`` of the command is enough (as is ``pkill -USR1 -f continuum.sweep``).
"""

from __future__ import annotations

import signal
import threading

_EPOCH_STOP = threading.Event()


def stop_requested() -> bool:
    """Whether SIGUSR1 asked this process to stop after the epoch in progress."""
    return _EPOCH_STOP.is_set()


def wait_for_stop(seconds: float) -> bool:
    """Wait up to ``seconds``, returning at once (True) when SIGUSR1 asks for a stop, as :func:`stop_requested`.

    Args:
        seconds: the longest wait.
    """
    return _EPOCH_STOP.wait(seconds)


def install_stop_handlers() -> None:
    """Make SIGTERM stop the sweep as Ctrl-C does, SIGINT do so even where it was inherited ignored (a process
    started with ``&`` from a script ignores it, and Python then raises no ``KeyboardInterrupt``), and SIGUSR1 ask
    for a stop after the epoch in progress (:func:`stop_requested`). Only the main thread may set handlers: in
    another thread this does nothing."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def stop_after_epoch(signum: int, frame: object) -> None:
        _EPOCH_STOP.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if hasattr(signal, "SIGUSR1"):  # not on Windows
            signal.signal(signal.SIGUSR1, stop_after_epoch)
