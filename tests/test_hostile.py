"""Hostile inputs and faults, table-driven: each ends with the expected exit code and one line that starts with
the expected words, and nothing in the case's folder is written, changed or removed (README: "Promises").

The table runs through the real entry point (``trainer.cli.main``), every case in a folder of its own, all in
one process (each ``trainer`` process would import torch and Lightning again for a one-line answer). A real
short run, made once, gives the cases that need a run directory something true to act on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import clean_env

SECRET = "s3cr3t-VALUE-0123456789"
"""Passed in secret-named overrides and environment variables: it must appear in no output."""

BASE = ["experiment=digits_mlp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    starts: str
    """The first words of the one line the case prints (after ``error: ``)."""
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(where: Path) -> None:
        path = where / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def copy_run(base: Path, change: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """The shared real run as ``runs/base`` of the case, changed by ``change``."""

    def setup(where: Path) -> None:
        shutil.copytree(base, where / "runs" / "base")
        if change is not None:
            change(where / "runs" / "base")

    return setup


def truncate_all(run: Path) -> None:
    for ckpt in (run / "checkpoints").glob("step-*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])


def drop_manifests(run: Path) -> None:
    for manifest in (run / "checkpoints").glob("*.ckpt.json"):
        manifest.unlink()


def crafted_pickle(marker: Path) -> bytes:
    """A pickle that, unpickled, runs a shell command creating ``marker``."""
    return (
        b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    )  # protocol 0: GLOBAL os.system, a tuple of one string, REDUCE


def crafted_dcp(where: Path) -> None:
    """A directory that looks like a sharded (DCP) checkpoint whose ``.metadata`` would run a command."""
    directory = where / "evil.ckpt"
    directory.mkdir()
    (directory / ".metadata").write_bytes(crafted_pickle(where / "PWNED"))
    (directory / "__0_0.distcp").write_bytes(b"\0" * 64)


def cases(base: Path) -> list[Case]:
    train = ["train", *BASE]
    submit = ["submit", "--dry-run", "cluster=slurm", *BASE]
    return [
        # --- numbers that must be finite (finding 5)
        Case("lr nan", [*train, "optim.lr=nan"], 2, "optim.lr=nan: expected a finite number"),
        Case(
            "lr inf (sgd)", [*train, "optim=sgd", "optim.lr=inf"], 2, "optim.lr=inf: expected a finite number"
        ),
        Case(
            "every_n_minutes nan",
            [*train, "checkpoint.every_n_minutes=nan"],
            2,
            "checkpoint.every_n_minutes=nan",
        ),
        Case(
            "clip inf",
            [*train, "trainer.gradient_clip_val=inf"],
            2,
            "trainer.gradient_clip_val=inf: expected a finite",
        ),
        Case("weight decay nan", [*train, "optim.weight_decay=-nan"], 2, "optim.weight_decay=nan: expected"),
        Case(
            "val interval inf",
            [*train, "trainer.val_check_interval=inf"],
            2,
            "trainer.val_check_interval=inf",
        ),
        Case(
            "max_steps inf",
            [*train, "trainer.max_steps=inf"],
            2,
            "trainer.max_steps=inf: expected an integer",
        ),
        Case("step timeout nan", [*train, "strategy.step_timeout_s=nan"], 2, "strategy.step_timeout_s=nan"),
        # --- config files that are not YAML, flags anywhere (finding 5)
        Case(
            "broken yaml",
            ["train", "--config-dir", "cfg", "experiment=broken"],
            2,
            "",
            write("cfg/experiment/broken.yaml", "trainer:\n  max_steps: [1, 2\n"),
        ),
        Case(
            "binary yaml",
            ["train", "--config-dir", "cfg", "experiment=blob"],
            2,
            "cfg/experiment/blob.yaml: not a YAML file",
            write("cfg/experiment/blob.yaml", bytes(range(256)) * 4),
        ),
        Case(
            "tab-indented yaml",
            ["train", "--config-dir", "cfg", "experiment=tabs"],
            2,
            "",
            write("cfg/experiment/tabs.yaml", "trainer:\n\tmax_steps: 3\n"),
        ),
        Case(
            "flags after overrides",
            ["train", "model=mlp", "--config-dir", "cfg", "data=digits", "--cfg", "job"],
            0,
            "",
            write("cfg/.keep", ""),
        ),
        Case("override parse error", [*train, "trainer.max_steps=[1,"], 2, "cannot parse override"),
        # --- resume= that is not a checkpoint (finding 5)
        Case(
            "resume text file",
            [*train, "resume=notes.txt"],
            2,
            "resume=notes.txt: expected a checkpoint file",
            write("notes.txt", "hello\n"),
        ),
        Case(
            "resume empty file",
            [*train, "resume=empty.ckpt"],
            2,
            "resume=empty.ckpt: expected a checkpoint file",
            write("empty.ckpt", b""),
        ),
        Case(
            "resume a pickle",
            [*train, "resume=old.pt"],
            2,
            "resume=old.pt: expected a checkpoint file",
            write("old.pt", b"\x80\x04K\x01."),
        ),
        Case(
            "resume dir without metadata",
            [*train, "resume=shards", "strategy=fsdp"],
            2,
            "resume=shards: expected a checkpoint file",
            write("shards/__0_0.distcp", b"x"),
        ),
        Case(
            "resume missing",
            [*train, "resume=nope.ckpt"],
            2,
            "resume=nope.ckpt: expected auto, never or the path",
        ),
        # --- a sharded checkpoint that would run code (finding 1)
        Case(
            "crafted DCP resume",
            [*train, "resume=evil.ckpt", "strategy=fsdp"],
            2,
            "resume=evil.ckpt",
            crafted_dcp,
        ),
        Case("crafted DCP export", ["export", "evil.ckpt"], 2, "", crafted_dcp),
        Case(
            "crafted file export",
            ["export", "evil.pt"],
            2,
            "",
            write("evil.pt", crafted_pickle(Path("PWNED"))),
        ),
        # --- imports (finding 9)
        Case(
            "target typo",
            [*train, "model._target_=trainer.models.mlp.MLPModul"],
            2,
            "model._target_=trainer.models.mlp.MLPModul: expected an importable class or function: trainer.models.mlp has no MLPModul (did you mean",
        ),
        Case(
            "target not on PYTHONPATH",
            [*train, "model._target_=mymodels.Net"],
            2,
            "model._target_=mymodels.Net: expected an importable class",
        ),
        Case(
            "callback not importable",
            [*train, "+callbacks.x._target_=nosuch.Callback"],
            2,
            "callbacks.x._target_=nosuch.Callback",
        ),
        Case(
            "user module failing on import",
            [*train, "model._target_=broken_mod.Net"],
            2,
            "model._target_=broken_mod.Net: expected an importable class or function (ZeroDivisionError",
            write("broken_mod.py", "1 / 0\n"),
            {"PYTHONPATH": "."},
        ),
        # --- the run directory (findings 6, 7)
        Case(
            "run.dir is a file",
            [*train, "run.dir=taken"],
            2,
            "run.dir=taken: expected a directory (this is a file)",
            write("taken", "x"),
        ),
        Case(
            "run.root under a file",
            [*train, "run.root=taken/runs"],
            2,
            "run.dir=taken/runs/",
            write("taken", "x"),
        ),
        Case("run.name with newline", [*train, "run.name='a\nb'"], 2, "run.name="),
        Case("run.name is ..", [*train, "run.name=.."], 2, "run.name=..: expected a name without '/'"),
        Case(
            "all checkpoints truncated",
            [*train, "run.name=base"],
            2,
            "run.dir=runs/base: expected a run directory with a valid checkpoint",
            copy_run(base, truncate_all),
        ),
        Case(
            "all manifests deleted",
            [*train, "run.name=base"],
            2,
            "run.dir=runs/base: expected a run directory with a valid checkpoint",
            copy_run(base, drop_manifests),
        ),
        Case(
            "resume=never on a run",
            [*train, "run.name=base", "resume=never"],
            2,
            "resume=never: expected auto, or a new run.name",
            copy_run(base),
        ),
        Case(
            "not a run dir",
            [*train, "run.dir=thesis"],
            2,
            "run.dir=thesis: expected a new or empty directory",
            write("thesis/chapter1.tex", "precious"),
        ),
        # --- memory (finding 5)
        Case(
            "model too big",
            ["train", "model.n_embd=1048576", "model.n_head=1", "trainer.accelerator=cpu"],
            2,
            "model=trainer.models.gpt.GPTModule: expected a model that fits",
        ),
        # --- secrets (finding 3): refused by submit in one line that does not show them; never echoed
        Case(
            "secret camelCase submit", [*submit, f"+model.accessKey={SECRET}"], 2, "model.accessKey=<hidden>"
        ),
        Case(
            "secret value submit",
            [*submit, f"run.name={SECRET}"],
            2,
            "run.name",
            env={"MY_API_TOKEN": SECRET},
        ),
        Case(
            "secret in a failing run",
            [*train, "+callbacks.bad._target_=builtins.dict", f"+callbacks.bad.api_key={SECRET}"],
            2,
            "callbacks.bad._target_=builtins.dict: expected a",
        ),
        # --- sbatch/srun options the template sets, in other spellings (finding 4)
        Case("srun -K0", [*submit, "cluster.srun=[-K0]"], 2, "cluster.srun="),
        Case("srun --kill-on=0", [*submit, "cluster.srun=['--kill-on=0']"], 2, "cluster.srun="),
        Case("sbatch --nod=3", [*submit, "cluster.sbatch=['--nod=3']"], 2, "cluster.sbatch="),
        Case("sbatch -N3", [*submit, "cluster.sbatch=[-N3]"], 2, "cluster.sbatch="),
        Case("sbatch --out", [*submit, "cluster.sbatch=['--out=x.log']"], 2, "cluster.sbatch="),
        # --- misc. bad usage
        Case("unknown command", ["trian"], 2, "command 'trian'"),
        Case("export of nothing", ["export", "nothing/here"], 2, ""),
        Case(
            "devices > cpus",
            [*train, "strategy=ddp", "trainer.devices=64"],
            2,
            "trainer.devices=64: expected at most",
        ),
    ]


RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, os, sys
    from trainer.cli import main

    for case in json.loads(sys.argv[1]):
        os.chdir(case["cwd"])
        saved = dict(os.environ)
        os.environ.update(case["env"])
        sys.path.insert(0, case["cwd"])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(case["args"])
            except BaseException as exc:  # a traceback is a failure of the case, shown whole
                import traceback
                code, _ = -1, traceback.print_exc(file=err)
        sys.path.remove(case["cwd"])
        os.environ.clear()
        os.environ.update(saved)
        print(json.dumps({"name": case["name"], "code": code, "out": out.getvalue(), "err": err.getvalue()}))
    """
)


