"""A run's identity and the layout of its directory; shared by the training and the launch side.

A run is named ``<experiment>-<hash>`` where the hash covers every key that changes what is trained, so the
same command always finds the same directory: that is what resume and a SLURM requeue rely on. Only rank zero
writes here. Nothing in this module imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.checkpoint.manifest import find_latest_valid, read_manifest, verify
from trainer.config.errors import ConfigError
from trainer.files import atomic_write_text, read_json
from trainer.secrets import redact, redact_override

# Keys that say where or how a run is watched, not what is trained: they do not change its identity.
IDENTITY_EXCLUDED = (
    "run", "resume", "logger", "checkpoint", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "data.num_workers", "strategy.timeout_s", "strategy.step_timeout_s", "cluster", "sweep", "model.compile",
    "profile",
)  # fmt: skip
# Keys that must match for a checkpoint in the run directory to be continued (others may change, e.g. a
# longer max_steps continues a finished run).
RESUME_MUST_MATCH = ("model", "data", "seed")

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
STATE_FILE = "run.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
SLURM_DIR = "slurm"
"""Job scripts, job logs and the job ledger of a run submitted to SLURM."""
JOBS_FILE = "jobs.json"
LOGS_DIR = "logs"
PROFILE_DIR = "profile"
"""A profiler window's traces, operator tables and ``phases.json`` (``trainer.metrics.profile``)."""
PHASES_FILE = "phases.json"
FILE_SYSTEM_ERRORS = (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR,
    errno.EISDIR,
)  # fmt: skip
"""Errors of the disk or of its permissions, not of the code: said in one line, without a traceback."""


def jobs_file(run_dir: Path) -> Path:
    """The ledger of the SLURM jobs that ran a run (written by ``trainer submit``)."""
    return run_dir / SLURM_DIR / JOBS_FILE


LAST_CHECKPOINT = "last.ckpt"
LOCK_FILE = ".lock"
"""Held by the process that trains the run (``trainer.runlock``)."""
NOT_A_RUN = (SLURM_DIR, LOCK_FILE)
"""What a run directory may hold before its run starts."""


