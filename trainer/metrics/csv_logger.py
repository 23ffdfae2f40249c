"""``<run.dir>/metrics.csv``: one row per logged step, the same columns from the first row to the last.

Lightning's own CSVLogger names its folder per version and rewrites the file when a new key appears; ours
keeps the run's single file, merges everything logged for a step (train and val) into one row, and on resume
drops the rows after the checkpoint's step so a resumed run has no duplicated steps.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.metrics.names import TRAINER_COLUMNS, module_metrics
from trainer.namespace import pl

rank_zero_only = pl.utilities.rank_zero_only

# The trainer's own columns first (in a fixed order, val/loss beside train/loss), then whatever is logged.
COLUMNS = (
    "step",
    "epoch",
    "train/loss",
    "val/loss",
    *(c for c in TRAINER_COLUMNS if c.startswith("train/") and c != "train/loss"),
)


class CSVMetricsLogger(pl.loggers.Logger):
    def __init__(self, path: str | os.PathLike, flush_every_n_rows: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.flush_every_n_rows = flush_every_n_rows
        self.columns: list[str] = list(COLUMNS)
        self._pending: dict[int, dict[str, Any]] = {}
        self._tail: tuple[int, int, dict[str, Any]] | None = None  # (step, file offset, row) of the last row
        self.current_step: int | None = None
        """The optimizer step, set by the throughput monitor. Lightning passes its own step counter for what
        modules log with ``self.log``, one behind for validation; rows are keyed by optimizer step instead."""

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run directory's config.yaml already holds the whole config

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """What Lightning passes on from the module's ``self.log`` (and from other callbacks)."""
        step = self.current_step if self.current_step is not None else int(step or 0)
        self._add(module_metrics(metrics), step)

    @rank_zero_only
    def log_trainer_metrics(self, row: Mapping[str, float], step: int) -> None:
        self._add(row, step)

    def _add(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {k: float(v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        if self._tail is not None and self._tail[0] == step:  # that row is on disk already: complete it
            _, offset, row = self._tail
            row.update(values, step=step)
            self._write([row], truncate_at=offset)
            return
        self._pending.setdefault(step, {"step": step}).update(values, step=step)
        # Rows of earlier steps are complete once a later step is logged.
        if len([s for s in self._pending if s < step]) >= self.flush_every_n_rows:
            self._flush(below=step)

    @rank_zero_only
    def flush_all(self) -> None:
        """Put every row on disk (before a checkpoint: a resumed run keeps the rows up to its step)."""
        self._flush(below=None)

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """Keep only rows up to ``step`` (the restored checkpoint's step) and append after them."""
        self._pending.clear()
        self._tail = None
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or list(COLUMNS)
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= step]
        self.columns = list(header)
        self._rewrite(rows)

    @rank_zero_only
    def save(self) -> None:
        # Lightning calls this after every log_metrics; the newest step may still get its val metrics.
        if self._pending:
            self._flush(below=max(self._pending))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._flush(below=None)

    def _flush(self, below: int | None) -> None:
        steps = sorted(s for s in self._pending if below is None or s < below)
        if steps:
            self._write([self._pending.pop(s) for s in steps])

    def _write(self, rows: list[dict], truncate_at: int | None = None) -> None:
        new_keys = [k for r in rows for k in r if k not in self.columns]
        # A key the header lacks (a module's own metric; telemetry columns after resuming a file written without
        # them): widen the file once, earlier rows keeping empty cells.
        if new_keys:
            existing = []
            if self.path.exists():
                with self.path.open(newline="") as f:
                    existing = list(csv.DictReader(f))
            if truncate_at is not None:
                existing = existing[:-1]  # the row being completed is written again below
            self.columns += list(dict.fromkeys(new_keys))
            self._rewrite(existing)
            truncate_at = None
        fresh = not self.path.exists()
        with self.path.open("r+" if not fresh else "w", newline="") as f:
            if truncate_at is not None:
                f.truncate(truncate_at)
            f.seek(0, os.SEEK_END)
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            if fresh:
                writer.writeheader()
            for row in rows:
                offset = f.tell()
                writer.writerow(row)
            f.flush()
        self._tail = (int(rows[-1]["step"]), offset, dict(rows[-1]))

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._tail = None