def tree(where: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``where``: size and modification time (what "nothing written" compares)."""
    return {
        str(p.relative_to(where)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(where.rglob("*"))
    }


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One real short run with several checkpoints."""
    where = tmp_path_factory.mktemp("base")
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", *BASE, "trainer.max_steps=4", "checkpoint.every_n_steps=2",
         "run.name=base"],
        cwd=where, env=clean_env(where), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return where / "runs" / "base"


@pytest.mark.slow
def test_hostile_inputs_fail_in_one_line_and_write_nothing(tmp_path, base_run):
    table = cases(base_run)
    assert len(table) >= 40
    names = [c.name for c in table]
    assert len(set(names)) == len(names)
    folders, before = {}, {}
    for i, case in enumerate(table):
        folder = tmp_path / f"case{i:02d}"
        folder.mkdir()
        if case.setup is not None:
            case.setup(folder)
        folders[case.name], before[case.name] = folder, tree(folder)
    payload = [{"name": c.name, "args": c.args, "env": c.env, "cwd": str(folders[c.name])} for c in table]
    env = clean_env(tmp_path, WANDB_MODE="offline", SLURM_CONF="/nonexistent/slurm.conf")
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(payload)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    answers = {a["name"]: a for a in map(json.loads, result.stdout.splitlines()) if isinstance(a, dict)}
    assert len(answers) == len(table), result.stdout[-3000:] + result.stderr[-3000:]
    failures = []
    for case in table:
        answer, folder = answers[case.name], folders[case.name]
        lines = [line for line in answer["err"].splitlines() if line.strip()]
        shown = answer["out"] + answer["err"]
        if case.code == 0:
            ok = answer["code"] == 0 and not lines
        else:
            ok = (
                answer["code"] == case.code
                and len(lines) == 1
                and lines[0].startswith("error: " + case.starts)
            )
        if SECRET in shown:
            ok = False
        if tree(folder) != before[case.name]:
            ok = False
            shown += f"\n[changed: {sorted(set(tree(folder).items()) ^ set(before[case.name].items()))}]"
        if (folder / "PWNED").exists() or Path("PWNED").exists():
            ok = False
            shown += "\n[the crafted checkpoint ran its command]"
        if not ok:
            failures.append(f"{case.name}: exit {answer['code']} (expected {case.code}):\n{shown[-1500:]}")
    assert not failures, "\n\n".join(failures)
