"""Stacks of a locust process on request, for a run that hangs.

A hang under gevent shows as the hub's loop in faulthandler's dump; the frame that blocks is in a
greenlet. So: SIGUSR1 -> faulthandler (every OS thread, also when C code holds the interpreter),
SIGUSR2 -> every greenlet's stack (gevent.util.format_run_info), both to stderr (locust.log).
``ctlesion loadtest`` sends both before it kills a run past its budget.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

THREAD_SIGNAL = signal.SIGUSR1
GREENLET_SIGNAL = signal.SIGUSR2


def _write_greenlets() -> None:
    from gevent.util import format_run_info

    sys.stderr.write("greenlet stacks:\n" + "\n".join(format_run_info()) + "\n")
    sys.stderr.flush()


def install() -> None:
    """Call once in the locustfile, after gevent is imported."""
    import gevent

    faulthandler.register(THREAD_SIGNAL, all_threads=True)
    gevent.signal_handler(GREENLET_SIGNAL, _write_greenlets)
