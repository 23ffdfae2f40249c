"""The typed schema of a run's configuration: one dataclass per component.

YAML files under ``conf/`` select and override; these dataclasses define which keys exist, their types and
their defaults. They are registered with Hydra's ConfigStore, so an unknown key or a value of the wrong type
is an error at composition time instead of being silently accepted.

Each component receives only its own slice (``cfg.model``, ``cfg.data``, ...), never the root. Checks that
concern a single field live in ``__post_init__`` (run when the slice is turned into its dataclass); checks
that need the machine (device counts, precision support) or two slices live in ``trainer.config.validate``.

This module imports no torch: ``trainer --help`` and the launch side read it on login nodes.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from trainer.config.errors import ConfigError

# ---------------------------------------------------------------------------------------------- helpers


def _positive(key: str, value: float | int | None) -> None:
    if value is None or value <= 0:
        raise ConfigError(key, value, "a number > 0")


def _non_negative(key: str, value: float | int | None) -> None:
    if value is None or value < 0:
        raise ConfigError(key, value, "a number >= 0")


def _finite_positive(key: str, value: float | None) -> None:
    import math

    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, value, "a finite number > 0")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(str(a) for a in allowed))


# ---------------------------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """Where a run lives. The run's identity (``name``) is what resume and requeue rely on."""

    name: str | None = None
    """Run name. Default: ``<experiment>-<8 hex digits of the config hash>``, so re-running the same command
    finds the same directory."""
    root: str = "runs"
    """Folder that holds run directories (relative to the current directory unless absolute)."""
    dir: str | None = None
    """The run directory. Default: ``<root>/<name>``."""
    new_each_time: bool = False
    """Each command is a new run (``debug=smoke`` sets it, so a smoke run re-checks the code after every edit):
    when ``<root>/<name>`` already holds a run, the next free ``<name>-2``, ``<name>-3``, ... is used. Such
    runs are never continued."""


# ---------------------------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    """Decoder-only transformer language model (GPT-2 style, pre-norm, causal self-attention)."""

    _target_: str = "trainer.models.gpt.GPTModule"
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 128
    """Context length in tokens; the data's sequence length follows it."""
    vocab_size: int = 256
    """Vocabulary size; 256 for byte-level text."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs, in [0, 1)."""
    bias: bool = False
    """Use biases in linear layers and layer norms."""
    tie_weights: bool = True
    """Share the token embedding with the output projection (saves vocab_size * n_embd parameters)."""
    compile: bool = False
    """``torch.compile`` the network (Inductor; on CPU it needs a C++ compiler). The first step compiles (tens
    of seconds on a small CPU); the weights and checkpoints are the same as without it."""

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            _positive(key, getattr(self, key))
        if self.n_embd % self.n_head:
            raise ConfigError("n_head", self.n_head, f"a divisor of n_embd={self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "a number in [0, 1)")


@dataclass
class MLPConfig:
    """Multi-layer perceptron classifier over flat feature vectors."""

    _target_: str = "trainer.models.mlp.MLPModule"
    in_features: int = 64
    """Input features per sample (64 for the 8x8 digits)."""
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    """Widths of the hidden layers."""
    num_classes: int = 10
    """Number of output classes."""
    dropout: float = 0.1
    """Dropout after each hidden layer, in [0, 1)."""

    def __post_init__(self) -> None:
        _positive("in_features", self.in_features)
        _positive("num_classes", self.num_classes)
        for width in self.hidden:
            _positive("hidden", width)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "a number in [0, 1)")


# ---------------------------------------------------------------------------------------------- optim


