"""SLURM: render the sbatch script of a run or a sweep, check the request, submit it, ask about jobs.

Imports neither torch nor Lightning: ``trainer submit --dry-run`` and ``trainer status`` stay fast on a
login node. The job itself runs ``trainer train`` once per task under ``srun``; training never imports this.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from trainer import exits
from trainer.config.errors import ConfigError
from trainer.config.schema import ClusterConfig
from trainer.launch import slurm_options

# What may appear in a value on an #SBATCH line: sbatch parses those lines itself (not the shell), so
# spaces, quotes and anything else that could split or extend a line are refused rather than escaped.
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_./:@%,=+\-\[\]&|!*~{}]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# Options the script sets (long names, as in sbatch's and srun's tables); each names the key that owns it.
# Refused in cluster.sbatch and cluster.srun in every spelling sbatch and srun accept (slurm_options).
_OWNED_OPTIONS = {
    "nodes": "trainer.num_nodes", "ntasks-per-node": "trainer.devices", "ntasks": "trainer.devices",
    "tasks-per-node": "trainer.devices", "ntasks-per-gpu": "trainer.devices",
    "ntasks-per-tres": "trainer.devices",
    "cpus-per-task": "cluster.cpus_per_task", "time": "cluster.time", "partition": "cluster.partition",
    "account": "cluster.account", "qos": "cluster.qos", "gres": "cluster.gres",
    "gpus-per-node": "cluster.gpus_per_node", "gpus": "cluster.gpus_per_node", "mem": "cluster.mem",
    "constraint": "cluster.constraint", "exclusive": "cluster.exclusive", "job-name": "cluster.job_name",
    "signal": "cluster.signal", "array": "cluster.array_parallelism", "output": "run.dir", "error": "run.dir",
    "chdir": "run.dir", "open-mode": "run.dir", "requeue": "cluster.max_requeues",
    "no-requeue": "cluster.max_requeues",
    "export": "your shell's environment (sbatch must pass it: it carries secrets such as WANDB_API_KEY)",
}  # fmt: skip
# The srun line's own: a rank that fails must end the whole job, not leave the others waiting in a collective.
_SRUN_OWNED = {**_OWNED_OPTIONS, "kill-on-bad-exit": "the template (a failed rank must end the whole job)"}

REQUEUE_EXIT = exits.PREEMPTED
"""The exit code with which a run asks to be requeued."""


@dataclasses.dataclass
class Trial:
    """One run of a job: the array task ``index`` of a sweep, or the only run of a plain job."""

    index: int
    overrides: list[str]
    """The overrides that make this trial (the sweep's own), as the user wrote them."""
    args: list[str]
    """Everything after ``trainer train`` in the job: config flags, all overrides, the pinned identity."""
    run_name: str
    run_dir: Path


@dataclasses.dataclass
class Job:
    """What one sbatch script asks for."""

    cluster: ClusterConfig
    nodes: int
    tasks_per_node: int
    job_name: str
    log_dir: Path
    workdir: Path
    what: str
    trials: list[Trial]
    array: list[int] | None = None
    """Array task indices to run (a sweep); ``None`` for a plain job."""
    python: str = ""
    all_trials: list[Trial] = dataclasses.field(default_factory=list)
    """A sweep's every trial (finished ones too): line ``i + 1`` of ``trials_file`` is trial ``i``'s."""
    array_offset: int = 0
    """Trial index of array task 0 (a sweep larger than MaxArraySize is several arrays: see split_array)."""

    def task_id(self, trial: Trial) -> int:
        """The array task that runs ``trial``."""
        return trial.index - self.array_offset

    @property
    def trials_file(self) -> Path:
        """A sweep's trial arguments, one line per trial, read by each array task (the script does not grow
        with the number of trials; SLURM's default max_script_size is 4 MB)."""
        return self.log_dir / "trials.args"


SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001


def split_array(job: Job, max_array_size: int) -> list[Job]:
    """The job as arrays whose task ids stay below ``max_array_size``: each array starts at its first trial
    (task 0, ``array_offset`` = that trial's index) and holds the trials up to ``max_array_size - 1`` after
    it. One job, unchanged, when every index fits."""
    if job.array is None or max(t.index for t in job.trials) < max_array_size:
        return [job]
    groups: list[list[Trial]] = []
    for t in sorted(job.trials, key=lambda t: t.index):
        if not groups or t.index - groups[-1][0].index >= max_array_size:
            groups.append([])
        groups[-1].append(t)
    return [
        dataclasses.replace(job, trials=g, array=[t.index - g[0].index for t in g], array_offset=g[0].index)
        for g in groups
    ]


def max_array_size() -> int | None:
    """``MaxArraySize`` of the controller that answers here (``scontrol show config``), or None."""
    try:
        proc = _run(["scontrol", "show", "config"], timeout=15)
    except SchedulerError:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.MULTILINE)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def trial_lines(job: Job) -> str:
    """``trials_file``'s text: trial ``i``'s ``trainer train`` arguments on line ``i + 1``, shell-quoted."""
    by_index = {t.index: t for t in job.all_trials or job.trials}
    lines = []
    for i in range(max(by_index) + 1):
        words = [shlex.quote(a) for a in by_index[i].args] if i in by_index else []
        if any("\n" in w or "\r" in w for w in words):
            raise ConfigError("overrides", by_index[i].overrides, "values without line breaks (in a sweep)")
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- checks


