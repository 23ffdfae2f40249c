"""Device telemetry: the sampler thread (NVML replaced by a fake module with fixed figures, since no GPU is
here), energy, the columns and their place in metrics.csv across a resume, and a straggler named in a real
2-process DDP run where one rank is slower."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, clean_env, read_metrics

from trainer.fit import print_summary
from trainer.metrics.csv_logger import CSVMetricsLogger
from trainer.metrics.names import GPU_FIELDS, module_metrics
from trainer.metrics.telemetry import Sampler, find_straggler, gpu_columns, gpu_vector
from trainer.metrics.throughput import ThroughputMonitor


class FakeNVML(types.ModuleType):
    """``pynvml`` with fixed figures; records the threads that call it."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    class NVMLError(Exception):
        pass

    def __init__(self, energy_counter: bool = True) -> None:
        super().__init__("pynvml")
        self.threads: set[int] = set()
        self.energy_counter = energy_counter
        self.energy_mj = 5_000_000
        self.power_mw = 350_000
        self.index: int | None = None

    def _call(self) -> None:
        self.threads.add(threading.get_ident())

    def nvmlInit(self) -> None:
        self._call()

    def nvmlShutdown(self) -> None:
        self._call()

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call()
        self.index = index
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace:
        self._call()
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: str) -> SimpleNamespace:
        self._call()
        return SimpleNamespace(used=30e9, total=80e9, free=50e9)

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        self._call()
        return self.power_mw

    def nvmlDeviceGetTemperature(self, h: str, kind: int) -> int:
        self._call()
        return 61

    def nvmlDeviceGetClockInfo(self, h: str, kind: int) -> int:
        self._call()
        return 1755

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int:
        self._call()
        return 0x4 | 0x40  # power cap (routine) and hardware thermal slowdown

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        self._call()
        if not self.energy_counter:
            raise self.NVMLError("Not Supported")
        self.energy_mj += 3_600_000  # 1 Wh between two readings
        return self.energy_mj


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # torch's CUDA_VISIBLE_DEVICES mapping; here it says "torch's device 0 is NVML's device 2"
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda index: index + 2, raising=False)
    return fake