@dataclass
class AdamWConfig:
    """The built-in models' optimizer: ``torch.optim.AdamW`` as a ``_partial_`` node (the model supplies the
    parameters, with weight decay on matrices only). Any other optimizer is a ``_target_`` node of the same
    shape (``conf/optim/sgd.yaml``, or your own); a model that takes an ``optimizer`` argument gets it."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to biases, norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""

    def __post_init__(self) -> None:
        _finite_positive("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        _positive("eps", self.eps)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", list(self.betas), "two numbers in [0, 1)")


@dataclass
class WarmupScheduleConfig:
    """The built-in learning-rate schedule: linear warmup, then cosine decay (or constant), stepped every
    optimizer step. Any ``torch.optim.lr_scheduler`` class (or your own) works as a ``_partial_`` node too."""

    _target_: str = "trainer.optim.WarmupSchedule"
    _partial_: bool = True
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from 0 to the optimizer's ``lr``."""
    schedule: str = "cosine"
    """After warmup: ``cosine`` decays to ``lr * min_lr_ratio`` at the last step; ``constant`` keeps ``lr``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine only)."""

    def __post_init__(self) -> None:
        _non_negative("warmup_steps", self.warmup_steps)
        _one_of("schedule", self.schedule, ("cosine", "constant"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


# ---------------------------------------------------------------------------------------------- data


def python_stdlib_dir() -> str:
    """The installed Python standard library: a real text corpus that exists on every machine offline."""
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


# Parts of the standard library that are not representative source code (test fixtures, bundled tools).
STDLIB_EXCLUDE = ("test/", "tests/", "idlelib/", "lib2to3/", "site-packages/", "dist-packages/")


def resolve_text_files(path: str | None, pattern: str) -> list[str]:
    """Files of the text corpus, sorted so every rank and every re-run sees the same order.

    ``path`` is a file, a directory (searched with ``pattern``) or a glob; ``None`` means the standard
    library's own ``*.py`` files.
    """
    if path is None:
        root = python_stdlib_dir()
        files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        rel = ((f, os.path.relpath(f, root).replace(os.sep, "/")) for f in files)
        return sorted(f for f, r in rel if not any(part in r for part in STDLIB_EXCLUDE))
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return sorted(f for f in glob.glob(os.path.join(path, pattern), recursive=True) if os.path.isfile(f))
    if glob.has_magic(path):
        return sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    return [path] if os.path.isfile(path) else []


@dataclass
class TextDataConfig:
    """Byte-level language modelling over text files: every byte is a token (vocab 256)."""

    _target_: str = "trainer.data.text.TextDataModule"
    path: str | None = None
    """A file, a directory or a glob. ``null``: the installed Python standard library's source files."""
    pattern: str = "**/*.py"
    """Files to take when ``path`` is a directory (recursive glob)."""
    seq_len: int = 128
    """Tokens per sample (the conf file ties it to ``model.block_size``)."""
    val_fraction: float = 0.05
    """Fraction of the corpus (its last bytes) held out for validation."""
    max_bytes: int | None = None
    """Use at most this many bytes of the corpus (``null``: all of it)."""
    batch_size: int = 32
    """Samples per device per micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    seed: int = 0
    """Seed of the data order; the conf file ties it to the run's ``seed``."""
    shuffle: bool = True
    """Shuffle training samples each epoch (the order is a function of seed and epoch only)."""

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("seq_len", self.seq_len)
        _non_negative("num_workers", self.num_workers)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "a number in (0, 1)")
        if self.max_bytes is not None:
            _positive("max_bytes", self.max_bytes)


@dataclass
class DigitsDataConfig:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes): real data shipped with the package."""

    _target_: str = "trainer.data.digits.DigitsDataModule"
    val_fraction: float = 0.2
    """Fraction of images held out for validation (stratified by a seeded shuffle)."""
    batch_size: int = 64
    """Samples per device per micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seed of the split and the data order; the conf file ties it to the run's ``seed``."""
    shuffle: bool = True
    """Shuffle training samples each epoch."""

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _non_negative("num_workers", self.num_workers)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "a number in (0, 1)")


