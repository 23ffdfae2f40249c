"""The ``trainer`` command: dispatches to a subcommand and imports nothing heavy before it knows which.

trainer train [hydra overrides]     train (one process, or local DDP workers)
trainer submit [overrides]          the same run (or a -m sweep) as a SLURM job
trainer status [run or sweep dir]   where runs and their jobs stand
trainer report <sweep or run dir>   a table and PNG plots
trainer export <run or checkpoint>  one consolidated weights file (e.g. from a sharded FSDP checkpoint)
trainer sample <run>                text from a run's language model
trainer evaluate <run>              a run's validation metrics from its newest checkpoint
"""

from __future__ import annotations

import sys

USAGE = """\
usage: trainer <command> [options] [key=value ...]

commands:
  train     compose the config from conf/ with Hydra, validate it, and train
            (`trainer train --help` shows the config groups and Hydra's flags)
  submit    the same command as a SLURM job (sbatch), or a -m sweep as one job array;
            returns at once with the job id (`trainer submit --help`)
  status    runs, sweeps and their SLURM jobs: state, restarts, last step and metric, logs
  report    a sweep's trials sorted by the objective, with PNG plots; or one run's curves
  plan      the memory per device a run needs, and whether it fits, before launching it
  export    a run's checkpoint (FSDP shards included) as one weights file for inference
  sample    text from a run's language model (`trainer sample runs/<name> --prompt "def "`)
  evaluate  a run's validation metrics (a classifier's accuracy) from its newest checkpoint

examples:
  trainer train                                   # the default experiment: a small GPT on CPU
  trainer train experiment=digits_mlp             # another preset
  trainer train strategy=ddp trainer.devices=2    # 2-process data parallel
  trainer train --cfg job                         # print the composed config and exit
  trainer submit cluster=slurm trainer.num_nodes=2 strategy=ddp   # 2 nodes on SLURM
  trainer submit --dry-run cluster=slurm          # print the sbatch script and the checks
  trainer plan experiment=gpt_150m cluster=slurm cluster.gpus_per_node=1 cluster.gpu_mem_gb=6   # fits a 6 GB GPU?
  trainer train -m optim.lr=1e-3,3e-4 model.n_layer=2,4       # a 4-trial grid sweep here
  trainer status runs/                            # every run under runs/
  trainer report runs/sweep-gpt_quickstart-<hash>  # trials sorted by val/loss, plots
  trainer train strategy=fsdp trainer.devices=2   # 2-process fully sharded data parallel
  trainer export runs/<name>                      # its newest checkpoint as one file
  trainer sample runs/gpt_quickstart-<hash> --prompt "def "   # what the quickstart's GPT writes
  trainer evaluate runs/digits_mlp-<hash>         # a run's validation metrics, e.g. val/acc

exit codes: 0 success, 2 bad configuration or usage, other: the training failed (see its output)
"""

COMMANDS = ("train", "submit", "plan", "status", "report", "export", "sample", "evaluate")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command == "train" and not ("-m" in rest or "--multirun" in rest):
        from trainer import early_signals

        early_signals.catch()  # a preemption signal during the seconds of start-up is not fatal
    if command == "train" and ("-m" in rest or "--multirun" in rest):  # a sweep: one process per trial
        from trainer.sweep.local import main as sweep_main

        return sweep_main(rest)
    if command == "train":
        from trainer.train import cli_main

        try:
            return cli_main(rest)
        finally:
            if argv is None:  # this process's own command: it exits next (a caller of main() may go on)
                early_signals.ignore()
    if command == "submit":
        from trainer.submit import main as submit_main

        return submit_main(rest)
    if command == "plan":
        from trainer.plan import main as plan_main

        return plan_main(rest)
    if command == "report":
        from trainer.sweep.report import main as report_main

        return report_main(rest)
    if command == "status":
        from trainer.status import main as status_main

        return status_main(rest)
    if command == "export":
        from trainer.export import main as export_main

        return export_main(rest)
    if command in ("sample", "evaluate"):
        from trainer.use import main as use_main

        return use_main(rest, command)
    print(
        f"error: command {command!r}: expected one of {', '.join(COMMANDS)} (see `trainer --help`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
