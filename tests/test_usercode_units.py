"""The pieces that let user code train unchanged, on their own: namespaces, `_target_` checks, the user
DataLoader take-over, hyperparameters as plain data, metric names."""

from __future__ import annotations

import functools
import inspect
import io
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from trainer import namespace
from trainer.config.compose import normalize
from trainer.config.errors import ConfigError
from trainer.config.targets import trainer_flags

pytestmark = pytest.mark.unit


def test_namespace_of_classes_and_translation():
    import lightning.pytorch as L
    import pytorch_lightning as PL

    class Mine(L.LightningModule):
        pass

    assert namespace.of_class(Mine) == "lightning" and namespace.of_class(PL.Callback) == "pytorch_lightning"
    assert namespace.of_class(torch.nn.Linear) is None
    assert namespace.translate("lightning.pytorch.callbacks.EarlyStopping", "pytorch_lightning") == (
        "pytorch_lightning.callbacks.EarlyStopping"
    )
    assert namespace.translate("lightning_fabric.plugins.X", "lightning") == "lightning.fabric.plugins.X"
    assert namespace.translate("torch.optim.SGD", "lightning") == "torch.optim.SGD"


def test_namespace_is_fixed_by_first_use():
    # in a fresh process: select, use, then selecting the other one is an error rather than a silent mix
    code = (
        "from trainer import namespace\n"
        "namespace.select('lightning')\n"
        "from trainer.metrics.csv_logger import CSVMetricsLogger\n"
        "import lightning.pytorch as L\n"
        "assert issubclass(CSVMetricsLogger, L.loggers.Logger)\n"
        "namespace.select('lightning')\n"
        "try:\n"
        "    namespace.select('pytorch_lightning')\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "refused:" in out.stdout, out.stderr


def test_trainer_flags_read_from_source_match_the_real_signature():
    from pytorch_lightning import Trainer

    real = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    assert list(trainer_flags()) == real and "detect_anomaly" in real


def test_built_in_models_take_the_optimizer_and_scheduler():
    # trainer.config.targets gives typed (built-in) models both without importing them: keep it true
    from trainer.models.gpt import GPTModule
    from trainer.models.mlp import MLPModule

    for cls in (GPTModule, MLPModule):
        assert {"optimizer", "scheduler"} <= set(inspect.signature(cls).parameters)


def test_the_default_preset_is_left_out_for_another_model():
    assert normalize(["model=mine"])[-1] == "~experiment"
    assert normalize(["data=theirs", "trainer.max_steps=3"])[-1] == "~experiment"
    assert "~experiment" not in normalize(["model=mine", "experiment=mine"])
    assert "~experiment" not in normalize(["model.n_layer=2", "precision=32"])
    assert normalize(["precision=32"]) == ["precision='32'"]


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


class _MyLoader(DataLoader):
    pass


def test_user_loaders_get_the_resumable_sampler_where_they_can():
    from trainer.data.loading import ResumableDataLoader, ResumableSampler, resumable_copy

    data = TensorDataset(torch.arange(100.0))
    collate = functools.partial(torch.utils.data.default_collate)
    loader = DataLoader(data, batch_size=8, shuffle=True, drop_last=True, collate_fn=collate)
    copy, reason = resumable_copy(loader, None, seed=3)
    assert reason is None and isinstance(copy, ResumableDataLoader)
    assert isinstance(copy.sampler, ResumableSampler) and copy.sampler.shuffle
    assert copy.batch_size == 8 and copy.drop_last and copy.collate_fn is collate and len(copy) == 12
    again, _ = resumable_copy(DataLoader(data, batch_size=8, shuffle=True, drop_last=True), None, seed=3)
    assert [b[0].tolist() for b in copy] == [b[0].tolist() for b in again], (
        "the order is a function of the seed"
    )
    ordered, _ = resumable_copy(DataLoader(data, batch_size=10), None, seed=3)
    assert not ordered.sampler.shuffle and next(iter(ordered))[0].tolist() == list(range(10))
    for other, why in (
        (DataLoader(_Stream(), batch_size=2), "IterableDataset"),
        (_MyLoader(data, batch_size=2), "_MyLoader"),
        (DataLoader(data, sampler=torch.utils.data.RandomSampler(data, replacement=True)), "its own sampler"),
    ):
        same, reason = resumable_copy(other, None, seed=0)
        assert same is other and why in reason


def test_hyperparameters_become_their_config_nodes_or_are_refused():
    from trainer.checkpoint.hparams import storable

    net_node = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}
    opt_node = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1}
    hparams = {"net": torch.nn.Linear(2, 3), "optimizer": functools.partial(torch.optim.Adam, lr=0.1),
               "scheduler": None, "lr": 0.1, "sizes": [1, 2]}  # fmt: skip
    stored = storable(hparams, {"net": net_node, "optimizer": opt_node}, "model")
    assert stored == {"net": net_node, "optimizer": opt_node, "scheduler": None, "lr": 0.1, "sizes": [1, 2]}
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": stored}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["hyper_parameters"] == stored
    with pytest.raises(ConfigError, match=r"model.hparams.net=<Linear>: expected plain data"):
        storable({"net": torch.nn.Linear(2, 3)}, {}, "model")


def test_module_metrics_named_like_the_trainers_columns_are_moved_aside(caplog):
    from trainer.metrics import names
    from trainer.metrics.names import module_metrics

    names._warned.clear()  # said once per process: start this process's count afresh
    assert module_metrics({"train/acc": 1.0, "val/loss": 2.0}) == {"train/acc": 1.0, "val/loss": 2.0}
    assert module_metrics({"train/loss": 1.0, "train/lr": 0.1}) == {
        "module/train/loss": 1.0,
        "module/train/lr": 0.1,
    }
    module_metrics({"train/loss": 1.0})
    assert sum("module/train/loss" in r.message for r in caplog.records) == 1, "said once"