@pytest.mark.unit
def test_sampler_thread_reads_every_gpu_figure_and_the_training_thread_never_calls_nvml(fake_nvml):
    sampler = Sampler(0.01, cuda_index=0, host=True)
    sampler.start()
    deadline = time.monotonic() + 10
    while sampler.latest()[1].get("energy_wh", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    host, gpu = sampler.latest()
    assert fake_nvml.threads and threading.get_ident() not in fake_nvml.threads
    assert fake_nvml.threads == {sampler._thread.ident}
    assert fake_nvml.index == 2
    assert set(gpu) == set(GPU_FIELDS)
    assert gpu["energy_wh"] >= 3 and gpu["energy_wh"] == int(gpu["energy_wh"])  # the counter, in Wh
    assert {k: v for k, v in gpu.items() if k != "energy_wh"} == {
        "util": 87.0, "mem_used_gb": 30.0, "mem_total_gb": 80.0, "power_w": 350.0, "temp_c": 61.0,
        "sm_clock_mhz": 1755.0, "throttle": 0x44,
    }  # fmt: skip
    assert host["sys/rss_gb"] > 0 and host["sys/cpu_util"] >= 0
    assert 0 < sampler.cpu_s < 10


@pytest.mark.unit
def test_energy_is_power_integrated_over_time_where_the_gpu_has_no_counter(fake_nvml):
    fake_nvml.energy_counter = False
    sampler = Sampler(1.0, cuda_index=0, host=False)
    sampler._open()
    assert sampler.sample(0.0)[1]["energy_wh"] == 0.0
    assert sampler.sample(3600.0)[1]["energy_wh"] == pytest.approx(350.0)  # 350 W for an hour
    fake_nvml.power_mw = 450_000
    assert sampler.sample(7200.0)[1]["energy_wh"] == pytest.approx(350.0 + 400.0)  # trapezoid 350 -> 450 W


@pytest.mark.unit
def test_without_nvml_the_host_figures_still_come(monkeypatch, caplog):
    broken = FakeNVML()

    def no_library() -> None:
        raise broken.NVMLError("NVML Shared Library Not Found")

    broken.nvmlInit = no_library  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    sampler = Sampler(0.05, cuda_index=0, host=True)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        sampler.start()
        sampler.stop()
    host, gpu = sampler.latest()
    assert gpu == {} and "sys/rss_gb" in host
    assert "no figures for GPU 0 (NVML: NVML Shared Library Not Found)" in caplog.text


@pytest.mark.unit
def test_rank_zero_row_gets_every_rank_gpu_energy_and_slowdowns_once(caplog):
    monitor = ThroughputMonitor(10, "gpu", "bf16-mixed", telemetry_interval_s=1.0)
    monitor.trained_samples = 1000
    model = SimpleNamespace(tokens_per_sample=lambda: 500)  # a model that counts tokens
    ranks = [gpu_vector({"util": 90.0, "energy_wh": 1.5}), gpu_vector({"power_w": 300.0, "energy_wh": 2.5})]
    ranks[1][GPU_FIELDS.index("throttle")] = 0x40
    row: dict = {}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        monitor._telemetry(row, ranks, model, world=2)
        monitor._telemetry({}, ranks, model, world=2)
    assert row == {"gpu0/util": 90.0, "gpu0/energy_wh": 1.5, "gpu1/power_w": 300.0, "gpu1/throttle": 64.0,
                   "gpu1/energy_wh": 2.5}  # fmt: skip
    assert caplog.text.count("gpu1 (rank 1) is slowing its clocks: thermal slowdown (hardware)") == 1
    summary = monitor.energy_summary()  # 4 Wh over 1000 samples x 2 ranks x 500 tokens = 1M tokens
    assert summary == {"energy_wh": 4.0, "energy_wh_per_million_tokens": pytest.approx(4.0)}
    assert gpu_columns([gpu_vector({})]) == {}


@pytest.mark.unit
def test_straggler_is_the_rank_that_holds_the_others_up_beyond_the_margin():
    assert find_straggler([0.002, 0.052], step_s=0.06) == (1, 0.052, pytest.approx(0.027))
    assert find_straggler([0.002, 0.004, 0.003, 0.005], step_s=0.06) is None  # noise, not a straggler
    assert find_straggler([0.010], step_s=0.06) is None
    assert find_straggler([float("nan"), 0.05], step_s=0.06) is None


@pytest.mark.unit
def test_a_straggler_is_named_once_after_two_slow_windows_and_a_single_slow_window_never(caplog):
    monitor = ThroughputMonitor(10, "cpu", "32")
    slow, even = [0.002, 0.052], [0.002, 0.003]
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for window in (slow, even, slow, slow, slow, even, slow, slow):
            monitor._name_straggler(window, step_s=0.06)
    named = [r.getMessage() for r in caplog.records]
    assert len(named) == 2 and all(m.startswith("straggler: rank 1 spends 52.0 ms") for m in named)


@pytest.mark.unit
def test_off_switch_starts_no_sampler():
    trainer = SimpleNamespace(loggers=[], global_step=0, world_size=1, is_global_zero=True)
    module = SimpleNamespace(device=torch.device("cpu"))
    for interval, sampling in ((None, False), (0.0, False), (0.5, True)):
        monitor = ThroughputMonitor(10, "cpu", "32", telemetry_interval_s=interval)
        monitor.on_train_start(trainer, module)
        assert (monitor.sampler is not None) == sampling
        monitor.teardown(trainer, module, "fit")
        assert monitor.sampler is None


@pytest.mark.unit
def test_summary_names_energy_only_where_it_was_measured(capsys):
    base = {"steps": 10, "world_size": 1, "wall_time_s": 1.0, "train_loss": 1.0, "validation": {},
            "samples_per_sec": 100.0, "tokens_per_sec": 3200.0, "log_every_n_steps": 5, "mfu": None,
            "data_wait_frac": None, "run_dir": "runs/x", "metrics": "/nonexistent", "checkpoint": "/nonexistent"}  # fmt: skip
    print_summary({**base, "energy_wh": None, "energy_wh_per_million_tokens": None})
    assert "energy" not in capsys.readouterr().out
    print_summary({**base, "energy_wh": 41.25, "energy_wh_per_million_tokens": 3.5})
    line = next(x for x in capsys.readouterr().out.splitlines() if "energy" in x)
    assert line == "  energy      41.25 Wh (all GPUs, to the last logged step)   3.500 Wh per million tokens"


@pytest.mark.unit
def test_a_module_metric_named_like_a_telemetry_column_is_moved_aside():
    out = module_metrics({"gpu3/power_w": 1.0, "sys/cpu_util": 2.0, "sys/other": 3.0})
    assert out == {"module/gpu3/power_w": 1.0, "module/sys/cpu_util": 2.0, "sys/other": 3.0}


@pytest.mark.unit
def test_metrics_csv_written_before_telemetry_resumes_exactly(tmp_path):
    path = tmp_path / "metrics.csv"
    old = CSVMetricsLogger(path)
    for step in (1, 2, 3, 4):  # a run of an older version: no sys/* columns; stopped after step 4's row
        old.log_trainer_metrics({"step": step, "train/loss": 10.0 - step}, step)
    old.finalize("success")
    new = CSVMetricsLogger(path)
    new.resume_at(2)  # the checkpoint was at step 2
    for step in (3, 4, 5):
        new.log_trainer_metrics({"step": step, "train/loss": 20.0 - step, "sys/cpu_util": 50.0 + step}, step)
    new.finalize("success")
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["train/loss"] for r in rows] == ["9.0", "8.0", "17.0", "16.0", "15.0"]
    assert [r["sys/cpu_util"] for r in rows] == ["", "", "53.0", "54.0", "55.0"]
    again = CSVMetricsLogger(path)
    again.resume_at(4)
    again.log_trainer_metrics({"step": 5, "train/loss": 1.0, "sys/cpu_util": 1.0}, 5)
    again.finalize("success")
    assert [(r["step"], r["train/loss"]) for r in csv.DictReader(path.open())][-2:] == [
        ("4", "16.0"),
        ("5", "1.0"),
    ]