@dataclass
class SyntheticDataConfig:
    """Random tokens generated on the fly from (seed, index): measures the trainer, not the data pipeline."""

    _target_: str = "trainer.data.synthetic.SyntheticDataModule"
    num_samples: int = 65536
    """Training samples per epoch (validation gets 1/16 of that)."""
    seq_len: int = 128
    """Tokens per sample (tied to ``model.block_size`` in the conf file)."""
    vocab_size: int = 256
    """Token ids are drawn from [0, vocab_size) (tied to ``model.vocab_size``)."""
    batch_size: int = 32
    """Samples per device per micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seed of the generated tokens and the order."""
    shuffle: bool = True
    """Shuffle training samples each epoch."""

    def __post_init__(self) -> None:
        for key in ("num_samples", "seq_len", "vocab_size", "batch_size"):
            _positive(key, getattr(self, key))
        _non_negative("num_workers", self.num_workers)


# ---------------------------------------------------------------------------------------------- strategy

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class StrategyConfig:
    """How the model is spread over processes. FSDP settings live here too."""

    name: str = "auto"
    """``auto``: one process; ``ddp``: one replica per device; ``fsdp``: parameters sharded over devices."""
    backend: str | None = None
    """Process-group backend; ``null`` picks ``nccl`` on CUDA and ``gloo`` on CPU."""
    timeout_s: int = 1800
    """Collective timeout in seconds during start-up and the first step (which may include compilation)."""
    step_timeout_s: int | None = 300
    """Collective timeout after the first step: a rank that waits this long for the others fails the job
    (``null``: keep ``timeout_s``)."""
    find_unused_parameters: bool = False
    """DDP: tolerate parameters that get no gradient in a step (slower; only for models that need it)."""
    static_graph: bool = False
    """DDP: the set of used parameters never changes between steps (enables some optimisations)."""
    sharding: str = "full"
    """FSDP: ``full`` (shard over all ranks) or ``hybrid`` (shard within a node, replicate across nodes)."""
    activation_checkpointing: bool = False
    """FSDP: recompute each block's activations in the backward pass to save memory."""
    cpu_offload: bool = False
    """FSDP: keep sharded parameters and optimizer state in host memory (GPUs only)."""

    def __post_init__(self) -> None:
        _one_of("name", self.name, STRATEGIES)
        if self.backend is not None:
            _one_of("backend", self.backend, ("nccl", "gloo"))
        _positive("timeout_s", self.timeout_s)
        if self.step_timeout_s is not None:
            _positive("step_timeout_s", self.step_timeout_s)
        _one_of("sharding", self.sharding, ("full", "hybrid"))


# ---------------------------------------------------------------------------------------------- precision

PRECISIONS = ("32", "bf16-mixed", "16-mixed", "bf16-true")


@dataclass
class PrecisionConfig:
    """Numeric precision of the training step (Lightning's precision names)."""

    value: str = "32"
    """``32`` (fp32), ``bf16-mixed``, ``16-mixed`` (CUDA only, with loss scaling) or ``bf16-true``."""

    def __post_init__(self) -> None:
        _one_of("value", str(self.value), PRECISIONS)


# ---------------------------------------------------------------------------------------------- trainer

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