def sbatch_value(key: str, value: object) -> str:
    text = str(value)
    if not _SBATCH_VALUE.match(text):
        raise ConfigError(
            key, text,
            "a value without spaces, quotes or control characters (it goes on an #SBATCH line)",
        )  # fmt: skip
    return text


def check_words(key: str, words: list[str]) -> None:
    """Override values are passed to the job literally (quoted); line breaks are refused outright, since
    the script's comments and logs would show them as separate lines."""
    for word in words:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in word):
            raise ConfigError(
                key, word, "no control characters (newlines, tabs, escapes) in a job's arguments"
            )


def check_extra_options(cluster: ClusterConfig) -> None:
    checks = (("cluster.sbatch", cluster.sbatch, slurm_options.SBATCH, _OWNED_OPTIONS),
              ("cluster.srun", cluster.srun, slurm_options.SRUN, _SRUN_OWNED))  # fmt: skip
    for key, options, table, owned in checks:
        for option in options:
            word = str(option)
            if not word.startswith("-") or word in ("-", "--"):
                raise ConfigError(key, option, "options such as --mail-type=END")
            spelled = slurm_options.reserved_option(word, table, owned)
            if spelled is not None:
                raise ConfigError(
                    key,
                    option,
                    f"an option the script does not set itself ({spelled[0]} comes from {owned[spelled[1]]})",
                )
            if key == "cluster.sbatch":
                sbatch_value(key, option)
    for name in cluster.env:
        if not _ENV_NAME.match(name):
            raise ConfigError(
                f"cluster.env.{name}", cluster.env[name], "a variable name of letters, digits, _"
            )


# ---------------------------------------------------------------------------------------------- render


def template_path(name: str) -> Path:
    """``slurm/<name>.sbatch`` of a checkout or of the installed package, or a path of the user's own."""
    if "/" in name or name.endswith(".sbatch"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError("cluster.template", name, "a template name under slurm/ or an existing file")
        return path
    here = Path(__file__).resolve().parent.parent
    for folder in (here.parent / "slurm", here / "_slurm"):
        if (folder / f"{name}.sbatch").is_file():
            return folder / f"{name}.sbatch"
    raise ConfigError("cluster.template", name, "a template name under slurm/ (default) or an existing file")


def sbatch_options(job: Job) -> list[str]:
    c = job.cluster
    # sbatch expands %j, %x, ... in an --output path: a % of the run's own directory (a run or sweep named
    # "loss%j") stays literal as %%, so the log lands where the job ledger says it is.
    log_dir = sbatch_value("run.dir", job.log_dir).replace("%", "%%")
    log = f"{log_dir}/{'%A_%a.out' if job.array is not None else '%j.out'}"
    options = [
        f"--job-name={sbatch_value('cluster.job_name', job.job_name)}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks_per_node}",
        f"--cpus-per-task={c.cpus_per_task}",
        f"--time={c.time}",
        # Without B: the signal goes to the training tasks (not the batch shell), which save at the next
        # step boundary and exit 75; the end of the script then requeues the job.
        f"--signal={c.signal.removeprefix('SIG')}@{c.signal_lead_s}",
        "--requeue",
        "--open-mode=append",  # a requeued attempt appends to the log instead of truncating it
        f"--output={log}",
        f"--chdir={sbatch_value('run.dir', job.workdir)}",
    ]
    for key, flag in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                      ("mem", "--mem"), ("constraint", "--constraint")):  # fmt: skip
        value = getattr(c, key)
        if value is not None:
            options.append(f"{flag}={sbatch_value(f'cluster.{key}', value)}")
    if c.gpus_per_node:
        if c.gres is not None:
            options.append(
                f"--gres={sbatch_value('cluster.gres', c.gres.replace('{gpus}', str(c.gpus_per_node)))}"
            )
        else:
            options.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.exclusive:
        options.append("--exclusive")
    if job.array is not None:
        spec = compress(job.array)
        options.append(f"--array={spec}" + (f"%{c.array_parallelism}" if c.array_parallelism else ""))
    options += [str(o) for o in c.sbatch]
    return [f"#SBATCH {o}" for o in options]


