"""trainer: a distributed training orchestrator for PyTorch (Hydra configs, Lightning training, SLURM launch).

Importing this package is cheap on purpose: torch and Lightning are imported only by the training side.
"""

__version__ = "0.1.0"
