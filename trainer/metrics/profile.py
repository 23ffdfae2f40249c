"""A profiler window (``profile.steps=[first,last]``): ``torch.profiler`` records those optimizer steps.

Writes under ``<run.dir>/profile/``:

- ``rank-N.trace.json``, each recording rank's Chrome trace (Perfetto, ``chrome://tracing``), with a track of
  its own, "trainer: steps and phases", that shows each step and its phases on the profiler's clock;
- ``rank-N.ops.txt``, the top operators by self time (CPU time; on GPUs, device time);
- ``phases.json`` (rank zero, every recording rank's figures gathered): seconds per step in each phase.

A step is numbered as in metrics.csv: step N is the N-th optimizer step, from the end of step N-1 to its own
end. Lightning's hooks cut it into ``forward`` (batch start to before backward), ``backward`` (to after
backward) and ``optimizer`` (before the optimizer step to the batch's end: clipping, the update, the LR
schedule); of the time between steps, ``data_wait`` is what the trace shows inside torch's DataLoader
(``enumerate(DataLoader)#...``), and ``other`` is the rest (logging, a save, a validation, the gap after backward
in a micro-batch that accumulates). The phases add up to the step's time. On GPUs the device is synchronised at
each boundary, inside the window only, so a phase holds its kernels' time. Collectives (the trace's
nccl/gloo/all_reduce/... events) overlap backward under DDP and FSDP: they are a figure of their own (the time
per step during which one was in flight), not a phase.

Every rank gets the callback (the end of the window gathers the figures, a collective); only the chosen ranks
record. It is added only when ``profile.steps`` is set: off, the run does not have it at all. A window is
recorded once: a run that continues after it, or after the part of it that a run ending inside it wrote, records
nothing. A run stopped inside it (preempted, failed) writes nothing, and when resumed records the steps left.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from trainer import rundir
from trainer.config.schema import ProfileConfig
from trainer.files import atomic_write_text, read_json
from trainer.namespace import pl

log = logging.getLogger("trainer")

PHASES = ("data_wait", "forward", "backward", "optimizer", "other")
"""The phases of a step, in order; they add up to the step's time."""
COLLECTIVE = re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast", re.IGNORECASE)
"""Trace events that are collectives (NCCL kernels, gloo and c10d operators)."""
OPS_ROWS = 30
TRACK = "trainer: steps and phases"
_CLOCK_MARK = "trainer: clock"  # a zero-length event that ties perf_counter to the trace's clock


def profile_callbacks(config: ProfileConfig, out_dir: Path, accelerator: str) -> list[pl.Callback]:
    """The profiler window's callback, or nothing at all when ``profile.steps`` is not set."""
    return [StepProfiler(config, out_dir, accelerator)] if config.steps is not None else []