def compress(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5`` (Slurm's --array syntax)."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def environment(cluster: ClusterConfig) -> str:
    lines: list[str] = []
    for module in cluster.modules:
        lines.append(f"module load {shlex.quote(str(module))}")
    lines += [str(line) for line in cluster.setup]  # the user's own shell code, on purpose
    for name, value in cluster.env.items():
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return "\n".join(lines) + ("\n" if lines else "")


def render(job: Job) -> str:
    c = job.cluster
    base = [job.python, "-m", "trainer", "train"]
    if job.array is None:
        command = " ".join(shlex.quote(w) for w in base + job.trials[0].args)
        select = ""
    else:
        command = " ".join(shlex.quote(w) for w in base) + ' "${trial[@]}"'
        args_file = shlex.quote(str(job.trials_file))
        select = "\n".join(
            ["# This array task's trial: line <task id + 1 + offset> of the sweep's trials.args holds its arguments,",
             f"# its overrides and run dir, shell-quoted (offset {job.array_offset}: task 0 is trial {job.array_offset}).",
             'task="${SLURM_ARRAY_TASK_ID:-}"',
             'line=""',
             'case "$task" in',
             "  ''|*[!0-9]*) ;;",
             f'  *) line=$(sed -n "$((task + {job.array_offset + 1}))p" {args_file}) ;;',
             "esac",
             'if [ -z "$line" ]; then',
             '  echo "[trainer] no trial for array task ${task:-(none)} in the sweep\'s trials.args" >&2',
             "  exit 2",
             "fi",
             'eval "trial=($line)"']
        )  # fmt: skip
    values = {
        "what": job.what,
        "sbatch_options": "\n".join(sbatch_options(job)),
        "environment": environment(c),
        "select_trial": select,
        "srun_options": "".join(shlex.quote(str(o)) + " " for o in c.srun),
        "train_command": command,
        "max_requeues": str(c.max_requeues),
    }
    template = template_path(c.template)
    text = template.read_text()

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise ConfigError(
                "cluster.template", str(template),
                f"placeholders among {', '.join('{{' + k + '}}' for k in values)} ({match.group(0)} is not one)",
            )  # fmt: skip
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, text)


# ---------------------------------------------------------------------------------------------- scheduler


def reachable() -> bool:
    """Whether a SLURM controller answers here (client commands installed and configured, daemon up)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    if os.environ.get("SLURM_CONF") and not os.path.isfile(os.environ["SLURM_CONF"]):
        return False  # the clients would only fail after a slow DNS lookup for a configless setup
    try:
        proc = _run(["scontrol", "ping"], timeout=10)
    except SchedulerError:
        return False
    return proc.returncode == 0 and "UP" in proc.stdout


class SchedulerError(RuntimeError):
    """The scheduler refused or could not be asked; the message is one line."""


def _run(cmd: list[str], stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SchedulerError(
            f"{cmd[0]} did not answer within {timeout:.0f} s (is the controller busy?)"
        ) from None


def test_only(script: str) -> str | None:
    """``sbatch --test-only`` on the script: ``None`` if the scheduler would run it, else its complaint."""
    proc = _run(["sbatch", "--test-only"], stdin=script)
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Try ")]
    return "; ".join(lines) or f"sbatch --test-only exited with {proc.returncode}"


def submit(script: Path) -> str:
    """Submit and return at once with the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    try:
        proc = _run(["sbatch", "--parsable", str(script)], timeout=60)
    except SchedulerError as err:
        raise SchedulerError(f"{err}; the job may have been accepted anyway: check `squeue --me` before "
                             "submitting again") from None  # fmt: skip
    if proc.returncode != 0:
        detail = "; ".join(ln.strip() for ln in proc.stderr.splitlines() if ln.strip())
        raise SchedulerError(f"sbatch refused the job: {detail or f'exit code {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def partition_facts(partition: str | None) -> dict | None:
    """Nodes and GPUs of a partition (the default one for ``None``) as ``sinfo`` reports them, summed over
    its lines (sinfo splits a partition whose nodes differ). ``None`` when unknown or several partitions."""
    if partition is not None and "," in partition:
        return None  # the job may go to any of them: nothing simple to check
    proc = _run(["sinfo", "-h", "-o", "%P|%D|%G"], timeout=15)
    if proc.returncode != 0:
        return None
    facts: dict | None = None
    for line in proc.stdout.splitlines():
        name, nodes, gres = (line.split("|") + ["", "", ""])[:3]
        is_default = name.endswith("*")
        name = name.rstrip("*")
        if (partition is None and is_default) or name == partition:
            facts = facts or {"name": name, "nodes": 0, "gpus": False}
            facts["nodes"] = (
                facts["nodes"] + int(nodes) if nodes.isdigit() and facts["nodes"] is not None else None
            )
            facts["gpus"] = facts["gpus"] or "gpu" in gres
    return facts


def check_against_scheduler(job: Job) -> list[str]:
    """What ``sinfo`` can tell before submitting: nodes and GPUs of the partition. Returns notes."""
    c = job.cluster
    facts = partition_facts(c.partition)
    if facts is None:
        if c.partition is not None and shutil.which("sinfo"):
            raise ConfigError("cluster.partition", c.partition, "a partition that sinfo lists")
        return []
    if facts["nodes"] is not None and job.nodes > facts["nodes"]:
        raise ConfigError(
            "trainer.num_nodes",
            job.nodes,
            f"at most {facts['nodes']} (the nodes of partition {facts['name']})",
        )
    if c.gpus_per_node and not facts["gpus"]:
        raise ConfigError(
            "cluster.gpus_per_node", c.gpus_per_node,
            f"0 on partition {facts['name']} (sinfo lists no GPUs there; pick a GPU partition)",
        )  # fmt: skip
    return [f"partition {facts['name']}: {facts['nodes']} nodes, GPUs: {'yes' if facts['gpus'] else 'no'}"]


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """``scontrol show job -o``: one line per job (array task), ``Key=Value`` words."""
    records = []
    for line in text.splitlines():
        fields: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        if fields:
            records.append(fields)
    return records


def job_records(job_id: str) -> list[dict[str, str]]:
    """What the scheduler knows about a job (one record per array task): JobState, Restarts, ExitCode,
    RunTime, StdOut... ``scontrol`` first (it knows jobs up to MinJobAge after their end), then ``sacct``
    where the cluster keeps accounting; ``[]`` when neither knows it."""
    try:
        return _job_records(job_id)
    except SchedulerError:
        return []


def _job_records(job_id: str) -> list[dict[str, str]]:
    if shutil.which("scontrol"):
        proc = _run(["scontrol", "show", "job", "-o", job_id], timeout=15)
        if proc.returncode == 0:
            return parse_scontrol(proc.stdout)
    if shutil.which("sacct"):
        proc = _run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed"], timeout=15
        )
        if proc.returncode == 0:
            out = []
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4:
                    out.append({"JobId": parts[0], "JobState": parts[1].split()[0], "ExitCode": parts[2],
                                "RunTime": parts[3]})  # fmt: skip
            return out
    return []


def records_by_task(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """What the scheduler knows of many jobs and array tasks (``<array>_<task>``), asked once per job or
    array (a 10,000-trial sweep is a few arrays: a few calls, not 10,000). Keyed by the ids given."""
    out: dict[str, dict[str, str]] = {}
    for base in sorted({j.split("_")[0] for j in job_ids}):
        for rec in job_records(base):
            array, tasks = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
            if array and tasks:  # scontrol: a pending remainder is one record for a range (3-9%2, 4,7)
                for task in _task_ids(tasks):
                    out[f"{array}_{task}"] = rec
            elif rec.get("JobId"):  # scontrol's plain job, or sacct's "123_4"
                out[rec["JobId"]] = rec
    return out


def _task_ids(spec: str) -> list[int]:
    ids: list[int] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi):
            ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def queued_states() -> dict[str, str] | None:
    """My jobs in the queue and their states, array tasks one by one (``squeue --me -r``), in one call;
    ``None`` when squeue cannot say (then ask per job with ``active``)."""
    if not shutil.which("squeue"):
        return None
    try:
        proc = _run(["squeue", "-h", "-r", "--me", "-o", "%i|%T"], timeout=30)
    except SchedulerError:
        return None
    if proc.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)


def active(job_id: str) -> str | None:
    """The state of a job still in the queue (PENDING, RUNNING, ...), or ``None``."""
    if not shutil.which("squeue"):
        return None
    try:
        proc = _run(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=15)
    except SchedulerError:
        return None
    states = [s.strip() for s in proc.stdout.splitlines() if s.strip()] if proc.returncode == 0 else []
    return states[0] if states else None


def current_python() -> str:
    """The interpreter of this ``trainer`` (a venv's python keeps its venv when called by path)."""
    import sys

    return os.path.abspath(sys.executable)