@dataclass
class TrainerConfig:
    """The training loop: where it runs, how long, how often it validates and logs.

    Any other flag of Lightning's ``Trainer`` can be set here too (``trainer.detect_anomaly=true``,
    ``trainer.max_time=00:02:00:00``): it is checked against ``Trainer.__init__``'s signature and passed on.
    Flags that this project sets itself (strategy, precision, callbacks, logger, plugins, checkpointing) are
    refused there, with the key that sets them."""

    accelerator: str = "auto"
    """``auto`` (a CUDA GPU if there is one, else CPU), ``cpu``, ``gpu``/``cuda`` or ``mps``."""
    devices: int = 1
    """Devices (processes) per node. More than one needs ``strategy=ddp`` or ``strategy=fsdp``."""
    num_nodes: int = 1
    """Nodes taking part (more than one only under a cluster launcher such as SLURM)."""
    max_steps: int = 300
    """Optimizer steps to train for; -1 trains for ``max_epochs`` instead."""
    max_epochs: int | None = None
    """Epochs to train for when ``max_steps`` is -1."""
    accumulate_grad_batches: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    gradient_clip_val: float | None = None
    """Clip the global gradient norm to this value (``null``: no clipping, Lightning's default; the GPT
    presets clip at 1.0)."""
    val_check_interval: int | None = None
    """Validate every this many training batches (counted across epochs); ``null``: at the end of every epoch
    (Lightning's default). Either way a run ends with a validation of its final weights."""
    limit_val_batches: int | None = None
    """Validation batches per validation (``null``: the whole validation set; 0 disables validation)."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training starts, to catch errors in validation early."""
    log_every_n_steps: int = 10
    """Write a metrics row every this many optimizer steps."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower; errors where an op has none)."""
    enable_progress_bar: bool = True
    """Show a progress bar on rank zero."""
    on_nonfinite_loss: str = "stop"
    """A NaN/inf loss or gradient is never applied. ``stop``: save the last good state and exit with code 3;
    ``skip``: skip that step and go on."""

    def __post_init__(self) -> None:
        _one_of("accelerator", self.accelerator, ACCELERATORS)
        _positive("devices", self.devices)
        _positive("num_nodes", self.num_nodes)
        if self.max_steps == -1:
            if self.max_epochs is None or self.max_epochs <= 0:
                raise ConfigError("max_epochs", self.max_epochs, "a number > 0 when max_steps is -1")
        else:
            _positive("max_steps", self.max_steps)
        _positive("accumulate_grad_batches", self.accumulate_grad_batches)
        if self.gradient_clip_val is not None:
            _positive("gradient_clip_val", self.gradient_clip_val)
        if self.val_check_interval is not None:
            _positive("val_check_interval", self.val_check_interval)
        if self.limit_val_batches is not None:
            _non_negative("limit_val_batches", self.limit_val_batches)
        _non_negative("num_sanity_val_steps", self.num_sanity_val_steps)
        _positive("log_every_n_steps", self.log_every_n_steps)
        _one_of("on_nonfinite_loss", self.on_nonfinite_loss, ("stop", "skip"))


# ---------------------------------------------------------------------------------------------- logger


@dataclass
class CSVLoggerConfig:
    """Metrics as CSV in ``<run.dir>/metrics.csv``: always there, needs nothing."""

    flush_every_n_rows: int = 1
    """Rows buffered before they are written to disk (1: every row is on disk at once)."""

    def __post_init__(self) -> None:
        _positive("flush_every_n_rows", self.flush_every_n_rows)


