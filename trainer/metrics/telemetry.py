"""Device telemetry, sampled off the training thread, and the per-rank time that names a straggler.

- Each rank that has something to report (rank zero for its process; every rank on a GPU for its own device)
  runs one daemon thread, :class:`Sampler`, that reads psutil and NVML every ``interval_s`` and keeps only the
  newest figures and an energy total. psutil and NVML are never called on the training thread: at a logged
  step it takes a copy of the newest sample (a lock held for a dict copy), never waiting for a reading.
- Columns: ``sys/cpu_util`` (rank zero's process, not its data-loader workers: percent of one core, so 400 is
  four busy cores) and ``sys/rss_gb`` (its resident memory now); per GPU, ``gpu<i>/<field>`` for each of
  ``GPU_FIELDS`` (``trainer/metrics/names.py`` names every column), ``<i>`` being the rank that drives the
  device. They reach rank zero inside the throughput monitor's one all_gather on logged steps.
- Energy: NVML's total-energy counter (millijoules, Volta and newer) read against its value at start; a GPU
  without the counter has its power integrated over time between samples (trapezoids). psutil gives no power,
  so a CPU run has no energy figure rather than an invented one.
- Straggler: each rank's own time per step (:class:`OwnTime`) is compared on logged steps; the step time itself
  cannot show a slow rank, since every rank waits for the slowest at the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from typing import Any

import torch

from trainer.metrics.names import GPU_FIELDS

log = logging.getLogger("trainer")

STRAGGLER_MARGIN = 0.20
"""A rank is named a straggler when its own time per step exceeds the median rank's by more than this
fraction of the step time, i.e. when the others wait for it more than a fifth of each step. Relative to the
step, not to the own times: those are a small part of a step, and their noise would otherwise be named."""

SLOWDOWNS = {
    0x08: "hardware slowdown",
    0x20: "thermal slowdown (software)",
    0x40: "thermal slowdown (hardware)",
    0x80: "power brake",
}
"""The clock-event reasons (``nvmlClocksEventReason*``) that mean the hardware is unwell, named once in the
log when they appear. The others are routine: idle (0x1), application clocks (0x2), the power cap (0x4, a GPU
at full load), sync boost (0x10), display clocks (0x100)."""


def slowdown_text(mask: int) -> str:
    """The worrying reasons in a clock-event bitmask, in words (empty when there are none)."""
    return ", ".join(text for bit, text in SLOWDOWNS.items() if mask & bit)


class Sampler:
    """A daemon thread sampling this process (``host``) and one CUDA device (``cuda_index``) every
    ``interval_s``. ``latest()`` returns copies of the newest host and GPU figures; ``cpu_s`` is the thread's
    own CPU time so far (what sampling costs)."""

    def __init__(self, interval_s: float, cuda_index: int | None = None, host: bool = True) -> None:
        self.interval_s, self.cuda_index, self.host = interval_s, cuda_index, host
        self.cpu_s = 0.0
        self._lock = threading.Lock()
        self._host: dict[str, float] = {}
        self._gpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-telemetry", daemon=True)
        # Only the sampling thread touches what follows.
        self._process: Any = None
        self._cpu_prev: tuple[float, float] | None = None  # (wall, cpu seconds) of the previous sample
        self._nvml: Any = None
        self._handle: Any = None
        self._unsupported: set[str] = set()
        self._energy_start_mj: int | None = None
        self._energy_j = 0.0
        self._power_prev: tuple[float, float] | None = None  # (time, watts) of the previous sample

    def start(self, wait_s: float = 5.0) -> None:
        """Start sampling; wait (once) for the first sample so the first logged row has every column."""
        self._thread.start()
        self._first.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)

    def latest(self) -> tuple[dict[str, float], dict[str, float]]:
        """The newest host figures (``sys/*`` keys) and GPU figures (:data:`GPU_FIELDS` keys)."""
        with self._lock:
            return dict(self._host), dict(self._gpu)

    def _run(self) -> None:
        started = time.thread_time()
        try:
            self._open()
            while True:
                host, gpu = self.sample(time.monotonic())
                with self._lock:
                    self._host, self._gpu = host, gpu
                self._first.set()
                self.cpu_s = time.thread_time() - started
                if self._stop.wait(self.interval_s):
                    break
        except Exception as err:  # telemetry never stops training: the columns simply end
            log.warning("telemetry: sampling stopped (%s: %s)", type(err).__name__, err)
        finally:
            self._first.set()
            if self._nvml is not None:
                with contextlib.suppress(Exception):  # NVML counts inits: this one only is undone
                    self._nvml.nvmlShutdown()

    def _open(self) -> None:
        if self.host:
            import psutil

            self._process = psutil.Process()
            # The first figure is the average since the process started; later ones cover one interval.
            age = time.time() - self._process.create_time()
            self._cpu_prev = (time.monotonic() - age, 0.0)
        if self.cuda_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(self.cuda_index))
        except Exception as err:  # no driver, no library: the host figures still come
            log.warning("telemetry: no figures for GPU %d (NVML: %s)", self.cuda_index, err)
            self._handle = None
            return
        try:
            self._energy_start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:  # older than Volta: power is integrated instead
            self._energy_start_mj = None

    def sample(self, now: float) -> tuple[dict[str, float], dict[str, float]]:
        """One reading at monotonic time ``now``."""
        host: dict[str, float] = {}
        if self._process is not None:
            times = self._process.cpu_times()
            used = times.user + times.system
            if self._cpu_prev is not None and now > self._cpu_prev[0]:
                host["sys/cpu_util"] = 100.0 * (used - self._cpu_prev[1]) / (now - self._cpu_prev[0])
            self._cpu_prev = (now, used)
            host["sys/rss_gb"] = self._process.memory_info().rss / 1e9
        return host, self._sample_gpu(now) if self._handle is not None else {}

    def _sample_gpu(self, now: float) -> dict[str, float]:
        nv, h = self._nvml, self._handle
        gpu: dict[str, float] = {}
        # "clocks event reasons" were "clocks throttle reasons" before NVML 12.2; old bindings have only those
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        reasons = reasons or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        readers = {
            "util": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "memory": lambda: nv.nvmlDeviceGetMemoryInfo(h),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # mW
            "temp_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "throttle": lambda: reasons(h),
        }
        for key, read in readers.items():
            if key in self._unsupported:
                continue
            try:
                value = read()
            except nv.NVMLError:  # this GPU does not report it: not asked again
                self._unsupported.add(key)
                continue
            if key == "memory":
                gpu["mem_used_gb"], gpu["mem_total_gb"] = value.used / 1e9, value.total / 1e9
            else:
                gpu[key] = float(value)
        energy = self._energy_wh(now, gpu.get("power_w"))
        if energy is not None:
            gpu["energy_wh"] = energy
        return gpu

    def _energy_wh(self, now: float, power_w: float | None) -> float | None:
        if self._energy_start_mj is not None:
            try:
                return (
                    self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._energy_start_mj
                ) / 3.6e6
            except self._nvml.NVMLError:
                self._energy_start_mj = None  # fall back to integrating power from here on
        if power_w is None:
            return None
        if self._power_prev is not None:
            then, before = self._power_prev
            self._energy_j += (before + power_w) / 2 * (now - then)
        self._power_prev = (now, power_w)
        return self._energy_j / 3600.0


def _nvml_index(cuda_index: int) -> int:
    """NVML numbers every GPU of the machine; torch only the visible ones (``CUDA_VISIBLE_DEVICES``, by number
    or UUID). torch's own NVML readers (``torch.cuda.power_draw``) map one to the other with this helper."""
    mapping = getattr(torch.cuda, "_get_nvml_device_index", None)
    return mapping(cuda_index) if mapping is not None else cuda_index


def gpu_vector(gpu: dict[str, float]) -> list[float]:
    """A rank's GPU figures in :data:`GPU_FIELDS` order (NaN: not reported), the same length on every rank."""
    return [gpu.get(field, math.nan) for field in GPU_FIELDS]


def gpu_columns(per_rank: list[list[float]]) -> dict[str, float]:
    """The ``gpu<i>/*`` columns from every rank's :func:`gpu_vector` (rank ``i``'s device)."""
    return {
        f"gpu{rank}/{field}": value
        for rank, values in enumerate(per_rank)
        for field, value in zip(GPU_FIELDS, values, strict=True)
        if not math.isnan(value)
    }


class OwnTime:
    """This rank's own part of its steps, which the other ranks do not share: the data wait plus the forward
    pass, up to the backward where DDP's gradient all-reduce makes every rank wait for the slowest.

    - The wait right after a logged step is left out: rank zero writes the row while the others already wait
      in the next collective (the gradient all-reduce), which would make them look slow.
    - On a GPU the host only queues kernels, so the forward is timed by CUDA events, read once per window
      when the loss has already been synchronised.
    - Under FSDP the forward holds all-gathers, so there mainly a slow data wait shows.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._start: Any = None
        self._events: list[tuple[Any, Any]] = []
        self._after_log = False

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def waited(self, seconds: float) -> None:
        """The data wait before a batch."""
        if not self._after_log:
            self._seconds += seconds

    def forward_start(self) -> None:
        self._after_log = False
        self._start = self._mark()

    def forward_end(self) -> None:
        if self._start is None:
            return
        end = self._mark()
        if self.cuda:
            self._events.append((self._start, end))
        else:
            self._seconds += end - self._start
        self._start = None

    def take(self) -> float:
        """Own seconds since the last call (made at a logged step)."""
        seconds = self._seconds
        if self._events:
            self._events[-1][1].synchronize()
            seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0  # ms
        self._seconds, self._events, self._after_log = 0.0, [], True
        return seconds


def find_straggler(
    own_s: list[float], step_s: float, margin: float = STRAGGLER_MARGIN
) -> tuple[int, float, float] | None:
    """(rank, its own time, the median own time) of the slowest rank when it holds the others up by more than
    ``margin`` of the step time ``step_s``; else None."""
    if len(own_s) < 2 or not step_s > 0 or any(math.isnan(t) for t in own_s):
        return None
    median = statistics.median(own_s)
    rank = max(range(len(own_s)), key=own_s.__getitem__)
    return (rank, own_s[rank], median) if own_s[rank] - median > margin * step_s else None
