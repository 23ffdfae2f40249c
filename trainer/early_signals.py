"""Preemption signals that arrive while a training process is still starting (importing torch and Lightning
takes seconds): remembered instead of ending the process, and delivered again once the real handlers are in
place (the checkpointer's, or the local launcher's, which forwards them to its workers).

Without it a SIGUSR1 or SIGTERM in the first seconds of a SLURM task (a requeue storm, a preemption right
after a start) killed the task with the signal's default action (exit 138 or 143): not requeued, the trial
lost. Imports nothing heavy on purpose: ``trainer.cli`` installs it before anything else of ``train``.
"""

from __future__ import annotations

import os
import signal

CAUGHT = (signal.SIGUSR1, signal.SIGTERM)
_pending: list[int] = []


def _remember(signum: int, frame: object) -> None:
    _pending.append(signum)


def catch() -> None:
    """From now on the preemption signals are remembered (see ``redeliver``)."""
    for signum in CAUGHT:
        signal.signal(signum, _remember)
        signal.siginterrupt(signum, False)


def redeliver() -> None:
    """Send a signal remembered so far to this process again, now that real handlers are installed (a
    signal without one gets its default action, as it would have without ``catch``)."""
    for signum in CAUGHT:
        if signal.getsignal(signum) is _remember:
            signal.signal(signum, signal.SIG_DFL)
    pending = sorted(set(_pending))
    _pending.clear()
    for signum in pending:
        os.kill(os.getpid(), signum)


def ignore() -> None:
    """From now on the preemption signals are ignored: for a training process on its way out, whose work is
    saved (or failed, and says so). Python sets the handlers it installed back to the default action while
    the interpreter shuts down, and Slurm repeats a signal a busy step did not take: a run that had saved and
    printed "exit 75" was then killed by the repeat (exit 138: not requeued, its trial lost). Only a handler
    of SIG_IGN survives the shutdown. (Lightning's teardown restores every handler it found before training,
    so this cannot be done any earlier than after training.)"""
    for signum in CAUGHT:
        signal.signal(signum, signal.SIG_IGN)