def _drop(cfg: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(cfg.get(head), dict):
            _drop(cfg[head], rest)
    else:
        cfg.pop(head, None)


def identity_view(cfg: dict) -> dict:
    """The part of a resolved config (plain containers) that defines the run (secret values redacted)."""
    view = json.loads(json.dumps(redact(cfg), default=str))
    for key in IDENTITY_EXCLUDED:
        _drop(view, key)
    return view


def config_hash(cfg: dict) -> str:
    blob = json.dumps(identity_view(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunPaths:
    name: str
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def overrides(self) -> Path:
        return self.dir / OVERRIDES_FILE

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def slurm(self) -> Path:
        return self.dir / SLURM_DIR

    @property
    def profile(self) -> Path:
        return self.dir / PROFILE_DIR

    @property
    def logs(self) -> Path:
        """Each local rank's output (``rank-<N>.log``), written by the local launcher."""
        return self.dir / LOGS_DIR


def label(cfg: dict, experiment: str | None) -> str:
    """What a run (or a sweep) is named after: its preset, or else its model's class (``LitAutoEncoder``)."""
    return experiment or str((cfg.get("model") or {}).get("_target_") or "run").rsplit(".", 1)[-1]


def resolve_paths(cfg: dict, experiment: str | None) -> RunPaths:
    """``run.name`` and ``run.dir`` with their defaults filled in."""
    run = cfg.get("run", {})
    name = run.get("name") or f"{label(cfg, experiment)}-{config_hash(cfg)}"
    if "/" in name or name in (".", ".."):
        raise ConfigError("run.name", name, "a name without '/' (set run.dir for a path)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ConfigError("run.name", name, "a name without control characters (newlines, tabs, escapes)")
    directory = Path(run.get("dir") or Path(run.get("root", "runs")) / name)
    return RunPaths(name=name, dir=directory)


def next_free(paths: RunPaths) -> RunPaths:
    """``paths``, or the first ``<name>-N`` beside it (N = 2, 3, ...) that holds no run yet."""
    candidate, n = paths, 1
    while candidate.dir.exists() and any(p.name not in NOT_A_RUN for p in candidate.dir.iterdir()):
        n += 1
        candidate = RunPaths(f"{paths.name}-{n}", paths.dir.with_name(f"{paths.dir.name}-{n}"))
    return candidate


@dataclass(frozen=True)
class Plan:
    """What a run does with its directory."""

    action: str
    """``fresh``: start at step 0; ``resume``: continue from ``checkpoint``; ``done``: finished already."""
    checkpoint: str | None = None
    notes: tuple[str, ...] = ()
    """One-line remarks for the user (checkpoints skipped as invalid, config changes allowed)."""


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def resume_identity(cfg: dict) -> dict:
    """The keys a checkpoint must agree on to be continued: recorded in every checkpoint's manifest."""
    view = identity_view(cfg)
    return {k: view.get(k) for k in RESUME_MUST_MATCH}


def _check_same(key: str, where: str, old: dict, new: dict, allow: bool) -> list[str]:
    changed = differing_keys(resume_identity(old), resume_identity(new))
    if not changed:
        return []
    shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
    if not allow:
        raise ConfigError(
            key, where, f"a checkpoint of the same model/data/seed; these differ: {shown} "
            "(checkpoint.allow_config_change=true continues anyway)",
        )  # fmt: skip
    return [f"continuing although these differ from the checkpoint's config: {shown}"]


def _check_looks_like_checkpoint(path: Path) -> None:
    """A checkpoint without a manifest (made elsewhere) is at least a torch.save file (a zip archive) or a
    sharded checkpoint directory (its ``.metadata``), or it is refused before anything starts."""
    import zipfile

    if path.is_dir() and (path / ".metadata").is_file():
        return
    if path.is_file() and zipfile.is_zipfile(path):
        return
    what = "a directory without .metadata" if path.is_dir() else "not a torch.save file"
    raise ConfigError(
        "resume", str(path), f"a checkpoint file or a sharded checkpoint directory (this is {what})"
    )


def plan(
    paths: RunPaths, cfg: dict, resume: str, *, rank_zero: bool = True, allow_config_change: bool = False
) -> Plan:
    """Decide from what is on disk; refuse anything that would overwrite another run's files.

    Only rank zero checks that a new run's directory is free: the other ranks may look after rank zero has
    begun to write it.
    """
    if resume not in ("auto", "never"):
        path = Path(resume)
        manifest = read_manifest(path)
        notes: list[str] = []
        if manifest is not None:
            reason = verify(path)
            if reason is not None:
                raise ConfigError("resume", resume, f"a valid checkpoint (this one: {reason})")
            notes = _check_same("resume", resume, {**manifest.get("identity", {})}, cfg, allow_config_change)
        else:
            _check_looks_like_checkpoint(path)
            notes = [f"{resume} has no manifest: its config cannot be checked against this run's"]
        return Plan("resume", resume, tuple(notes))
    if paths.dir.exists() and not paths.dir.is_dir():
        raise ConfigError("run.dir", str(paths.dir), "a directory (this is a file)")
    state = read_json(paths.state)
    if state is None:
        # The job script and log folder that `trainer submit` writes before the job starts is not a run, nor
        # the lock file of the process that is about to start it.
        if rank_zero and paths.dir.exists() and any(p.name not in NOT_A_RUN for p in paths.dir.iterdir()):
            raise ConfigError(
                "run.dir", str(paths.dir), "a new or empty directory, or a run directory (no run.json here)"
            )
        return Plan("fresh")
    if resume == "never" and rank_zero:
        raise ConfigError("resume", "never", f"auto, or a new run.name ({paths.dir} already holds a run)")
    old_cfg = yaml.safe_load(paths.config.read_text()) if paths.config.exists() else {}
    notes = _check_same("run.dir", str(paths.dir), old_cfg, cfg, allow_config_change)
    unchanged = not differing_keys(identity_view(old_cfg), identity_view(cfg))
    if state.get("status") == "finished" and unchanged:
        return Plan("done")
    found = find_latest_valid(paths.checkpoints)
    notes += [f"checkpoint {p} is not valid ({why}); using an older one" for p, why in found.rejected]
    if found.path is not None:
        return Plan("resume", str(found.path), tuple(notes))
    if found.rejected:
        # Progress was made and cannot be continued: starting again over it must be the user's choice.
        path, why = found.rejected[0]
        raise ConfigError(
            "run.dir", str(paths.dir),
            f"a run directory with a valid checkpoint; none of its {len(found.rejected)} checkpoint(s) is valid "
            f"(newest: {path.name}: {why}); to start again from step 0 on purpose, move {paths.checkpoints} aside",
        )  # fmt: skip
    if state.get("status") != "finished":
        notes.append(
            f"the earlier attempt ({state.get('status')}) saved no checkpoint: training starts again from step 0"
        )
    return Plan("fresh", None, tuple(notes))


# ---------------------------------------------------------------------------------------------- writing


def git_info(cwd: Path | None = None) -> dict:
    """Commit and dirty flag of the code being run (the project's checkout, else the current directory)."""
    here = cwd or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions() -> dict:
    from importlib import metadata

    names = (
        "trainer",
        "torch",
        "pytorch-lightning",
        "hydra-core",
        "omegaconf",
        "numpy",
        "scikit-learn",
        "wandb",
    )
    versions = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def wandb_id(paths: RunPaths) -> str:
    """The W&B run of a run directory: the id its run.json recorded when the directory was created, so that
    everything that continues the directory (a resume, a requeue, a longer run whose derived name changed)
    continues the same W&B run; for a new directory, one made from its name plus a hash of its path."""
    recorded = ((read_json(paths.state) or {}).get("wandb") or {}).get("id")
    return str(recorded) if recorded else _new_wandb_id(paths)


def _new_wandb_id(paths: RunPaths) -> str:
    digest = hashlib.sha256(str(paths.dir.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', paths.name)[:48]}-{digest}"


def start(paths: RunPaths, cfg: dict, overrides: list[str], plan_: Plan, seed: int, world_size: int) -> None:
    """Rank zero, before training: write the config, the overrides and the run's state file."""
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    cfg, overrides = redact(cfg), [redact_override(o) for o in overrides]
    if paths.config.exists():
        old = paths.config.read_text()
        new = yaml.safe_dump(cfg, sort_keys=False)
        if old != new:  # an allowed change (e.g. longer max_steps): keep what the earlier attempt used
            n = len(list(paths.dir.glob("config.attempt-*.yaml"))) + 1
            atomic_write_text(paths.dir / f"config.attempt-{n}.yaml", old)
    atomic_write_text(paths.config, yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(paths.overrides, yaml.safe_dump(list(overrides)))
    state = read_json(paths.state) or {"name": paths.name, "created": time.time(), "attempts": []}
    state.setdefault("wandb", {}).setdefault("id", _new_wandb_id(paths))  # kept if recorded before
    state.update(status="running", seed=seed, git=git_info(), versions=package_versions())
    state["attempts"].append(
        {
            "started": time.time(),
            "action": plan_.action,
            "checkpoint": plan_.checkpoint,
            "argv": [redact_override(a) for a in sys.argv],
            "overrides": list(overrides),
            "host": platform.node(),
            "world_size": world_size,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
    )
    atomic_write_text(paths.state, json.dumps(state, indent=2))


def annotate(paths: RunPaths, **fields: Any) -> None:
    """Rank zero: add fields to run.json (e.g. the W&B run id)."""
    state = read_json(paths.state) or {"name": paths.name, "attempts": []}
    state.update(fields)
    atomic_write_text(paths.state, json.dumps(state, indent=2))


def finish(paths: RunPaths, status: str, summary: dict | None = None, cause: str | None = None) -> None:
    """Rank zero, after training (or on failure): record the outcome (and, for a failure, its cause)."""
    state = read_json(paths.state) or {"name": paths.name, "attempts": []}
    state["status"] = status
    if state["attempts"]:
        state["attempts"][-1]["ended"] = time.time()
        state["attempts"][-1]["status"] = status
        if cause:
            state["attempts"][-1]["cause"] = cause
    if summary is not None:
        state["summary"] = summary
    atomic_write_text(paths.state, json.dumps(state, indent=2))


def record_failure(paths: RunPaths, cause: str | BaseException) -> None:
    """Mark a started run failed, with its cause in one line, as far as the disk still allows (a full disk
    may not)."""
    if not paths.state.exists():
        return  # it never started: there is no run to mark
    if isinstance(cause, BaseException):
        first = (str(cause).strip().splitlines() or [""])[0]
        cause = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    with contextlib.suppress(OSError):
        finish(paths, "failed", cause=cause)


def describe_os_error(err: OSError) -> str:
    """``could not write runs/x/checkpoints/step-8.ckpt: No space left on device``, from an OSError."""
    if str(err).startswith("could not"):  # already says what (trainer.checkpoint.io.CheckpointWriteError)
        return str(err)
    where = f" {err.filename}" if err.filename else ""
    return f"could not write{where}: {err.strerror or err}"


def metric_column(columns: Any, key: str) -> str:
    """The metrics.csv column of metric ``key``: a metric a module logs both per step and per epoch is
    written by Lightning as ``<key>_step`` and ``<key>_epoch``, and ``<key>`` (the name in the module's code)
    then means the ``_epoch`` one."""
    return key if key in columns or f"{key}_epoch" not in columns else f"{key}_epoch"


def last_metrics(path: Path, keys: tuple[str, ...] = ("train/loss", "val/loss")) -> dict:
    """The newest step and the newest value of each of ``keys`` (see ``metric_column``) in a run's
    metrics.csv ({} if unreadable)."""
    import csv

    out: dict = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("step"):
                    out["step"] = int(float(row["step"]))
                for key in keys:
                    value = row.get(metric_column(row, key))
                    if value:
                        out[key] = float(value)
    except (OSError, ValueError, csv.Error):
        pass
    return out
