"""Sweeps: a search space read with Hydra's grammar, trials composed and checked before any runs, a ledger in
the sweep directory, local trial processes (grid, random, Optuna) and reports. SLURM arrays reuse all but the
local runner (trainer/submit.py)."""

OPTUNA_ENV = "TRAINER_OPTUNA"
"""Set for an Optuna trial's process: where its study is and which trial it is (see sweep/pruning.py)."""
