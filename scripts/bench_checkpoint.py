"""Checkpoint cost: write speed against the disk's own sequential write speed, and the stall training sees.

    python scripts/bench_checkpoint.py [--dir runs/_bench] [--layers 6] [--width 384] [--every 10] [--steps 40]

Trains a GPT on synthetic data with a checkpoint every --every steps (through the real `trainer train`),
then reads the per-save figures the run logged (checkpoint/mb, checkpoint/mb_per_s, checkpoint/stall_s) and
compares them with a plain fsync'ed sequential write of the same size to the same folder. Saving is
synchronous: the stall is the whole time of a save (state gathered, written, fsynced, renamed).
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
    name = f"ckpt-{args.layers}x{args.width}-{int(time.time())}"
    cmd = [sys.executable, "-m", "trainer", "train", "data=synthetic", f"model.n_layer={args.layers}",
           f"model.n_embd={args.width}", "model.n_head=6", "model.block_size=128", "data.batch_size=8",
           f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100000",
           "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={args.every}", "checkpoint.keep_last_k=1",
           f"run.root={root}", f"run.name={name}"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with (root / name / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    saves = [r for r in rows if r.get("checkpoint/mb")]
    steps = [
        float(r["train/step_time_s"])
        for r in rows
        if r.get("train/step_time_s") and not r.get("checkpoint/mb")
    ]
    step_time = statistics.median(steps)
    mb = statistics.median(float(r["checkpoint/mb"]) for r in saves)
    write = statistics.median(float(r["checkpoint/mb_per_s"]) for r in saves)
    stall = statistics.median(float(r["checkpoint/stall_s"]) for r in saves)
    disk = statistics.median(disk_write_mb_per_s(root, max(1, int(mb))) for _ in range(3))
    overhead = stall / (args.every * step_time)

    print(
        f"checkpoint size              {mb:10.1f} MB  (GPT {args.layers} layers x {args.width}, AdamW state)"
    )
    print(f"checkpoint write speed       {write:10.1f} MB/s (median of {len(saves)} saves)")
    print(f"disk sequential write+fsync  {disk:10.1f} MB/s (same size, same folder)")
    print(f"write speed / disk speed     {write / disk:10.2f}")
    print(f"stall per save               {stall:10.3f} s   (training waits this long)")
    print(f"median step time             {step_time:10.3f} s")
    print(f"stall / time between saves   {overhead:10.1%}  (one save every {args.every} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