@dataclass
class WandbLoggerConfig:
    """Weights & Biases tracking: one W&B run per training run, continued across resumes and requeues."""

    project: str = "trainer"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); ``null``: the account's default."""
    group: str | None = None
    """Group of runs (a sweep sets it to the sweep's name)."""
    tags: list[str] = field(default_factory=list)
    """Tags shown in the W&B UI."""
    job_type: str = "train"
    """W&B job type."""
    notes: str | None = None
    """Free text shown with the run."""
    mode: str | None = None
    """``offline`` (files under ``<run.dir>/wandb``, no key needed), ``online`` or ``disabled``; ``null``:
    the ``WANDB_MODE`` environment variable if set, else ``offline``."""
    log_checkpoint: bool = False
    """Upload the final checkpoint as a W&B artifact."""

    def __post_init__(self) -> None:
        if self.mode is not None:
            _one_of("mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class LoggerConfig:
    """Experiment trackers; each option of the ``logger`` group fills its own key (``logger=[csv,wandb]``)."""

    csv: CSVLoggerConfig | None = field(default_factory=CSVLoggerConfig)
    """CSV metrics file; always on unless set to ``null``."""
    wandb: WandbLoggerConfig | None = None
    """W&B tracking; ``logger=wandb`` (or ``logger=[csv,wandb]``) turns it on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other Lightning logger, by name: a ``_target_`` node with its arguments (``logger=[csv,tensorboard]``
    adds ``extra.tensorboard``). A logger that takes ``save_dir`` and does not set it writes into the run
    directory."""
    telemetry_interval_s: float | None = 1.0
    """Seconds between device telemetry samples, taken by a thread of each rank off the training thread: the
    ``sys/*`` and ``gpu<i>/*`` columns of every logger, and the summary's energy (NVIDIA GPUs). ``null`` or 0:
    off. Here, not under ``trainer``, because it changes what is recorded, not the run (no new run directory)."""

    def __post_init__(self) -> None:
        if self.telemetry_interval_s is not None:
            _non_negative("telemetry_interval_s", self.telemetry_interval_s)


# ---------------------------------------------------------------------------------------------- checkpoint


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run.dir>/checkpoints``: ``step-N.ckpt`` files, each with a ``.json`` manifest (step,
    config hash, size, SHA-256), and ``last.ckpt``, the newest one. One is always written at the end of a run."""

    every_n_steps: int = 100
    """Save every this many optimizer steps (0: not by step count)."""
    every_n_minutes: float | None = None
    """Also save when this many minutes have passed since the last save (``null``: not by time)."""
    keep_last_k: int = 2
    """Keep the newest K step checkpoints (at least 1)."""
    keep_best_k: int = 0
    """Also keep the best K by ``monitor`` (saved right after each validation when > 0)."""
    monitor: str = "val/loss"
    """Metric that ranks checkpoints for ``keep_best_k``."""
    mode: str = "min"
    """``min`` or ``max``: whether a lower or a higher ``monitor`` is better."""
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that make the run save at the next step boundary and exit with code 75 (requeue me).
    SIGUSR1 is what SLURM sends ahead of a time limit with ``--signal``; SIGTERM is what preemption sends."""
    allow_config_change: bool = False
    """Resume even when the checkpoint's model/data/seed differ from the current config (fine-tuning); the
    differing keys are still reported."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only while the state is copied (and for the
    previous save, if it is still being written: at most one in flight). The file (or FSDP's sharded
    directory, through DCP's async_save) is published, with its manifest, only once written; a preemption, a
    stop and the end of the run wait for it. ``false``: every save blocks training."""

    def __post_init__(self) -> None:
        _non_negative("every_n_steps", self.every_n_steps)
        if self.every_n_minutes is not None:
            _positive("every_n_minutes", self.every_n_minutes)
        _positive("keep_last_k", self.keep_last_k)
        _non_negative("keep_best_k", self.keep_best_k)
        _one_of("mode", self.mode, ("min", "max"))
        import signal

        for name in self.save_on_signals:
            if name in ("SIGKILL", "SIGSTOP") or not isinstance(
                getattr(signal, str(name), None), signal.Signals
            ):
                raise ConfigError("save_on_signals", name, "signal names such as SIGUSR1, SIGUSR2, SIGTERM")


# ---------------------------------------------------------------------------------------------- cluster

# Slurm's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
SLURM_TIME = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$"
# Job names for which Lightning's SLURMEnvironment assumes an interactive shell and ignores SLURM's ranks.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


@dataclass
class ClusterConfig:
    """Where ``trainer submit`` sends the run: one file per cluster under ``conf/cluster/`` (or your config
    dir). ``local`` means this machine: ``trainer train`` runs here and ``trainer submit`` has nowhere to go."""

    name: str = "local"
    """``local`` (run here) or the cluster's name (a SLURM cluster; used in messages only)."""
    partition: str | None = None
    """``--partition``; ``null``: the cluster's default partition."""
    account: str | None = None
    """``--account`` to charge; ``null``: your default account."""
    qos: str | None = None
    """``--qos``; ``null``: the default quality of service."""
    time: str = "01:00:00"
    """``--time`` limit of one job attempt (``HH:MM:SS``, ``D-HH:MM:SS`` or minutes). A requeued attempt gets
    the full limit again, so a long run spans several attempts."""
    gpus_per_node: int = 0
    """GPUs to request per node; with ``trainer.accelerator=gpu`` it must equal ``trainer.devices``."""
    gpu_mem_gb: float | None = None
    """Memory of one of the cluster's GPUs in GiB (80 for an H100 SXM). ``trainer plan`` compares a run's
    memory per device with it, and ``trainer submit`` refuses a job that cannot fit (``null``: not checked)."""
    gres: str | None = "gpu:{gpus}"
    """How GPUs are requested: a ``--gres`` value with ``{gpus}`` for the count (``gpu:a100:{gpus}`` for a
    typed GPU); ``null``: use ``--gpus-per-node`` instead."""
    cpus_per_task: int = 2
    """``--cpus-per-task``: cores of each training process (also its ``OMP_NUM_THREADS``)."""
    mem: str | None = None
    """``--mem`` per node (``64G``; ``0`` is all of it); ``null``: the partition's default."""
    constraint: str | None = None
    """``--constraint`` (node features, e.g. ``a100&ib``)."""
    exclusive: bool = False
    """``--exclusive``: no other job shares the nodes."""
    modules: list[str] = field(default_factory=list)
    """Environment modules to load before training (``module load <each>``), e.g. ``[cuda/12.4]``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training, after the modules: ``source ~/venvs/train/bin/activate``."""
    python: str | None = None
    """The Python that runs ``trainer`` on the nodes; ``null``: the one that ran ``trainer submit`` (right
    when its environment is on a filesystem the nodes share; set it, or ``setup``, when it is not)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job, e.g. ``{NCCL_SOCKET_IFNAME: ib0}``. Never put secrets here:
    sbatch passes your own environment (WANDB_API_KEY included) to the job without writing it down."""
    sbatch: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` options, each as on the command line: ``[--mail-type=END, --reservation=x]``."""
    srun: list[str] = field(default_factory=list)
    """Extra ``srun`` options for the training step, e.g. ``[--mpi=none]``."""
    signal: str = "SIGUSR1"
    """The signal Slurm sends ``signal_lead_s`` before the time limit; it must be one of
    ``checkpoint.save_on_signals`` so the run saves at the next step and asks to be requeued."""
    signal_lead_s: int = 120
    """Seconds before the time limit for that signal (Slurm may send it up to a minute early)."""
    max_requeues: int = 3
    """How many times a job that stopped to be requeued (exit code 75) requeues itself; then it ends, and
    ``trainer submit`` with the same overrides continues it."""
    array_parallelism: int | None = None
    """Sweeps: at most this many array tasks run at once (``--array=0-N%P``); ``null``: no limit."""
    max_array_size: int | None = None
    """The cluster's ``MaxArraySize``: array task ids stay below it, and a sweep with more trials is sent as
    several arrays. ``null``: asked of ``scontrol show config`` when a controller answers, else Slurm's
    default, 1001."""
    job_name: str | None = None
    """``--job-name``; ``null``: the run's name (the sweep's name for an array)."""
    template: str = "default"
    """The sbatch template: a name under ``slurm/`` (``default``) or the path of your own file."""
    test_only: bool = True
    """Ask the scheduler (``sbatch --test-only``) whether the request can run before submitting it."""

    def __post_init__(self) -> None:
        import re

        if not self.name:
            raise ConfigError("name", self.name, "local or the cluster's name")
        if not re.match(SLURM_TIME, str(self.time)):
            raise ConfigError(
                "time", self.time, "a Slurm time: minutes, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
            )
        _non_negative("gpus_per_node", self.gpus_per_node)
        _positive("cpus_per_task", self.cpus_per_task)
        if self.gpu_mem_gb is not None:
            _positive("gpu_mem_gb", self.gpu_mem_gb)
        _non_negative("signal_lead_s", self.signal_lead_s)
        _non_negative("max_requeues", self.max_requeues)
        if self.array_parallelism is not None:
            _positive("array_parallelism", self.array_parallelism)
        if self.max_array_size is not None:
            _positive("max_array_size", self.max_array_size)
        if self.gres is not None and "{gpus}" not in self.gres:
            raise ConfigError("gres", self.gres, "a --gres value containing {gpus}, e.g. gpu:{gpus}, or null")
        if self.job_name in INTERACTIVE_JOB_NAMES:
            raise ConfigError(
                "job_name", self.job_name,
                "a name other than bash or interactive (Lightning treats those jobs as interactive shells "
                "and ignores their ranks)",
            )  # fmt: skip
        import signal

        if self.signal in ("SIGKILL", "SIGSTOP") or not isinstance(
            getattr(signal, self.signal, None), signal.Signals
        ):
            raise ConfigError("signal", self.signal, "a signal name such as SIGUSR1, SIGUSR2 or SIGTERM")
        from trainer.secrets import is_secret_name

        for key in self.env:
            if is_secret_name(key):
                raise ConfigError(
                    f"env.{key}", "<hidden>",
                    "no secrets in the cluster config: export it in your shell; sbatch passes it to the job",
                )  # fmt: skip


# ---------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepConfig:
    """How ``trainer train -m`` (and ``trainer submit -m``) runs a sweep. Used only with ``-m``."""

    kind: str = "grid"
    """``grid``: every combination of the swept values; ``random``: ``num_trials`` samples of them;
    ``optuna``: ``num_trials`` trials chosen by Optuna (TPE by default), with pruning."""
    num_trials: int | None = None
    """How many trials a ``random`` or ``optuna`` sweep runs (a grid runs every combination)."""
    parallel: int = 1
    """Trials run at once here (each a separate ``trainer train`` process); on SLURM see
    ``cluster.array_parallelism``. On CPU each gets ``cores / parallel`` threads."""
    seed: int = 0
    """Seed of the random sampling (``random``) or of Optuna's sampler."""
    metric: str = "${checkpoint.monitor}"
    """The objective: a metric of the trial's run (its last logged value); by default the metric that ranks
    checkpoints, so one setting names your module's metric for both."""
    direction: str | None = None
    """``minimize`` or ``maximize`` the objective; ``null``: from ``checkpoint.mode`` (min: minimize)."""
    sampler: str = "tpe"
    """Optuna's sampler: ``tpe`` or ``random``."""
    pruner: str = "median"
    """Optuna's pruner: ``median`` (stop a trial whose intermediate objective is worse than the median of
    earlier trials at the same step) or ``none``."""
    pruner_startup_trials: int = 2
    """``median``: no pruning until this many trials have finished."""
    pruner_warmup_steps: int = 0
    """``median``: no pruning before this training step."""
    name: str | None = None
    """The sweep's directory name under ``run.root``; ``null``: derived from the experiment and the sweep's
    overrides, so the same command finds the same sweep again (and resumes it)."""

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ("grid", "random", "optuna"))
        if self.num_trials is not None:
            _positive("num_trials", self.num_trials)
        _positive("parallel", self.parallel)
        if self.direction is not None:
            _one_of("direction", self.direction, ("minimize", "maximize"))
        _one_of("sampler", self.sampler, ("tpe", "random"))
        _one_of("pruner", self.pruner, ("median", "none"))
        _non_negative("pruner_startup_trials", self.pruner_startup_trials)
        _non_negative("pruner_warmup_steps", self.pruner_warmup_steps)
        if self.name is not None and ("/" in self.name or self.name in (".", "..")):
            raise ConfigError("name", self.name, "a directory name without '/'")


# ---------------------------------------------------------------------------------------------- profile


def _listed(values: list[int]) -> str:
    """A list as it is written on the command line (``[5,3]``), for an error's one line."""
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass
class ProfileConfig:
    """A profiler window: ``torch.profiler`` records a few optimizer steps on the chosen ranks into
    ``<run.dir>/profile/`` (a Chrome/Perfetto trace and the top operators per rank, and the time of each phase
    of a step). Off unless ``steps`` is set, and then nothing is added to the run. It changes what is recorded,
    not what is trained, so it is no part of the run's name."""

    steps: list[int] | None = None
    """``[first, last]``: the optimizer steps to record, both included and numbered as in metrics.csv
    (``[20,25]``: six steps); ``null``: off. The first steps of a run are slow (warm-up), so start later."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """The ranks that record (each below ``trainer.devices * trainer.num_nodes``)."""
    record_shapes: bool = False
    """Record each operator's input shapes (the operator table is then split by shape; larger traces)."""
    memory: bool = False
    """Record tensor allocations and frees: memory per operator in the trace and the table."""
    with_stack: bool = False
    """Record the Python stack of every operator (source lines in the trace; much larger and slower)."""

    def __post_init__(self) -> None:
        if self.steps is not None and (len(self.steps) != 2 or not 0 < self.steps[0] <= self.steps[1]):
            raise ConfigError(
                "steps", _listed(self.steps), "[first, last] optimizer steps, 0 < first <= last, or null"
            )
        if not self.ranks or any(rank < 0 for rank in self.ranks):
            raise ConfigError("ranks", _listed(self.ranks), "a list of ranks >= 0, such as [0] or [0,1]")

    def check_world(self, world_size: int) -> None:
        """Every rank to record exists (a check across slices: ``trainer.config.validate``)."""
        if self.steps is not None and max(self.ranks) >= world_size:
            raise ConfigError(
                "profile.ranks", _listed(self.ranks),
                f"ranks below {world_size} (the run's processes: trainer.devices x trainer.num_nodes)",
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------- root


@dataclass
class TrainConfig:
    """The root of a training run's configuration; ``conf/train.yaml`` lists the default of each group."""

    seed: int = 1234
    """Seed of model initialisation, dropout and (through ``data.seed``) the data order."""
    resume: str = "auto"
    """``auto``: continue from ``<run.dir>/checkpoints/last.ckpt`` when it exists; ``never``: refuse to reuse
    an existing run directory; or the path of a checkpoint to start from."""
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = MISSING
    """The LightningModule: ``_target_`` plus its constructor arguments (group ``model``)."""
    data: Any = MISSING
    """The LightningDataModule: ``_target_`` plus its constructor arguments (group ``data``)."""
    optim: Any = None
    """The optimizer, a ``_target_`` node with ``_partial_: true`` (group ``optim``). Given to a model whose
    ``__init__`` takes an ``optimizer`` argument that its own config does not set; for any other model it is
    unused (and ``optim.*`` overrides are refused rather than silently ignored)."""
    scheduler: Any = None
    """The learning-rate scheduler, a ``_partial_`` node or ``null`` (group ``scheduler``); given like
    ``optim``, to a ``scheduler`` argument. A scheduler that takes ``total_steps`` gets the run's optimizer
    steps."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Lightning callbacks by name, each a ``_target_`` node (group ``callbacks``: ``callbacks=[early_stopping,
    lr_monitor]``), added to the trainer's own."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (YAML files name these as their first default)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    root = OmegaConf.structured(TrainConfig)
    # Typed, yet open to keys the schema does not list: any flag of Lightning's Trainer (checked against its
    # signature in trainer.config.targets) and any `_target_` node the user adds to a logger.
    OmegaConf.set_struct(root.trainer, False)
    cs.store(name="train_schema", node=root)
    cs.store(group="model", name="gpt_schema", node=GPTConfig)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="data", name="text_schema", node=TextDataConfig)
    cs.store(group="data", name="digits_schema", node=DigitsDataConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="optim", name="adamw_schema", node=AdamWConfig)
    cs.store(group="scheduler", name="warmup_schema", node=WarmupScheduleConfig)
