"""How close `trainer train` runs to the machine: a table of ratios, also written to benchmarks/.

Measures, on the default GPT (experiment=gpt_quickstart) with its data and batch, in one run:
  a. orchestrator overhead: tokens/s of `trainer train` over a minimal hand-written loop (same model code,
     optimizer, schedule, clipping, data loader; one process, no logging) -- target >= 0.97;
  b. DDP scaling: 2 ranks x 1 thread over 1 rank x 1 thread (tokens/s ratio / 2) -- target >= 0.90; and the
     same for FSDP (strategy=fsdp), with its tokens/s against DDP's;
  c. MFU on CPU: model FLOP/s over the fp32 matmul peak measured in the same run, eager and with
     model.compile=true (torch.compile);
  d. start-up: process start to the end of the first step of `trainer train`; `trainer --help` and a SLURM
     dry-run render (neither imports torch) -- target well under 1 s;
  e. checkpoint write MB/s over the disk's sequential write speed, and the stall (scripts/bench_checkpoint.py);
  f. data-wait fraction at the default settings -- target < 2%;
  g. device telemetry's cost: tokens/s with it off (logger.telemetry_interval_s=0) over on (the default), and
     the sampler thread's own CPU time per second -- target < 1%.
  h. the profiler window's cost (profile.steps): a training step while torch.profiler records it over one
     without, and the writing of the trace; off it is 0 by construction (no callback is added).
  i. `trainer plan`'s accuracy: its parameter, gradient and optimizer bytes against the tensors a real run
     holds (exact or not), and its total against the measured rise of the process's peak resident memory
     over the first 3 steps (CPU has no allocator statistics; tests/helpers/memcount.py counts).
  j. big sweeps (scripts/bench_sweep.py): `trainer submit --dry-run -m` of 1,000 trials against 10, the size of
     its script, and `trainer status` / `trainer report` of a 10,000-trial sweep.
With --gpu (a machine with CUDA GPUs) it measures instead, on experiment=gpt_150m (151M parameters,
bf16-mixed, synthetic tokens): MFU against the GPU's data-sheet dense bf16 peak, eager and compiled, on one
GPU -- target >= 40% on H100/H200 with compile; DDP and FSDP over NCCL on all the machine's GPUs (scaling
efficiency against one GPU, compiled); and the plan's total against max_memory_allocated on one GPU.
This machine may be shared and noisy: read the ratios, not the absolute numbers. Measurements a and b are
repeated (--repeats, interleaved) and the best of each is used: noise only ever slows a run down; the
spread of the per-repeat ratios is printed beside them.

    python scripts/bench.py [--steps 100] [--repeats 2] [--out benchmarks]      (or: make bench)
    python scripts/bench.py --gpu [--steps 100]                                   (or: make bench ARGS=--gpu)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Training only: no validation (a run otherwise ends with one, which the start-up figure would include).
BASE = ["experiment=gpt_quickstart", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=0", "trainer.log_every_n_steps=10"]  # fmt: skip


def trainer(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"`trainer {' '.join(args)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc


def summary(cwd: Path, name: str) -> dict:
    return json.loads((cwd / "runs" / name / "run.json").read_text())["summary"]


def plain_lightning(cwd: Path, steps: int) -> dict:
    """Run scripts/bench_plain_lightning.py; its figures plus its process wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_plain_lightning.py"), str(steps)],
                          cwd=cwd, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the plain Lightning script failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - started)


def spread(num: list[float], den: list[float], scale: float = 1.0) -> str:
    ratios = [n / d / scale for n, d in zip(num, den, strict=True)]
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else f"{ratios[0]:.3f}"


