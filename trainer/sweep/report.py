"""``trainer report <sweep dir | run dir>``: a table and PNG plots people can look at.

A sweep: its trials sorted by the objective (overrides, objective, steps, time, state), and under
``<sweep dir>/report/``: the objective against each swept parameter, and the loss curves of the best trials on
one chart. A run: ``<run dir>/report/curves.png`` with its loss, learning rate and throughput; and for a run
with a profiler window (``profile.steps``), the time of each phase of a step per rank (a table, and
``report/step_time.png``). Everything is read from the files runs write (metrics.csv, run.json, sweep.json,
profile/phases.json); matplotlib draws off-screen (Agg).
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
from pathlib import Path
from typing import Any

from trainer import rundir
from trainer.files import read_json
from trainer.sweep import ledger

USAGE = """\
usage: trainer report DIR

DIR is a sweep directory (trainer train -m / trainer submit -m) or one run's directory. Prints a table and
writes PNG plots into DIR/report/.
"""

BEST_CURVES = 5


def read_columns(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each metrics.csv column as (step, value) pairs, skipping empty cells."""
    out: dict[str, list[tuple[int, float]]] = {}
    try:
        with (run_dir / rundir.METRICS_FILE).open(newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key != "step" and value not in (None, ""):
                        with contextlib.suppress(ValueError):  # a non-numeric column
                            out.setdefault(key, []).append((step, float(value)))
    except OSError:
        pass
    return out


def trial_rows(sweep_dir: Path) -> tuple[dict, list[dict]]:
    data = ledger.read(sweep_dir)
    metric = data.get("metric", "val/loss")
    rows = []
    for t in data.get("trials", []):
        run_dir = Path(t["run_dir"]) if t.get("run_dir") else None
        state = read_json(run_dir / rundir.STATE_FILE) if run_dir else None
        last = rundir.last_metrics(run_dir / rundir.METRICS_FILE, (metric,)) if run_dir else {}
        summary = (state or {}).get("summary") or {}
        rows.append({
            "index": t["index"], "overrides": " ".join(t.get("overrides", [])), "run_dir": run_dir,
            "objective": last.get(metric), "steps": last.get("step"),
            "seconds": t.get("seconds") or summary.get("wall_time_s"),
            "state": ledger.trial_state(t, (state or {}).get("status")),
            "params": t.get("params") or dict(o.split("=", 1) for o in t.get("overrides", []) if "=" in o),
        })  # fmt: skip
    maximize = data.get("direction") == "maximize"

    def key(r: dict) -> tuple:
        value = r["objective"]
        return (value is None, -(value or 0.0) if maximize else (value or 0.0))

    return data, sorted(rows, key=key)


def print_table(data: dict, rows: list[dict]) -> None:
    metric = data.get("metric", "val/loss")
    header = ["#", "TRIAL", metric.upper(), "STEPS", "TIME", "STATE", "OVERRIDES"]
    table = [header] + [
        [str(rank), str(r["index"]), "-" if r["objective"] is None else f"{r['objective']:.4f}",
         "-" if r["steps"] is None else str(r["steps"]), "-" if r["seconds"] is None else f"{r['seconds']:.1f}s",
         r["state"] or "-", r["overrides"] or "-"]
        for rank, r in enumerate(rows, start=1)
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    direction = data.get("direction", "minimize")
    print(f"sweep {data.get('name', '?')}: {len(rows)} trials, sorted by {metric} ({direction})")
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot_sweep(sweep_dir: Path, data: dict, rows: list[dict]) -> list[Path]:
    plt = _pyplot()
    out_dir = sweep_dir / "report"
    out_dir.mkdir(exist_ok=True)
    metric = data.get("metric", "val/loss")
    written = []
    scored = [r for r in rows if r["objective"] is not None]
    names = sorted({k for r in rows for k in r["params"]})
    for name in names:
        points = [(r["params"].get(name), r["objective"]) for r in scored if name in r["params"]]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [_as_number(x) for x, _ in points]
        if all(x is not None for x in xs):
            ax.scatter(xs, [y for _, y in points])
            positive = all(x > 0 for x in xs)
            if positive and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:  # categorical: one column per value
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {name}")
        ax.grid(alpha=0.3)
        path = out_dir / f"objective_vs_{name.replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    best = [r for r in scored if r["run_dir"] is not None][:BEST_CURVES]
    if best:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in best:
            columns = read_columns(r["run_dir"])
            label = f"#{r['index']} {r['overrides']}"[:60]
            for ax, key in zip(axes, ("train/loss", metric), strict=True):
                series = columns.get(rundir.metric_column(columns, key), [])
                if series:
                    ax.plot([s for s, _ in series], [v for _, v in series], marker="." if key == metric else None,
                            label=label)  # fmt: skip
        for ax, key in zip(axes, ("train/loss", metric), strict=True):
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(f"{key}: best {len(best)} trials")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        path = out_dir / "best_curves.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def monitor_of(run_dir: Path) -> str:
    """The run's checkpoint metric (``checkpoint.monitor`` in its config.yaml): the user's name for it."""
    import yaml

    try:
        return str(yaml.safe_load((run_dir / rundir.CONFIG_FILE).read_text())["checkpoint"]["monitor"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "val/loss"


def plot_run(run_dir: Path) -> list[Path]:
    plt = _pyplot()
    columns = read_columns(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    speed = "train/tokens_per_sec" if "train/tokens_per_sec" in columns else "train/samples_per_sec"
    panels = [
        ("loss", ("train/loss", monitor_of(run_dir))),
        ("learning rate", ("train/lr",)),
        ("throughput", (speed,)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            series = columns.get(rundir.metric_column(columns, key), [])
            if series:
                ax.plot([s for s, _ in series], [v for _, v in series], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    path = out_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


PHASE_COLOURS = {"data_wait": "tab:gray", "forward": "tab:blue", "backward": "tab:orange",
                 "optimizer": "tab:green", "other": "tab:olive"}  # fmt: skip


def print_phases(phases: dict) -> None:
    """The profiler window's table: milliseconds per step in each phase, one row per recording rank."""
    names, ranks = phases["phases"], phases["ranks"]
    first, last = next(iter(ranks.values()))["steps"]
    header = ["RANK", *(n.replace("_", " ").upper() for n in names), "STEP", "COLLECTIVES"]
    table = [header] + [
        [rank, *(f"{f['phases_s'][n] * 1e3:.1f}" for n in names), f"{f['step_s'] * 1e3:.1f}",
         f"{f['collectives_s'] * 1e3:.1f}"]
        for rank, f in sorted(ranks.items(), key=lambda item: int(item[0]))
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"where a step's time goes: ms per step, mean of steps {first}-{last} (profile/)")
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("  collectives overlap the phases (DDP's gradient all-reduce runs during backward): not in STEP")


def plot_phases(run_dir: Path, phases: dict) -> Path:
    """``report/step_time.png``: per rank, a bar of the phases stacked to the step's time, and beside it the
    time collectives were in flight."""
    plt = _pyplot()
    names, ranks = phases["phases"], sorted(phases["ranks"].items(), key=lambda item: int(item[0]))
    first, last = ranks[0][1]["steps"]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ranks) + 3), 4))
    xs = list(range(len(ranks)))
    bottom = [0.0] * len(ranks)
    for name in names:
        heights = [f["phases_s"][name] * 1e3 for _, f in ranks]
        ax.bar(
            xs, heights, width=0.5, bottom=bottom, label=name.replace("_", " "), color=PHASE_COLOURS.get(name)
        )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.bar([x + 0.4 for x in xs], [f["collectives_s"] * 1e3 for _, f in ranks], width=0.2, color="tab:red",
           hatch="//", alpha=0.6, label="collectives (overlap)")  # fmt: skip
    ax.set_xticks(xs, [f"rank {rank}" for rank, _ in ranks])
    ax.set_ylabel("ms per step")
    ax.set_title(f"{run_dir.name}: where a step's time goes (steps {first}-{last})", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.grid(alpha=0.3, axis="y")
    path = run_dir / "report" / "step_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0 if argv else 2
    target = Path(argv[0])
    if (target / ledger.FILE).is_file():
        data, rows = trial_rows(target)
        print_table(data, rows)
        written = plot_sweep(target, data, rows)
    elif (target / rundir.METRICS_FILE).is_file():
        state = read_json(target / rundir.STATE_FILE) or {}
        summary = state.get("summary") or {}
        shown = [("train/loss", summary.get("train_loss")), *(summary.get("validation") or {}).items()]
        print(f"run {state.get('name', target.name)}: {state.get('status', '?')}, {summary.get('steps', '?')} steps"
              + "".join(f", {k} {v:.4f}" for k, v in shown if isinstance(v, (int, float))))  # fmt: skip
        written = plot_run(target)
        phases = read_json(target / rundir.PROFILE_DIR / rundir.PHASES_FILE)
        if phases and phases.get("ranks"):
            print_phases(phases)
            written.append(plot_phases(target, phases))
    else:
        print(f"error: {target}: expected a sweep directory (sweep.json) or a run directory (metrics.csv)",
              file=sys.stderr)  # fmt: skip
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