SLOW_RANK = '''
import os
import time

from trainer.models.mlp import MLPModule


class SlowRankMLP(MLPModule):
    """The built-in MLP, whose rank ``slow_rank`` sleeps ``slow_s`` in every training step."""

    def __init__(self, slow_rank: int = 1, slow_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.slow_rank, self.slow_s = slow_rank, slow_s

    def training_step(self, batch, batch_idx):
        if int(os.environ.get("RANK", 0)) == self.slow_rank:
            time.sleep(self.slow_s)
        return super().training_step(batch, batch_idx)
'''


@pytest.mark.distributed
def test_ddp_names_the_slow_rank_and_writes_rank_zero_telemetry(tmp_path: Path):
    (tmp_path / "slowrank.py").write_text(SLOW_RANK)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    faulty = (REPO / "tests" / "helpers" / "conf" / "model" / "faulty.yaml").read_text().splitlines()
    kept = [
        line for line in faulty if line.split(":")[0] in ("in_features", "hidden", "num_classes", "dropout")
    ]
    (conf / "slowrank.yaml").write_text("\n".join(["_target_: slowrank.SlowRankMLP", *kept, "slow_s: 0.05"]))
    env = clean_env(tmp_path, PYTHONPATH=str(tmp_path))
    args = ["--config-dir", str(tmp_path / "conf"), "model=slowrank", "data=digits", "trainer.accelerator=cpu",
            "strategy=ddp", "trainer.devices=2", "trainer.max_steps=30", "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_steps=0", "logger.telemetry_interval_s=0.2", "run.name=slow"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    named = [line for line in out.splitlines() if "straggler:" in line]
    assert len(named) == 1 and "straggler: rank 1 spends" in named[0], out  # named once, while it stays slow
    rows = read_metrics(tmp_path / "runs" / "slow")
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all(float(r["sys/rss_gb"]) > 0 and float(r["sys/cpu_util"]) >= 0 for r in rows)
    assert not any(key.startswith("gpu") for key in rows[0])
    assert "energy" not in proc.stdout  # a CPU reports no power: no energy line rather than a guess
