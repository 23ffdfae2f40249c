"""The exit codes of ``trainer`` commands, defined once (README: "Exit codes").

A signal that kills a worker N is reported as 128 + N, as shells do.
"""

OK = 0
"""Success (also: the run had already finished; nothing to do)."""
FAILED = 1
"""Training raised an error (its traceback is printed)."""
CONFIG = 2
"""Bad configuration or usage; nothing was started or written."""
NONFINITE = 3
"""Stopped on a non-finite loss; the last good state is saved."""
PREEMPTED = 75
"""Stopped by a preemption signal after saving a checkpoint: run the same command again to continue
(EX_TEMPFAIL of sysexits.h: a temporary failure, try again). A sweep interrupted by a signal exits with it too."""
