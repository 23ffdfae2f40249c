"""What the project's own callbacks cost a training step, in process on CPU:

- They read a value from the device to the host once per optimizer step, and never per micro-batch: on a GPU
  each such read makes the host wait for the queued kernels (a bubble). Counted on CPU, where the same calls
  are made: every `.item()`, `.tolist()`, `bool()`, `float()` and `int()` of a tensor whose caller is the
  project's own code (`trainer/`), between steps that log nothing.
- Work done at a batch's end (a checkpoint save, a user's callback) counts in the step's time, not as data
  wait."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

PACKAGE = str(Path(__file__).resolve().parents[1] / "trainer")
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Where in the project a tensor's value was read, one entry per read."""
    seen: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                seen.append(f"{_name} in {caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def regression_module():
    from trainer.namespace import pl

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Regression()


def fit(tmp_path, callbacks, steps: int, **trainer_args):
    from trainer.namespace import pl

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks, **trainer_args)  # fmt: skip
    trainer.fit(regression_module(), torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == steps


@pytest.mark.unit
@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_device_read_per_optimizer_step_and_none_per_micro_batch(tmp_path, reads, accumulate):
    from trainer.checkpoint.callback import Checkpointer
    from trainer.metrics.throughput import ThroughputMonitor
    from trainer.namespace import pl

    class Window(pl.Callback):
        """Snapshots of the read count after the first step and after the last (registered last: it runs
        after the project's callbacks at each hook)."""

        def __init__(self) -> None:
            self.marks: dict[int, int] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.marks[trainer.global_step] = len(reads)

    steps = 6
    window = Window()
    checkpointer = Checkpointer(tmp_path / "checkpoints", every_n_steps=0, every_n_minutes=None, keep_last_k=1,
                                keep_best_k=0, monitor="val/loss", mode="min", signals=[], on_nonfinite="stop",
                                step_timeout_s=None)  # fmt: skip
    monitor = ThroughputMonitor(log_every_n_steps=1000, accelerator="cpu", precision="32")
    fit(tmp_path, [checkpointer, monitor, window], steps, accumulate_grad_batches=accumulate)

    between = reads[window.marks[1] : window.marks[steps]]  # steps 2..6, with every micro-batch of them
    assert len(between) == steps - 1, between
    assert set(between) == {"tolist in _read_step_flags"}


@pytest.mark.unit
def test_work_at_a_batch_end_counts_in_the_step_not_as_data_wait(tmp_path):
    from trainer.metrics.throughput import ThroughputMonitor
    from trainer.namespace import pl

    class SlowSave(pl.Callback):  # registered after the monitor, as the checkpointer is
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.1)

    monitor = ThroughputMonitor(log_every_n_steps=2, accelerator="cpu", precision="32")
    fit(tmp_path, [monitor, SlowSave(), monitor.end_clock()], steps=6)
    assert len(monitor.history) == 3
    for row in monitor.history:
        assert row["train/data_wait_frac"] < 0.1, row
    # a window runs from one logged step's end to the next's: after the first, each holds a sleep per step
    assert all(row["train/step_time_s"] >= 0.1 for row in monitor.history[1:])