class StepProfiler(pl.Callback):
    def __init__(self, config: ProfileConfig, out_dir: Path, accelerator: str) -> None:
        assert config.steps is not None
        self.first, self.last = config.steps
        self.config, self.out_dir, self.cuda = config, Path(out_dir), accelerator == "gpu"
        self.recording = False  # this rank is one of profile.ranks
        self.in_window = False  # every rank: the window is open (its end is a collective)
        self.done = False
        self._profiler: Any = None
        self._clock = 0.0  # perf_counter at the clock mark
        self._step = 0  # optimizer steps completed before the current one
        self._step_start = 0.0
        self._phase: str | None = None  # the hook phase now running, since _since
        self._since = 0.0
        self._spans: list[tuple[str, float, float]] = []  # (hook phase, start, end), perf_counter seconds
        self._steps: list[tuple[int, float, float]] = []  # (step, start, end) of each recorded step

    # -------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recording = trainer.global_rank in self.config.ranks
        done, window = trainer.global_step, f"profile.steps=[{self.first},{self.last}]"
        # A window is recorded once: an earlier attempt that wrote it (or the part it reached) keeps its files.
        earlier = (read_json(self.out_dir / rundir.PHASES_FILE) or {}).get("window") == [
            self.first,
            self.last,
        ]
        if trainer.strategy.broadcast(earlier or done >= self.last, src=0):  # every rank decides alike
            self.done = True
            if trainer.is_global_zero and done >= self.first - 1:
                why = f"the window was recorded before ({self.out_dir})" if earlier else "past the window"
                log.info("%s: the run continues at step %d, %s; nothing is recorded", window, done, why)
            return
        if 0 < trainer.max_steps < self.first and trainer.is_global_zero:
            log.warning("%s: the run ends at step %d (trainer.max_steps); nothing is recorded", window,
                        trainer.max_steps)  # fmt: skip
        if done >= self.first and trainer.is_global_zero:
            log.info("%s: the run resumed at step %d; %s recorded", window, done, _steps(done + 1, self.last))
        if done >= self.first - 1:
            self._open(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._switch("forward")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._switch("backward")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch("gap")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._switch("optimizer")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now = self._switch("between")
        if trainer.global_step == self._step:
            return  # a micro-batch that accumulates: the step goes on
        if self.in_window:
            self._steps.append((trainer.global_step, self._step_start, now))
            self._step, self._step_start = trainer.global_step, now
            if trainer.global_step >= self.last:
                self._close(trainer)
        elif not self.done and trainer.global_step >= self.first - 1:
            self._open(trainer)  # the window's first step begins now, with its wait for the batch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_window:  # the run ended inside the window: what was recorded is kept
            self._close(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._profiler is not None:  # nothing is written: a resumed run records the window's rest
            self._profiler.stop()
            self._profiler = None
        self.in_window = False

    # -------------------------------------------------------------------------------------------- window

    def _open(self, trainer: pl.Trainer) -> None:
        self.in_window, self._step, self._steps, self._spans = True, trainer.global_step, [], []
        if self.recording:
            import torch
            from torch.profiler import ProfilerActivity, profile, record_function

            os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own start/stop lines on stderr
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profiler = profile(
                activities=activities,
                record_shapes=self.config.record_shapes,
                profile_memory=self.config.memory,
                with_stack=self.config.with_stack,
            )
            self._profiler.start()
            with record_function(_CLOCK_MARK):
                self._clock = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
        self._step_start = self._since = time.perf_counter()
        self._phase = "between"

    def _switch(self, phase: str) -> float:
        """End the hook phase now running and begin ``phase``; returns the time of the boundary."""
        if self._profiler is None:
            return 0.0
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._phase is not None:
            self._spans.append((self._phase, self._since, now))
        self._phase, self._since = phase, now
        return now

    def _close(self, trainer: pl.Trainer) -> None:
        self.in_window, self.done = False, True
        mine = self._write(trainer.global_rank) if self._profiler is not None else None
        figures = [mine]
        if trainer.world_size > 1:
            import torch.distributed as dist

            figures = [None] * trainer.world_size
            dist.all_gather_object(figures, mine)
        if not trainer.is_global_zero:
            return
        ranks = {str(rank): f for rank, f in enumerate(figures) if f is not None}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        phases = {"window": [self.first, self.last], "phases": list(PHASES), "device": "gpu" if self.cuda else "cpu",
                  "ranks": ranks}  # fmt: skip
        atomic_write_text(self.out_dir / rundir.PHASES_FILE, json.dumps(phases, indent=1) + "\n")
        if ranks:
            steps = next(iter(ranks.values()))["steps"]
            log.info("profiled %s on rank(s) %s into %s (trainer report %s draws where the time goes)",
                     _steps(*steps), ",".join(ranks), self.out_dir, self.out_dir.parent)  # fmt: skip

    def _write(self, rank: int) -> dict | None:
        """Stop recording; write this rank's trace and operator table; return its figures for phases.json."""
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        if not self._steps:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace_path = self.out_dir / f"rank-{rank}.trace.json"
        raw = trace_path.with_name(f".{trace_path.name}.raw")
        profiler.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        raw.unlink()
        events = trace["traceEvents"]
        mark = next((e for e in events if e.get("name") == _CLOCK_MARK), None)
        offset_us = float(mark["ts"]) - self._clock * 1e6 if mark else None
        per_step = self._phases(events, offset_us)
        if mark is not None:
            _add_track(
                events, mark, offset_us, self._spans + [(f"step {n}", a, b) for n, a, b in self._steps]
            )
        atomic_write_text(trace_path, json.dumps(trace))
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = profiler.key_averages(group_by_input_shape=self.config.record_shapes).table(
            sort_by=sort_by, row_limit=OPS_ROWS
        )
        first, last = self._steps[0][0], self._steps[-1][0]
        head = f"rank {rank}, steps {first}-{last}: the top {OPS_ROWS} operators by {sort_by}\n"
        atomic_write_text(self.out_dir / f"rank-{rank}.ops.txt", head + table + "\n")
        n = len(per_step)
        window_s = self._steps[-1][2] - self._steps[0][1]
        return {
            "steps": [first, last],
            "step_s": window_s / n,
            "phases_s": {phase: sum(s[phase] for s in per_step) / n for phase in PHASES},
            "collectives_s": _union_us(_named(events, COLLECTIVE)) / 1e6 / n,
            "per_step": per_step,
            "trace": trace_path.name,
            "ops": f"rank-{rank}.ops.txt",
        }

    def _phases(self, events: list[dict], offset_us: float | None) -> list[dict]:
        """Each recorded step's seconds per phase. The time between steps is ``data_wait`` where the trace
        shows the DataLoader being asked for a batch, and ``other`` for the rest (logging, saves, validation)."""
        loader = [] if offset_us is None else [
            ((a - offset_us) / 1e6, (b - offset_us) / 1e6) for a, b in _merged(_named(events, _LOADER))
        ]  # fmt: skip
        out = []
        for step, start, end in self._steps:
            spans = [(name, a, b) for name, a, b in self._spans if start <= a and b <= end]
            seconds = {phase: sum(b - a for name, a, b in spans if name == phase) for phase in PHASES}
            between = [(a, b) for name, a, b in spans if name == "between"]
            wait = sum(max(0.0, min(b, d) - max(a, c)) for a, b in between for c, d in loader)
            seconds["data_wait"] = wait
            seconds["other"] = sum(b - a for name, a, b in spans if name in ("between", "gap")) - wait
            out.append({"step": step, "step_s": end - start, **seconds})
        return out


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


_LOADER = re.compile(r"^enumerate\(DataLoader\)")  # torch's own range around each DataLoader.__next__


def _named(events: list[dict], pattern: re.Pattern) -> list[tuple[float, float]]:
    """(start, end) in the trace's microseconds of the complete events whose name matches ``pattern``."""
    return [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and pattern.search(str(e.get("name", "")))
    ]


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``spans`` as disjoint, sorted spans (nested and concurrent ones count once)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _union_us(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merged(spans))


def _add_track(
    events: list[dict], mark: dict, offset_us: float, spans: list[tuple[str, float, float]]
) -> None:
    """The steps and their hook phases as a track of their own in the trace. They cannot be record_function
    ranges: they cross the operators' nesting (the forward pass runs inside ``Optimizer.step``)."""
    pid = mark["pid"]
    tid = 1 + max(
        (e["tid"] for e in events if isinstance(e.get("tid"), int)), default=0
    )  # the OS's are taken
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": TRACK}})
    events.append(
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": -1}}
    )
    for name, start, end in spans:
        events.append({"ph": "X", "cat": "trainer", "name": name, "pid": pid, "tid": tid,
                       "ts": start * 1e6 + offset_us, "dur": (end - start) * 1e6})  # fmt: skip
