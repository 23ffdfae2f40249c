"""Checkpoints that cannot run code when loaded, writes that fail cleanly, and what killed saves leave behind.

In one process: DCP saves and loads without a process group, and CUDA is replaced by stand-ins (no GPU here).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from trainer import exits
from trainer.checkpoint.io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    SafeDCPReader,
    UnsafeCheckpoint,
    load_sharded,
    read_sharded,
)
from trainer.checkpoint.manifest import manifest_path, read_manifest, sweep_debris, verify, write_manifest
from trainer.export import main as export_main

pytestmark = pytest.mark.unit


class Touch:
    """Unpickled, it would create ``marker`` (through ``os.system``, or ``exec``)."""

    def __init__(self, marker: Path, via: str) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _single_process():  # "no process group: saving/loading in one process" is the intent in these tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_dcp(folder: Path, extra: dict | None = None) -> dict:
    """A real sharded checkpoint as FSDP2Strategy writes it (model, optimizer, meta.pt); returns its state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optimizer = model_and_optimizer()
    state = {
        "state_dict": get_model_state_dict(model),
        "optimizer_0": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save({**state, **(extra or {})}, checkpoint_id=folder)
    torch.save({"global_step": 7, "epoch": 0, "hyper_parameters": {"n": 3}}, folder / "meta.pt")
    return state


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message.strip(), message


# ------------------------------------------------------------------ finding: checkpoints that run code


@pytest.mark.parametrize("via", ["os.system", "exec"])
def test_dcp_metadata_that_would_run_code_is_refused_by_export_and_resume(tmp_path, capsys, via):
    folder = tmp_path / "step-00000007.ckpt"
    save_dcp(folder)
    marker = tmp_path / "pwned"
    # A genuine metadata object with the payload tucked inside: it passes every look but the unpickler's.
    with (folder / ".metadata").open("rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data = {"x": Touch(marker, via)}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))

    out = tmp_path / "out.ckpt"
    assert export_main([str(folder), "-o", str(out)]) == exits.CONFIG
    err = capsys.readouterr().err.splitlines()
    named = "posix.system" if via == "os.system" else "builtins.exec"
    assert err[-1] == (
        f"error: {folder}/.metadata: refused to load: it names {named}, which a checkpoint's metadata never holds"
    )
    with pytest.raises(UnsafeCheckpoint) as refused:  # how resume (FSDP2Strategy.load_checkpoint) reads it
        load_sharded({"state_dict": {}}, folder)
    assert_one_line(str(refused.value))
    assert not marker.exists() and not out.exists()


def test_dcp_entry_that_would_run_code_is_refused(tmp_path):
    """A non-tensor entry (an optimizer's hyper-parameter) that DCP's own planner would unpickle freely."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder = tmp_path / "ckpt"
    save_dcp(folder, extra={"extra": {"lr": 0.5}})
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Touch(marker, "os.system"), evil)
    shard = folder / "__0_0.distcp"
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(evil.getvalue())
    with (folder / ".metadata").open("rb") as f:
        metadata = pickle.load(f)
    index = next(i for i in metadata.storage_data if i.fqn == "extra.lr")
    info: _StorageInfo = metadata.storage_data[index]
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(evil.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))

    refusal = r"refused to load its entry extra.lr: it names posix.system"
    with pytest.raises(UnsafeCheckpoint, match=refusal) as refused:
        read_sharded(folder, {"extra"})
    assert_one_line(str(refused.value))
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    save_dcp(folder)
    with (folder / ".metadata").open("rb") as f:
        metadata = pickle.load(f)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = dataclasses.replace(info, relative_path="../secret")
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match=r"points outside its checkpoint \(\.\./secret\)"):
        SafeDCPReader(folder).read_metadata()


def test_genuine_dcp_checkpoint_loads_and_exports_through_the_restricted_reader(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    saved = save_dcp(folder)
    loaded = read_sharded(folder, {"state_dict", "optimizer_0"})
    torch.testing.assert_close(loaded["state_dict"], saved["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["optimizer_0"]["state"], saved["optimizer_0"]["state"], rtol=0, atol=0)
    assert loaded["optimizer_0"]["param_groups"][0]["betas"] == (0.9, 0.95)

    in_place = {"state_dict": {k: torch.zeros_like(v) for k, v in saved["state_dict"].items()}}
    load_sharded(in_place, folder)  # as resume does: into the model's own (here: zeroed) tensors
    torch.testing.assert_close(in_place["state_dict"], saved["state_dict"], rtol=0, atol=0)

    out = tmp_path / "model.ckpt"
    assert export_main([str(folder), "-o", str(out)]) == exits.OK, capsys.readouterr().err
    exported = torch.load(out, weights_only=True)
    assert exported["global_step"] == 7 and exported["hyper_parameters"] == {"n": 3}
    torch.testing.assert_close(exported["state_dict"], saved["state_dict"], rtol=0, atol=0)


def test_single_file_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Touch(marker, "os.system")}, evil)
    with pytest.raises(UnsafeCheckpoint, match=r"it names posix.system") as refused:
        AtomicCheckpointIO().load_checkpoint(evil)  # how DDP and one-process runs resume
    assert_one_line(str(refused.value))
    assert export_main([str(evil), "-o", str(tmp_path / "out.ckpt")]) == exits.CONFIG
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {evil}: refused to load: it names")
    assert not marker.exists()


# ------------------------------------------------------------------ finding: failed checkpoint writes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_file_checkpoint_write_failing_midway_leaves_nothing(tmp_path, monkeypatch, code):
    from trainer.checkpoint import io as checkpoint_io

    written = {"bytes": 0}
    real_write = checkpoint_io._HashingWriter.write

    def write_then_fail(self, data: bytes) -> int:
        if written["bytes"] > 1000:
            raise OSError(code, os.strerror(code))
        written["bytes"] += len(data)
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_io._HashingWriter, "write", write_then_fail)
    target = tmp_path / "checkpoints" / "step-00000010.ckpt"
    with pytest.raises(CheckpointWriteError) as failed:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000), "global_step": 10}, target)
    assert failed.value.errno == code and isinstance(failed.value, OSError)
    assert str(failed.value) == f"could not write checkpoint {target}: {os.strerror(code)}"
    assert failed.value.__suppress_context__ and failed.value.__cause__ is None  # one traceback, not four
    assert written["bytes"] > 1000 and list(target.parent.iterdir()) == []


def test_file_checkpoint_whose_manifest_cannot_be_written_is_removed(tmp_path, monkeypatch):
    from trainer.checkpoint import io as checkpoint_io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint_io, "write_manifest", read_only)
    target = tmp_path / "step-00000010.ckpt"
    with pytest.raises(CheckpointWriteError, match=r"Read-only file system$"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10), "global_step": 10}, target)
    assert list(tmp_path.iterdir()) == []


def fsdp_strategy():
    from datetime import timedelta

    from trainer.strategy.fsdp import FSDP2Strategy

    return FSDP2Strategy(sharding="full", activation_checkpointing=False, cpu_offload=False, precision="32-true",
                         process_group_backend="gloo", timeout=timedelta(seconds=30))  # fmt: skip


def sharded_state() -> dict:
    model, optimizer = model_and_optimizer()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 5,
            "epoch": 0}  # fmt: skip


def test_sharded_checkpoint_write_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_write_item = dcp_fs._write_item

    def full_disk(transforms, stream, data, *args, **kwargs):
        real_write_item(transforms, stream, data, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    strategy = fsdp_strategy()
    target = tmp_path / "step-00000005.ckpt"
    strategy.save_checkpoint(sharded_state(), target, storage_options={"manifest": {"reason": "periodic"}})
    assert verify(target) is None
    monkeypatch.setattr(dcp_fs, "_write_item", full_disk)
    again = tmp_path / "step-00000010.ckpt"
    with pytest.raises(CheckpointWriteError) as failed:
        strategy.save_checkpoint(sharded_state(), again)
    assert failed.value.errno == errno.ENOSPC
    assert str(failed.value) == f"could not write checkpoint {again}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, manifest_path(target).name]


def test_sharded_checkpoint_saved_again_keeps_the_old_one_when_publishing_fails(tmp_path, monkeypatch):
    from trainer.strategy import fsdp

    strategy = fsdp_strategy()
    target = tmp_path / "step-00000005.ckpt"
    strategy.save_checkpoint(sharded_state(), target)
    before = read_manifest(target)

    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(fsdp, "write_manifest", quota)
    with pytest.raises(CheckpointWriteError, match=r"Disk quota exceeded$"):
        strategy.save_checkpoint(sharded_state(), target)
    assert read_manifest(target) == before and verify(target) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, manifest_path(target).name]


def test_sweep_debris_removes_what_killed_saves_left(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()

    def checkpoint(name: str, manifest: bool = True, folder: bool = False) -> Path:
        path = d / name
        if folder:
            path.mkdir()
            (path / "__0_0.distcp").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
        if manifest:
            write_manifest(path, {"file": name})
        return path

    kept = [checkpoint("step-00000010.ckpt"), checkpoint("step-00000020.ckpt", folder=True)]
    os.symlink("step-00000020.ckpt", d / "last.ckpt")
    write_manifest(d / "last.ckpt", {"source": "step-00000020.ckpt"})
    kept += [d / "last.ckpt", manifest_path(d / "last.ckpt"), *map(manifest_path, kept)]
    debris = [
        checkpoint("step-00000030.ckpt", manifest=False),  # killed before its manifest
        checkpoint("step-00000040.ckpt", manifest=False, folder=True),
        checkpoint(".step-00000050.ckpt.tmp", manifest=False),  # killed mid-write
        checkpoint(".step-00000060.ckpt.tmp", manifest=False, folder=True),
        checkpoint(".step-00000020.ckpt.old", manifest=False, folder=True),
        d / ".last.ckpt.json.tmp",
        d / "step-00000005.ckpt.json",  # its checkpoint was removed, the manifest was not
    ]
    debris[-2].write_text("{")
    debris[-1].write_text("{}")
    assert sorted(sweep_debris(d)) == sorted(debris)
    assert sorted(d.iterdir()) == sorted(kept)

    # last.ckpt now points at nothing: it goes, with its manifest, and so does the moved one's manifest
    (d / "step-00000020.ckpt").rename(d / "moved")
    gone = [d / "last.ckpt", manifest_path(d / "last.ckpt"), manifest_path(kept[1])]
    assert sorted(sweep_debris(d)) == sorted(gone)
    assert sweep_debris(tmp_path / "missing") == []


# ------------------------------------------------------------------ finding: resume on fewer GPUs


def test_cuda_random_state_saved_with_four_devices_restores_with_one(monkeypatch):
    from trainer.checkpoint.callback import capture_rng, restore_rng

    states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(4)}
    current = {"device": 2}
    set_on: dict[int, torch.Tensor] = {}

    def get_rng_state(device="cuda"):
        return states[current["device"] if device == "cuda" else device].clone()

    def every_device():
        raise AssertionError("only the current device's state is saved and restored")

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: len(states))
    monkeypatch.setattr(cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": set_on.__setitem__(device, state))
    monkeypatch.setattr(cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(cuda, "set_rng_state_all", every_device)

    saved = capture_rng()  # the rank computing on device 2 of 4
    torch.testing.assert_close(saved["cuda"], states[2])

    states = {0: torch.zeros(16, dtype=torch.uint8)}  # resumed where one device is visible
    current["device"] = 0
    restore_rng(saved)
    assert list(set_on) == [0] and torch.equal(set_on[0], torch.full((16,), 2, dtype=torch.uint8))

    # Checkpoints written before: every visible device's state, as a list indexed by device.
    set_on.clear()
    restore_rng(dict(saved, cuda=[torch.full((16,), d, dtype=torch.uint8) for d in range(4)]))
    assert list(set_on) == [0] and torch.equal(set_on[0], torch.zeros(16, dtype=torch.uint8))
    set_on.clear()
    current["device"] = 5  # more devices now than then: that device's stream was never saved
    restore_rng(dict(saved, cuda=[torch.zeros(16, dtype=torch.uint8)] * 4))
    assert set_on == {}


# ---------------------------------------------------------------------------------------------------------
# Background saves that copy the weights and optimizer state while the next step runs (io.DeferredCopies)


def deferred_save(tmp_path, step: int, storages_of: list[torch.Tensor], state: dict):
    """A background save of ``state`` at ``step`` whose tensors ``storages_of`` are copied on the writer."""
    writer = AtomicCheckpointIO(async_save=True)
    target = tmp_path / f"step-{step:08d}.ckpt"
    steady = {t.untyped_storage().data_ptr() for t in storages_of}
    writer.save_checkpoint(dict(state, global_step=step), target, storage_options={"steady": steady})
    return writer, target


def test_deferred_copy_is_made_on_the_writer_thread_and_holds_the_state_at_the_save(tmp_path, monkeypatch):
    from trainer.checkpoint import io as checkpoint_io

    threads = []
    real_copy = checkpoint_io.DeferredCopies.copy

    def record_thread(self):
        import threading
        import time

        threads.append(threading.current_thread().name)
        time.sleep(0.3)  # a slow copy: the check must wait for it
        real_copy(self)

    monkeypatch.setattr(checkpoint_io.DeferredCopies, "copy", record_thread)
    model, optimizer = model_and_optimizer()
    buffer = torch.arange(4.0)  # not steady: copied before the save returns
    params = list(model.parameters())
    moments = [t for s in optimizer.state.values() for t in s.values()]
    half = torch.randn(8).bfloat16()  # bf16 weights: copied as bytes
    state = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "buf": buffer,
             "half": half}  # fmt: skip
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_half, expected_moments = half.clone(), [m.clone() for m in moments]
    writer, target = deferred_save(tmp_path, 10, [*params, *moments, half], state)
    buffer.add_(100)  # changes that the save must not see: a buffer at once, ...
    assert writer.settle() >= 0.0
    with torch.no_grad():  # ... the weights right after the check (the optimizer step)
        for p in [*params, *moments, half]:
            p.add_(1.0)
    writer.wait()
    saved = torch.load(target, weights_only=True)
    assert threads == ["checkpoint-writer_0"]
    for name, value in expected.items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert torch.equal(saved["buf"], torch.arange(4.0)) and torch.equal(saved["half"], expected_half)
    saved_moments = [t for s in saved["optimizer_states"][0]["state"].values() for t in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, expected_moments, strict=True))
    assert read_manifest(target) is not None and writer.dropped_step is None


def test_weights_changed_in_place_before_the_check_drop_that_save_and_later_ones_copy_at_once(
    tmp_path, caplog
):
    model, _ = model_and_optimizer()
    params = list(model.parameters())
    writer, target = deferred_save(tmp_path, 10, params, {"state_dict": model.state_dict()})
    with torch.no_grad():  # in place, outside the optimizer, before the next optimizer step (weight clipping)
        params[0].clamp_(-1e9, 1e9)
    with caplog.at_level("WARNING", logger="trainer"):
        writer.wait()
    assert not target.exists() and list(tmp_path.iterdir()) == [], "nothing of the dropped save is left"
    assert writer.dropped_step == 10 and not writer.defer_copies
    assert "changed in place between a save and the next optimizer step" in caplog.text
    # the next save copies before it returns: a change right after it is not in the file
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    second = tmp_path / "step-00000020.ckpt"
    steady = {p.untyped_storage().data_ptr() for p in params}
    writer.save_checkpoint({"state_dict": model.state_dict(), "global_step": 20}, second, {"steady": steady})
    with torch.no_grad():
        params[0].add_(1.0)
    writer.wait()
    saved = torch.load(second, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
