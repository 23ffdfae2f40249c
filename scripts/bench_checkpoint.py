"""Checkpoint cost: write speed against the disk's own sequential write speed, and the stall training sees.

    python scripts/bench_checkpoint.py [--dir runs/_bench] [--layers 6] [--width 384] [--every 10] [--steps 40]

Trains a GPT on synthetic data with a checkpoint every --every steps (through the real `trainer train`),
then reads the per-save figures the run logged (checkpoint/mb, checkpoint/mb_per_s, checkpoint/stall_s) and
compares them with a plain fsync'ed sequential write of the same size to the same folder. It runs twice: with
synchronous saves (the stall is the whole save: state gathered, written, fsynced, renamed) and with background
saves (checkpoint.async_save: the stall is gathering the state, plus any wait for the previous write, plus the
next optimizer step's wait for the copy of the weights and optimizer state, which is made meanwhile).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def disk_write_mb_per_s(directory: Path, megabytes: int) -> float:
    """Sequential write of ``megabytes`` MB with one fsync at the end, like a checkpoint write."""
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory, delete=True) as f:
        started = time.perf_counter()
        for _ in range(megabytes):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return megabytes / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/_bench", help="where the benchmark run is written")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The disk's speed drifts (a shared virtual disk here varied 500-1,300 MB/s within an hour): it is measured
    # before and after the runs, and the median of those six is the reference.
    before = [disk_write_mb_per_s(root, 130) for _ in range(3)]
    figures = {mode: run(args, root, mode) for mode in ("sync", "async")}
    sync, bg = figures["sync"], figures["async"]
    speeds = before + [disk_write_mb_per_s(root, max(1, int(sync["mb"]))) for _ in range(3)]
    disk = statistics.median(speeds)

    print(
        f"checkpoint size              {sync['mb']:10.1f} MB  (GPT {args.layers} layers x {args.width}, AdamW state)"
    )
    print(f"checkpoint write speed       {sync['write']:10.1f} MB/s (median of {sync['saves']} saves)")
    print(f"disk sequential write+fsync  {disk:10.1f} MB/s (same size, same folder; {min(speeds):.0f}-{max(speeds):.0f} "
          "before and after the runs)")  # fmt: skip
    print(f"write speed / disk speed     {sync['write'] / disk:10.2f}")
    print(f"median step time             {sync['step']:10.3f} s")
    for mode, f in figures.items():
        print(f"stall per save, {mode:<5}        {f['stall']:10.3f} s   ({f['stall'] / (args.every * f['step']):.1%} of the "
              f"time between saves, one every {args.every} steps)")  # fmt: skip
    print(f"async stall / sync stall     {bg['stall'] / sync['stall']:10.2f}  (target <= 0.1)")
    for mode, f in figures.items():
        print(f"step after a save, {mode:<5}     {f['after']:10.3f} s   (median step {f['step']:.3f} s: the "
              f"{'copy and ' if mode == 'async' else ''}write share the cores with it)")  # fmt: skip
    print(f"async background write speed {bg['write']:10.1f} MB/s (it shares the cores with training)")
    return 0


def run(args: argparse.Namespace, root: Path, mode: str) -> dict[str, float]:
    """One benchmark run with synchronous or background saves; the median figures of its saves."""
    name = f"ckpt-{mode}-{args.layers}x{args.width}-{int(time.time())}"
    cmd = [sys.executable, "-m", "trainer", "train", "data=synthetic", f"model.n_layer={args.layers}",
           f"model.n_embd={args.width}", "model.n_head=6", "model.block_size=128", "data.batch_size=8",
           f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100000",
           "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={args.every}", "checkpoint.keep_last_k=1",
           f"checkpoint.async_save={str(mode == 'async').lower()}", f"run.root={root}", f"run.name={name}"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with (root / name / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # The last save is the end of the run, which waits for its write whatever the mode. A background save's
    # stall is the save itself plus the next step's wait for the copy of the weights (checkpoint/copy_wait_s).
    waits = {
        int(r["step"]) - 1: float(r["checkpoint/copy_wait_s"])
        for r in rows
        if r.get("checkpoint/copy_wait_s")
    }
    stalls = [float(r["checkpoint/stall_s"]) + waits.get(int(r["step"]), 0.0)
              for r in rows if r.get("checkpoint/stall_s")][:-1]  # fmt: skip
    sizes = [r for r in rows if r.get("checkpoint/mb_per_s")]
    saved = {int(r["step"]) for r in rows if r.get("checkpoint/stall_s")}
    times = {int(r["step"]): float(r["train/step_time_s"]) for r in rows if r.get("train/step_time_s")}
    steps = [t for s, t in times.items() if s not in saved and s - 1 not in saved]
    after = [t for s, t in times.items() if s - 1 in saved and s not in saved]
    return {
        "stall": statistics.median(stalls),
        "after": statistics.median(after) if after else float("nan"),
        "mb": statistics.median(float(r["checkpoint/mb"]) for r in sizes),
        "write": statistics.median(float(r["checkpoint/mb_per_s"]) for r in sizes),
        "step": statistics.median(steps),
        "saves": len(sizes),
    }


if __name__ == "__main__":
    sys.exit(main())
