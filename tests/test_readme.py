"""Every command shown in README.md, in `trainer --help` and in `trainer submit --help` runs as written.

The commands are read from the README's ```bash blocks (and the help texts' examples) each time, so a README
change that breaks an example fails here. What the test changes, and why, is the table below and nothing else:

- SHORT: every training run is cut to 3 steps with one validation batch (the commands' own keys stay; a key
  given twice takes its last value). Random and Optuna sweeps run 2 trials.
- SMALLER: hardware this machine and the 2-node, 2-core SLURM test cluster do not have (GPUs, 8 devices, 4
  nodes) is asked for at the size they have: at most 2 devices, 2 nodes, CPUs (by `trainer train` and
  `trainer submit`; `trainer plan` plans any hardware without using it).
- Placeholders (`runs/<run>`, `<hash>`, a run's name with the README's hash, `step-N.ckpt`) are the newest
  matching run, sweep or checkpoint made by the commands before.
- NOT_RUN: the few commands that are not the product's (the test suite itself, benchmarks, W&B's own
  `wandb login`/`wandb sync`, which need an account and the internet), each with its reason.
- `trainer submit` commands run against the project's SLURM test cluster (`tests/test_slurm.py::test_submit_...`,
  slurm tier); the jobs they submit are cancelled once the scheduler has accepted them (the slurm tests run
  such jobs to the end).

The README's quoted outputs are checked too: the quickstart's summary has the lines the command prints (figures
aside), and each `$ trainer ...` example of bad input prints the README's line.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, clean_env

README = REPO / "README.md"
BIN = Path(sys.executable).parent

SHORT = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
SHORT_SWEEP = ["sweep.num_trials=2"]  # random and Optuna sweeps only (a grid has its own size)
SMALLER = [
    (r"trainer\.devices=(?:[3-9]|\d{2,})\b", "trainer.devices=2"),
    (r"trainer\.num_nodes=(?:[3-9]|\d{2,})\b", "trainer.num_nodes=2"),
    (r"trainer\.accelerator=gpu\b", "trainer.accelerator=cpu"),
    (r"\s*cluster\.gpus_per_node=\d+", ""),
    (r"cluster\.partition=gpu\b", "cluster.partition=debug"),
]
ON_TEST_CLUSTER = ["cluster.cpus_per_task=1"]  # its nodes have 2 cores; the README's runs ask for 2 tasks
NOT_RUN = {
    "make test": "the test suite itself",
    "make test-unit": "a part of the test suite",
    "make lint": "run by make test",
    "make format": "rewrites the project's files",
    "make bench": "a benchmark: minutes, and its figures are the point",
    "wandb login": "W&B's own command; needs a W&B account and the internet",
    "wandb sync": "W&B's own command; needs a W&B account and the internet",
}
# Commands whose README comment says they are refused.
EXPECTED_EXIT = {"resume=never": 2}


@dataclass
class Command:
    text: str  # as written, comment stripped, continuation lines joined
    where: str  # README.md:<line> or the help text
    cd: str = ""  # a folder that an earlier `cd` of its block moved into
    env: dict[str, str] = field(default_factory=dict)


def strip_comment(line: str) -> str:
    """The line without its shell comment (a `#` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(kind: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced block of README.md whose fence says ``kind`` ("" for none)."""
    blocks, current, start, fence = [], [], 0, None  # fence: the open block's language, None outside
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```") and fence is None:
            fence, current, start = line[3:].strip(), [], number + 1
        elif line.startswith("```"):
            if fence == kind:
                blocks.append((start, current))
            fence = None
        elif fence is not None:
            current.append(line)
    return blocks


def shell_commands(lines: list[str], first: int, where: str) -> list[Command]:
    """The commands of a block of shell lines: continuations joined, comments and `cd` applied."""
    out, cd, joined, start = [], "", "", first
    for offset, raw in enumerate(lines):
        line = strip_comment(raw)
        if not joined:
            start = first + offset
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        text, joined = " ".join((joined + line).split()), ""
        if not text:
            continue
        if text.startswith("cd "):
            cd = text[3:].strip()
            continue
        words = shlex.split(text)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        out.append(Command(shlex.join(words) if env else text, f"{where}:{start}", cd, env))
    return out


def readme_commands() -> list[Command]:
    return [c for start, lines in readme_blocks("bash") for c in shell_commands(lines, start, "README.md")]


def help_commands() -> list[Command]:
    """The example lines of `trainer --help`, `trainer submit --help` and `trainer plan --help`."""
    found = []
    for args in (["--help"], ["submit", "--help"], ["plan", "--help"]):
        text = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True).stdout
        examples = text.split("examples:", 1)[1].split("\n\n", 1)[0]
        lines = [line.strip() for line in examples.splitlines() if line.strip().startswith("trainer ")]
        found += shell_commands(lines, 1, "trainer " + " ".join(args))
    return found


def not_run(command: Command) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.text.startswith(prefix)), None)


# --- turning a command as written into the one run here -------------------------------------------------


def find(pattern: str, cwd: Path, marker: str | None, first: bool) -> Path | None:
    """The newest (or the first made) path matching ``pattern`` that holds ``marker``."""
    paths = [Path(p) for p in glob.glob(pattern, root_dir=cwd)]
    if marker:
        paths = [p for p in paths if (cwd / p / marker).exists()]
    pick = min if first else max
    return pick(paths, key=lambda p: (cwd / p / (marker or "")).stat().st_mtime, default=None)


def resolve(text: str, cwd: Path) -> str | None:
    """The command with its placeholders made real; None when a run it names does not exist yet."""

    def path(match: re.Match) -> str:
        written = match.group(0)
        pattern = re.sub(r"<[^>]+>", "*", written)
        # a name with the README's own hash is the first run of that name (the README quotes the
        # quickstart's own run); a <placeholder> is the newest
        first = pattern == written and bool(re.search(r"-[0-9a-f]{8}(?=/|$)", written))
        pattern = re.sub(r"-[0-9a-f]{8}(?=/|$)", "-*", pattern)
        pattern = re.sub(r"step-\d{8}\.ckpt", "step-*.ckpt", pattern)
        if pattern == written:
            return written
        if pattern.endswith(".ckpt"):
            marker = None
        elif Path(pattern).name.startswith("sweep-"):
            marker = "sweep.json"
        else:
            marker = "run.json"
        found = find(pattern, cwd, marker, first)
        if found is None:
            raise LookupError(written)
        return str(found)

    try:
        text = re.sub(r"runs/[^\s'\"]*", path, text)
        if "run.name=<" in text:
            run = find("runs/*", cwd, "run.json", first=False)
            if run is None:
                raise LookupError("run.name")
            text = re.sub(r"run\.name=<[^>]+>", f"run.name={run.name}", text)
    except LookupError:
        return None
    return text


def as_run_here(command: Command) -> str:
    text = command.text
    if text.startswith("make quickstart"):  # the Makefile's target is `trainer train $(ARGS)` after set-up
        text = "trainer train" + text[len("make quickstart") :]
    words = text.split()
    if words[:2] in (["trainer", "train"], ["trainer", "submit"]):  # `trainer plan` uses no hardware
        for pattern, replacement in SMALLER:
            text = re.sub(pattern, replacement, text)
        words = text.split()
    if words[:2] in (["trainer", "train"], ["trainer", "submit"]) and "--help" not in words:
        text += " " + " ".join(SHORT)
        if re.search(r"\bsweep=(random|optuna)\b", text):
            text += " " + " ".join(SHORT_SWEEP)
    if words[:2] == ["trainer", "submit"]:
        text += " " + " ".join(ON_TEST_CLUSTER)
    return text


@dataclass
class Workspace:
    """A fresh user's machine: a home folder with some text of their own, the byo example copied out."""

    root: Path
    env: dict

    @classmethod
    def make(cls, tmp_path: Path, **extra: str) -> Workspace:
        home, work = tmp_path / "home", tmp_path / "work"
        (home / "books").mkdir(parents=True)
        for i in range(3):
            (home / "books" / f"book{i}.txt").write_text(f"Chapter {i}.\n" + "It was a dark night. " * 400)
        shutil.copytree(REPO / "examples" / "byo", work / "elsewhere",
                        ignore=shutil.ignore_patterns("runs", "__pycache__"))  # fmt: skip
        scratch = tmp_path / "_tmp"
        scratch.mkdir()
        env = clean_env(scratch, drop=("WANDB_API_KEY", "WANDB_MODE", "PYTHONPATH"), HOME=str(home), **extra)
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor")
        return cls(work, env)

    def run(self, command: Command, text: str) -> subprocess.CompletedProcess:
        cwd = self.root / command.cd
        return subprocess.run(["bash", "-c", text], cwd=cwd, env={**self.env, **command.env},
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def run_all(
        self, commands: list[Command], after=None
    ) -> tuple[list[str], list[tuple[Command, str, str]]]:
        """Run each command in order (one naming a run that a later command makes waits for it), then
        ``after(output)``; returns the failures and what ran."""
        failures, ran, done, waiting = [], [], set(), list(commands)
        for _ in range(2):
            still = []
            for command in waiting:
                text = resolve(as_run_here(command), self.root / command.cd)
                if text is None:
                    still.append(command)
                    continue
                if (command.cd, text) in done:  # the help repeats some of the README's commands
                    continue
                done.add((command.cd, text))
                result = self.run(command, text)
                want = next((code for key, code in EXPECTED_EXIT.items() if key in command.text), 0)
                ran.append((command, text, result.stdout + result.stderr))
                if after:
                    after(result.stdout + result.stderr)
                if result.returncode != want:
                    failures.append(f"{command.where}: `{command.text}` (ran: `{text}`) exited "
                                    f"{result.returncode}, not {want}:\n{(result.stdout + result.stderr)[-3000:]}")  # fmt: skip
            waiting = still
        failures += [f"{c.where}: `{c.text}` names a run no command of the README makes" for c in waiting]
        return failures, ran


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_readme_has_commands_and_each_is_run_or_says_why_not():
    commands = readme_commands() + help_commands()
    texts = [c.text for c in commands]
    assert (
        len(commands) > 40
        and "trainer train" in texts
        and "trainer submit -m cluster=slurm optim.lr=1e-3,3e-4" in texts
    )
    for command in commands:
        first = command.text.split()[0]
        assert first in ("trainer", "make", "wandb"), (
            f"{command.where}: `{command.text}`: a command this test cannot run"
        )
        if first != "trainer":
            assert not_run(command) or command.text.startswith("make quickstart"), command.where
    # every preset for CPUs is trained by some README command (the default one by plain `trainer train`)
    presets = Path(REPO, "conf", "experiment").glob("*.yaml")
    for preset in (p.stem for p in presets if "accelerator: gpu" not in p.read_text()):
        trained = [
            c for c in commands if c.text.startswith("trainer train") and f"experiment={preset}" in c.text
        ]
        assert trained or preset == "gpt_quickstart", f"no README command trains experiment={preset}"
    byo = [c for c in commands if c.cd]
    assert byo and all(c.cd == "elsewhere" and c.env == {"PYTHONPATH": "."} for c in byo)
    # what the test changes is what the module's docstring says
    assert as_run_here(
        Command("trainer train trainer.devices=8 trainer.accelerator=gpu cluster.gpus_per_node=8", "")
    ) == ("trainer train trainer.devices=2 trainer.accelerator=cpu " + " ".join(SHORT))


@pytest.mark.slow
def test_every_readme_and_help_command_runs_as_written(tmp_path):
    work = Workspace.make(tmp_path)
    commands = [
        c
        for c in readme_commands() + help_commands()
        if not not_run(c) and not c.text.startswith("trainer submit")
    ]
    failures, ran = work.run_all(commands)
    assert not failures, f"{len(failures)} of {len(commands)} commands failed:\n\n" + "\n\n".join(failures)

    # Outputs quoted in the README are what the commands print, figures, hashes and alignment aside: the
    # quickstart's summary and the memory plan.
    for first_words, command in (("finished ", "make quickstart"), ("plan: ", "trainer plan")):
        output = next(out for c, _, out in ran if c.text == command)
        (quoted,) = [lines for _, lines in readme_blocks("") if lines and lines[0].startswith(first_words)]
        for line in quoted:
            assert any(re.fullmatch(shape_of(line), p) for p in output.splitlines()), (
                f"README's line {line!r} (of `{command}`) is not printed:\n{output}"
            )


def shape_of(line: str) -> str:
    """A pattern for a quoted output line: a hash stays a hash, a figure is any figure, runs of spaces any
    run (columns align to the figures' widths), and the words as written."""
    parts = re.split(r"(-[0-9a-f]{8}\b|\d[\d,]*(?:\.\d+)?| {2,})", line)
    pattern = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern.append(re.escape(part))
        elif part.startswith("-"):
            pattern.append("-[0-9a-f]{8}")
        elif part.startswith(" "):
            pattern.append(" +")
        else:
            pattern.append(r"[\d,]+(?:\.\d+)?")
    return "".join(pattern)


@pytest.mark.slow
def test_the_readme_bad_input_examples_print_the_readme_lines(tmp_path):
    work = Workspace.make(tmp_path)
    (transcript,) = [lines for _, lines in readme_blocks("") if lines and lines[0].startswith("$ trainer")]
    pairs = list(zip(transcript[::2], transcript[1::2], strict=True))
    assert len(pairs) >= 5
    for prompt, expected in pairs:
        command = Command(prompt[2:], "README.md")
        result = work.run(command, command.text)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert lines, prompt
        written = expected.removesuffix("...")
        assert lines[-1].startswith(written) if expected.endswith("...") else lines[-1] == written, (
            prompt,
            lines[-1],
        )