def hand_loop(steps: int, threads: int | None = None) -> float:
    """Tokens/s of a plain PyTorch loop over the same model, data, optimizer, schedule and clipping."""
    import torch

    from trainer.config.compose import compose, session
    from trainer.fit import build_data, build_model
    from trainer.optim import param_groups

    if threads:
        torch.set_num_threads(threads)
    with session():
        c = compose([*BASE, f"trainer.max_steps={steps}"], where="local")
    torch.manual_seed(c.conf.seed)
    model, data = build_model(c), build_data(c)
    data.setup("fit")
    optimizer = model.optimizer(param_groups(model))
    scheduler = model.scheduler(optimizer, total_steps=steps)
    clip = c.conf.trainer.gradient_clip_val
    model.train()
    warmup, done, started = 10, 0, 0.0
    while done < steps:
        for x, y in data.train_dataloader():
            if done == warmup:
                started = time.perf_counter()
            loss = model._loss((x, y))
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            if done == steps:
                break
    samples = (steps - warmup) * c.conf.data.batch_size
    return samples * model.tokens_per_sample() / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=2, help="repeats of measurements a and b (best is used)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks"), help="folder of the written table")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (experiment=gpt_150m) instead")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every run (e.g. a smaller model)"
    )
    args = parser.parse_args()
    if args.gpu:
        return write_table(args, gpu_rows(args), gpu_machine_name(args))
    rows: list[tuple[str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    steps = [f"trainer.max_steps={args.steps}"]

    # a, c, f: `trainer train` against the hand-written loop, interleaved
    ours, hand, runs = [], [], []
    for i in range(args.repeats):
        trainer(["train", *BASE, *steps, f"run.name=main{i}"], work)
        runs.append(summary(work, f"main{i}"))
        ours.append(runs[-1]["tokens_per_sec"])
        hand.append(hand_loop(args.steps))
    main_run = max(runs, key=lambda r: r["tokens_per_sec"])
    # a': the same module and data in a plain Lightning script (no callbacks, loggers or checks of ours)
    plain = [plain_lightning(work, args.steps)["tokens_per_sec"] for _ in range(args.repeats)]
    rows.append(("a. tokens/s, trainer / plain Lightning script", f"{max(ours) / max(plain):.3f}",
                 f"best {max(ours):,.0f} vs {max(plain):,.0f} tokens/s (scripts/bench_plain_lightning.py, same "
                 "module, data, optimizer, schedule, clipping)"))  # fmt: skip
    rows.append(("a. tokens/s, trainer / hand-written loop", f"{max(ours) / max(hand):.3f}",
                 f"best {max(ours):,.0f} vs {max(hand):,.0f} tokens/s; per repeat {spread(ours, hand)} "
                 "(target >= 0.97)"))  # fmt: skip
    rows.append(("c. MFU on CPU, eager", f"{main_run['mfu']:.1%}", f"peak: {main_run['peak_source']}"))
    trainer(["train", *BASE, *steps, "model.compile=true", "run.name=compiled"], work)
    compiled = summary(work, "compiled")
    # Against the eager run's peak: each run measures its own, and the compiled run's measurement can overlap
    # Inductor's compile workers, which would make its own MFU look better than it is.
    gain = compiled["tokens_per_sec"] / main_run["tokens_per_sec"]
    rows.append(("c. MFU on CPU, compiled (model.compile=true)", f"{main_run['mfu'] * gain:.1%}",
                 f"{gain:.2f}x eager tokens/s (same peak as eager; the first logged window, with the "
                 "compile, not counted)"))  # fmt: skip
    rows.append(("f. data-wait fraction", f"{main_run['data_wait_frac']:.2%}", "target < 2%"))
    rows.append(telemetry_cost(work, args.steps, args.repeats))

    rows.append(profiler_cost(work, args.repeats))
    rows.append(plan_accuracy(work, BASE, gpu=False))
    rows += sweep_scale(work)
    # b: DDP and FSDP scaling, one thread per rank, interleaved
    one_thread = {"OMP_NUM_THREADS": "1"}
    tps: dict[str, list[float]] = {"one": [], "ddp": [], "fsdp": []}
    for i in range(args.repeats):
        for kind, extra in (("one", []), ("ddp", ["strategy=ddp", "trainer.devices=2"]),
                            ("fsdp", ["strategy=fsdp", "trainer.devices=2"])):  # fmt: skip
            trainer(["train", *BASE, *steps, *extra, f"run.name={kind}{i}"], work, one_thread)
            tps[kind].append(summary(work, f"{kind}{i}")["tokens_per_sec"])
    one, ddp, fsdp = (max(tps[k]) for k in ("one", "ddp", "fsdp"))
    rows.append(("b. DDP efficiency, 2x1 thread vs 1x1", f"{ddp / one / 2:.3f}",
                 f"best {ddp:,.0f} vs {one:,.0f} tokens/s; per repeat {spread(tps['ddp'], tps['one'], 2)} "
                 "(target >= 0.90)"))  # fmt: skip
    rows.append(("b. FSDP efficiency, 2x1 thread vs 1x1", f"{fsdp / one / 2:.3f}",
                 f"best {fsdp:,.0f} tokens/s; FSDP / DDP tokens/s {fsdp / ddp:.3f}"))  # fmt: skip

    # d: start-up and the torch-free commands
    first, _ = trainer(["train", *BASE, "trainer.max_steps=1", "run.name=first"], work)
    plain_first = min(plain_lightning(work, 1)["wall_s"] for _ in range(2))
    rows.append(("d. start to end of first step (process wall)", f"{first:.2f} s",
                 f"includes torch/Lightning import; the plain Lightning script: {plain_first:.2f} s"))  # fmt: skip
    help_s = min(trainer(["--help"], work)[0] for _ in range(3))
    dry_s = min(trainer(["submit", "--dry-run", "cluster=slurm"], work, {"SLURM_CONF": "/nonexistent"})[0]
                for _ in range(3))  # fmt: skip
    rows.append(("d. trainer --help", f"{help_s:.2f} s", "no torch import (target well under 1 s)"))
    rows.append(
        ("d. trainer submit --dry-run (render)", f"{dry_s:.2f} s", "no torch import (target well under 1 s)")
    )

    # e: checkpoint write speed against the disk
    ckpt = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_checkpoint.py"), "--dir", str(work / "ckpt")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    for line in ckpt.splitlines():
        if line.startswith(("write speed / disk speed", "stall per save", "async stall / sync stall")):
            label, value = line[:29].strip(), line[29:].strip()
            rows.append((f"e. checkpoint {label}", value.split()[0], " ".join(value.split()[1:])))

    return write_table(args, rows, f"{platform.machine()}-{os.cpu_count()}cpu")


def telemetry_cost(work: Path, steps: int, repeats: int) -> tuple[str, str, str]:
    """g: step time with device telemetry on (the default interval) against off, interleaved, best of each;
    and what the sampler thread costs by its own CPU clock, the figure that resolves well under 1% (on a small
    shared CPU the end-to-end ratio moves by a few % from run to run either way)."""
    from trainer.config.schema import LoggerConfig
    from trainer.metrics.telemetry import Sampler

    tps: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(repeats):
        kinds = [("off", ["logger.telemetry_interval_s=0"]), ("on", [])]
        for kind, extra in kinds if i % 2 == 0 else kinds[::-1]:  # alternated: drift hits both alike
            trainer(
                ["train", *BASE, f"trainer.max_steps={steps}", *extra, f"run.name=telemetry-{kind}{i}"], work
            )
            tps[kind].append(summary(work, f"telemetry-{kind}{i}")["tokens_per_sec"])
    on, off = max(tps["on"]), max(tps["off"])
    interval = LoggerConfig().telemetry_interval_s
    sampler, seconds = Sampler(0.05), 2.0  # fast, to count many samples; then scaled to the default interval
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    per_sample = sampler.cpu_s / (seconds / 0.05)
    return ("g. telemetry cost, step time on / off - 1", f"{off / on - 1:+.2%}",
            f"best {off:,.0f} tokens/s off vs {on:,.0f} on, per repeat {spread(tps['off'], tps['on'])}; "
            f"sampler {per_sample * 1e3:.2f} ms CPU per sample, {per_sample / interval:.3%} of one core at "
            f"{interval:g} s (target < 1%)")  # fmt: skip


def sweep_scale(work: Path) -> list[tuple[str, str, str]]:
    """j. big sweeps (scripts/bench_sweep.py): dry runs of 10 and 1,000 trials; status and report of 10,000."""
    import bench_sweep

    small, _ = bench_sweep.dry_run(10, work)
    big, size = bench_sweep.dry_run(1000, work)
    sweep = bench_sweep.fake_sweep(work / "sweep-scale", 10000)
    status, _ = bench_sweep.trainer(["status", str(sweep)], work)
    report, _ = bench_sweep.trainer(["report", str(sweep)], work)
    return [
        ("j. sweep dry run, 1,000 trials", f"{big:.1f} s",
         f"{big / small:.1f}x the 10-trial run ({small:.1f} s); script {size:,} bytes (target <= 5x, < 10 s)"),
        ("j. trainer status / report, 10,000 trials", f"{status:.1f} s / {report:.1f} s", "a finished sweep's files"),
    ]  # fmt: skip


def plan_accuracy(work: Path, overrides: list[str], gpu: bool) -> tuple[str, str, str]:
    """i. `trainer plan --json` against what a 3-step run of the same overrides holds (rank 0)."""
    planned = json.loads(trainer(["plan", "--json", *overrides], work)[1].stdout)["per_device"]
    out = work / f"memcount-{'gpu' if gpu else 'cpu'}"
    # glibc returns freed blocks at once, so the resident memory follows the live tensors (as in test_plan)
    env = {"PYTHONPATH": str(REPO / "tests" / "helpers"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    trainer(["train", *overrides, "trainer.max_steps=3", "+callbacks.memcount._target_=memcount.MemoryCount",
             f"+callbacks.memcount.out={out}", f"run.name={out.name}"], work, env)  # fmt: skip
    counted = json.loads((out / "rank-0.json").read_text())
    exact = all(counted[k] == planned[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes"))
    state = "params, grads, optimizer bytes " + ("exact" if exact else "DIFFER")
    if gpu:  # the allocator's peak holds the parameters too
        ratio = counted["cuda_peak_bytes"] / planned["total_bytes"]
        return ("plan total vs max_memory_allocated, 1 GPU", f"{ratio:.3f}",
                f"measured / planned ({planned['total_bytes'] / 2**30:.2f} GiB planned); {state}")  # fmt: skip
    rise = planned["total_bytes"] - planned["params_bytes"]  # what the steps add to the process
    ratio = counted["rss_rise_bytes"] / rise
    return ("i. plan total vs measured peak RSS rise", f"{ratio:.3f}",
            f"measured / planned ({rise / 2**20:.0f} MiB planned beyond the parameters); {state}")  # fmt: skip


def profiler_cost(work: Path, repeats: int) -> tuple[str, str, str]:
    """h: the quickstart GPT's training step (as in the hand-written loop) while torch.profiler records it, as a
    profile window does (CPU activities; no shapes, memory or stacks), over the same step without it: short
    blocks of 3 steps, interleaved (a busy machine's slow spells then fall on both), the best step of each; and
    the writing of a 10-step trace and operator table. Off, a window costs nothing by construction: its callback
    is not added."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainer.config.compose import compose, session
    from trainer.fit import build_data, build_model
    from trainer.optim import param_groups

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # as the window sets it
    with session():
        c = compose(BASE, where="local")
    torch.manual_seed(c.conf.seed)
    model, data = build_model(c), build_data(c)
    data.setup("fit")
    optimizer = model.optimizer(param_groups(model))
    batches = iter(data.train_dataloader())
    model.train()

    def step() -> float:
        started = time.perf_counter()
        model._loss(next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        step()
    best = {"off": math.inf, "on": math.inf}
    for _ in range(5 * repeats):
        for kind in ("off", "on"):
            recorder = profile(activities=[ProfilerActivity.CPU]) if kind == "on" else None
            if recorder is not None:
                recorder.start()
            best[kind] = min(best[kind], *(step() for _ in range(3)))
            if recorder is not None:
                recorder.stop()
    recorder = profile(activities=[ProfilerActivity.CPU])
    recorder.start()
    for _ in range(10):
        step()
    recorder.stop()
    started = time.perf_counter()
    recorder.export_chrome_trace(str(work / "trace.json"))
    recorder.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    written = time.perf_counter() - started
    return ("h. profiler window, step time on / off - 1", f"{best['on'] / best['off'] - 1:+.1%}",
            f"best step {best['on'] * 1e3:.0f} ms recording vs {best['off'] * 1e3:.0f} ms; writing a 10-step "
            f"window's trace and table {written:.1f} s once; off: 0 by construction (no callback)")  # fmt: skip


def write_table(args: argparse.Namespace, rows: list[tuple[str, str, str]], machine: str) -> int:
    import torch

    repeats = "" if args.gpu else f", best of {args.repeats} for a and b"
    header = (f"# Benchmark {time.strftime('%Y-%m-%d')} on {machine}\n\n"
              f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores, "
              f"{args.steps} steps per measurement{repeats}; method: see scripts/bench.py's docstring.\n\n")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    table = "| measure | value | detail |\n|---|---|---|\n" + "".join(
        f"| {a} | {b} | {c} |\n" for a, b, c in rows
    )
    for a, b, c in rows:
        print(f"{a.ljust(width)}  {b:>10}  {c}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%d')}-{machine}.md"
    path.write_text(header + table)
    print(f"wrote {path}")
    return 0


def gpu_machine_name(args: argparse.Namespace) -> str:
    import torch

    if not torch.cuda.is_available():
        return f"{platform.machine()}-{os.cpu_count()}cpu-gpu-mode"  # only a trial of the plumbing on CPU
    name = torch.cuda.get_device_name(0).replace(" ", "-")
    return f"{torch.cuda.device_count()}x-{name}"


def gpu_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """MFU on one GPU (eager, compiled) and DDP/FSDP scaling over all of them, on experiment=gpt_150m."""
    import torch

    on_cpu = "trainer.accelerator=cpu" in args.extra
    if not torch.cuda.is_available() and not on_cpu:
        raise SystemExit("error: --gpu: no CUDA GPU is visible here (run it on a GPU machine)")
    gpus = torch.cuda.device_count() if not on_cpu else 2
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    base = ["experiment=gpt_150m", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=10",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=0", *args.extra]  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    runs = {}
    for name, extra in (("eager", ["model.compile=false"]), ("compiled", [])):
        trainer(["train", *base, *extra, f"run.name={name}"], work)
        runs[name] = summary(work, name)
        mfu = runs[name]["mfu"]
        rows.append((f"MFU, 1 GPU, bf16-mixed, {name}", "n/a" if mfu is None else f"{mfu:.1%}",
                     f"{runs[name]['tokens_per_sec']:,.0f} tokens/s; peak: {runs[name]['peak_source']}"
                     + (" (target >= 40% on H100/H200)" if name == "compiled" else "")))  # fmt: skip
    rows.append(plan_accuracy(work, [*base, "trainer.devices=1"], gpu=not on_cpu))
    if gpus > 1:
        for strategy in ("ddp", "fsdp"):
            trainer(
                ["train", *base, f"strategy={strategy}", f"trainer.devices={gpus}", f"run.name={strategy}"],
                work,
            )
            run = summary(work, strategy)
            efficiency = run["tokens_per_sec"] / runs["compiled"]["tokens_per_sec"] / gpus
            mfu = run["mfu"]
            # bf16 differs: FSDP's residual stream is bf16, DDP's fp32 (README, FSDP): not the same numerics
            residual = "bf16 residual" if strategy == "fsdp" else "fp32 residual"
            rows.append((f"{strategy.upper()} over {gpus} GPUs (NCCL), compiled", f"{efficiency:.3f}",
                         f"scaling efficiency; {run['tokens_per_sec']:,.0f} tokens/s; MFU "
                         + ("n/a" if mfu is None else f"{mfu:.1%}") + f"; {residual}"))  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
