"""The command-line options of sbatch and srun, and how their getopt_long reads a word.

The tables come from Slurm 22.05.8 (Debian 12's slurm-client): the long names and short letters that
``sbatch --help`` and ``srun --help`` print, plus the options the same binaries accept without listing them
(``--open-mode``, ``--tasks-per-node``, ``--cpu-bind``...), found by asking their getopt about each prefix
(``srun --o`` answers "ambiguous; possibilities: '--open-mode' '--output' ..."); whether a short letter
takes a value was asked the same way (``srun -l@`` is "invalid option -- '@'": ``-l`` takes none). They are
kept here rather than read from ``--help`` when submitting: login nodes run other Slurm versions, and
``--help`` leaves out options whose plugin is not configured there.

getopt_long reads ``--name=value`` and ``--name value``, where ``name`` may be any unambiguous prefix of a
long option (an exact match wins over the longer options it abbreviates), and bundles of short letters:
``-lu`` is ``-l -u``, and a letter that takes a value takes the rest of the word (``-c4``, ``-K0``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection


@dataclasses.dataclass(frozen=True)
class OptionTable:
    long: frozenset[str]
    short: dict[str, str]
    """A short letter -> the long option it stands for."""
    flags: str
    """The short letters that take no value (the rest of the word is more letters)."""


SBATCH = OptionTable(
    long=frozenset({
        "account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "cluster",
        "cluster-constraint", "clusters", "comment", "constraint", "container", "context", "contiguous",
        "core-spec", "cores-per-socket", "cpu-freq", "cpus-per-gpu", "cpus-per-task", "deadline",
        "delay-boot", "dependency", "distribution", "error", "exclude", "exclusive", "export",
        "export-file", "extra-node-info", "get-user-env", "gid", "gpu-bind", "gpu-freq", "gpus",
        "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "help", "hint", "hold",
        "ignore-pbs", "input", "job-name", "kill-on-invalid-dep", "licenses", "mail-type", "mail-user",
        "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus", "network", "nice",
        "no-kill", "no-requeue", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core",
        "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket", "ntasks-per-tres", "open-mode", "output",
        "overcommit", "oversubscribe", "parsable", "partition", "power", "prefer", "priority", "profile",
        "propagate", "qos", "quiet", "reboot", "requeue", "reservation", "signal", "sockets-per-node",
        "spread-job", "switches", "tasks-per-node", "test-only", "thread-spec", "threads-per-core", "time",
        "time-min", "tmp", "uid", "usage", "use-min-nodes", "verbose", "version", "wait", "wait-all-nodes",
        "wckey", "wrap"
    }),
    short={
        "A": "account", "B": "extra-node-info", "C": "constraint", "D": "chdir", "F": "nodefile", "G": "gpus",
        "H": "hold", "J": "job-name", "L": "licenses", "M": "clusters", "N": "nodes", "O": "overcommit",
        "Q": "quiet", "S": "core-spec", "V": "version", "W": "wait", "a": "array", "b": "begin",
        "c": "cpus-per-task", "d": "dependency", "e": "error", "h": "help", "i": "input", "k": "no-kill",
        "m": "distribution", "n": "ntasks", "o": "output", "p": "partition", "q": "qos", "s": "oversubscribe",
        "t": "time", "v": "verbose", "w": "nodelist", "x": "exclude",
    },
    flags="HOQVWhsv",
)  # fmt: skip

SRUN = OptionTable(
    long=frozenset({
        "accel-bind", "account", "acctg-freq", "bb", "bbf", "bcast", "bcast-exclude", "begin", "chdir",
        "cluster", "cluster-constraint", "clusters", "comment", "compress", "constraint", "container",
        "context", "contiguous", "core-spec", "cores-per-socket", "cpu-bind", "cpu-freq", "cpu_bind",
        "cpus-per-gpu", "cpus-per-task", "deadline", "debugger-test", "delay-boot", "dependency",
        "disable-status", "distribution", "epilog", "error", "exact", "exclude", "exclusive", "export",
        "extra-node-info", "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket",
        "gpus-per-task", "gres", "gres-flags", "help", "het-group", "hint", "hold", "immediate", "input",
        "interactive", "job-name", "jobid", "kill-on-bad-exit", "label", "licenses", "mail-type",
        "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus", "mpi",
        "msg-timeout", "multi-prog", "network", "nice", "no-allocate", "no-kill", "nodefile", "nodelist",
        "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket",
        "ntasks-per-tres", "open-mode", "output", "overcommit", "overlap", "oversubscribe", "pack-group",
        "partition", "power", "prefer", "preserve-env", "priority", "profile", "prolog", "propagate", "pty",
        "qos", "quiet", "quit-on-interrupt", "reboot", "relative", "reservation", "resv-ports", "send-libs",
        "signal", "slurmd-debug", "sockets-per-node", "spread-job", "switches", "task-epilog",
        "task-prolog", "tasks-per-node", "test-only", "thread-spec", "threads", "threads-per-core", "time",
        "time-min", "tmp", "uid", "unbuffered", "usage", "use-min-nodes", "verbose", "version", "wait",
        "wckey", "whole", "x11"
    }),
    short={
        "A": "account", "B": "extra-node-info", "C": "constraint", "D": "chdir", "E": "preserve-env",
        "F": "nodefile", "G": "gpus", "H": "hold", "I": "immediate", "J": "job-name", "K": "kill-on-bad-exit",
        "L": "licenses", "M": "clusters", "N": "nodes", "O": "overcommit", "Q": "quiet", "S": "core-spec",
        "T": "threads", "V": "version", "W": "wait", "X": "disable-status", "Z": "no-allocate", "b": "begin",
        "c": "cpus-per-task", "d": "dependency", "e": "error", "h": "help", "i": "input", "k": "no-kill",
        "l": "label", "m": "distribution", "n": "ntasks", "o": "output", "p": "partition", "q": "qos",
        "r": "relative", "s": "oversubscribe", "t": "time", "u": "unbuffered", "v": "verbose",
        "w": "nodelist", "x": "exclude",
    },
    flags="EHOQVXZhlsuv",
)  # fmt: skip


def reserved_option(word: str, table: OptionTable, reserved: Collection[str]) -> tuple[str, str] | None:
    """The option among ``reserved`` (long names) that ``word`` would set, as (its spelling in ``word``, its
    long name), or ``None``. An abbreviation is taken as the reserved option even where getopt would find it
    ambiguous (it then refuses the word itself), so no spelling of a reserved option gets through."""
    known = sorted(set(reserved) & table.long)
    if word.startswith("--"):
        name = word[2:].split("=", 1)[0]
        if name in table.long and name not in known:
            return None
        option = next((r for r in known if r.startswith(name)), None)
        return None if option is None else (f"--{option}", option)
    for letter in word[1:]:
        option = table.short.get(letter)
        if option is None:
            return None  # not an option: sbatch and srun stop with an error
        if option in known:
            return f"-{letter}", option
        if letter not in table.flags:
            return None  # the rest of the word is this option's value
    return None
