"""Hyperparameters in checkpoints as plain data, so that any module's checkpoints load.

``save_hyperparameters()`` records a module's constructor arguments, and Lightning writes them into every
checkpoint. Real modules take objects: a network (``net: nn.Module``), an optimizer and a scheduler as
``functools.partial``s (the lightning-hydra-template's ``MNISTLitModule``). Pickled into a checkpoint they
make it unloadable with ``torch.load(weights_only=True)`` (how this project loads every checkpoint, so that
loading one cannot run code), and under FSDP they cannot be pickled at all.

Such a value is stored as the config node that built it (``{"_target_": ..., ...}``), which is plain data
and says exactly what the object was (``hydra.utils.instantiate`` rebuilds it). A value that is not plain and
came from no config node is refused when the run starts, naming the attribute, not at the first save.

Secrets among them (``api_token``, any value equal to a secret environment variable's, at any depth) are
redacted like everywhere else the config is written (``trainer.secrets``): checkpoints are copied and
uploaded (W&B's ``log_checkpoint``). Nothing reads them back on resume: a resumed run builds its module from
the config, as a new run does, so the module keeps the real value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainer.config.errors import ConfigError
from trainer.namespace import pl
from trainer.secrets import redact

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.Size)


def is_plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back."""
    if isinstance(value, (list, tuple, set)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


def storable(hparams: Mapping[str, Any], nodes: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``hparams`` with each value that is not plain data replaced by its config node from ``nodes``."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if is_plain(value):
            out[key] = value
        elif key in nodes and is_plain(nodes[key]):
            out[key] = nodes[key]
        else:
            raise ConfigError(
                f"{owner}.hparams.{key}", f"<{type(value).__name__}>",
                "plain data (numbers, strings, lists, dicts, tensors) or an object built from the config (a "
                "`_target_` node): checkpoints must load without unpickling code; pass it through the config "
                "or leave it out of save_hyperparameters(ignore=[...])",
            )  # fmt: skip
    return out


class PlainHyperparameters(pl.Callback):
    """Writes the module's and the data module's hyperparameters into each checkpoint as plain data, with
    secrets redacted. Lightning calls ``on_save_checkpoint`` from every ``trainer.save_checkpoint``."""

    def __init__(self, model_nodes: Mapping[str, Any], data_nodes: Mapping[str, Any]) -> None:
        self.model_nodes, self.data_nodes = dict(model_nodes), dict(data_nodes)

    def check(self, model: Any, data: Any) -> None:
        """Before training: every hyperparameter can be stored (raises ConfigError naming one that cannot)."""
        storable(dict(model.hparams), self.model_nodes, "model")
        if data is not None:
            storable(dict(data.hparams), self.data_nodes, "data")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        for key, nodes, owner in (("hyper_parameters", self.model_nodes, "model"),
                                  ("datamodule_hyper_parameters", self.data_nodes, "data")):  # fmt: skip
            if key in checkpoint:
                checkpoint[key] = redact(storable(dict(checkpoint[key]), nodes, owner))
        # Hyperparameters given as an OmegaConf container come with its class: stored as a plain dict instead.
        for key in ("hparams_type", "datamodule_hparams_type"):
            checkpoint.pop(key, None)
