"""``trainer export``: one full, consolidated weights file from any checkpoint, for inference.

A sharded checkpoint (FSDP: a torch.distributed.checkpoint directory written by N ranks) is read in this one
process, without a process group, and its model weights are gathered into plain tensors; a file checkpoint
(DDP or one process) has them already. Optimizer state is left out. The output is a Lightning checkpoint
(``state_dict`` + ``hyper_parameters``), so ``GPTModule.load_from_checkpoint(path)`` rebuilds the model, and it
gets a manifest (size, SHA-256) like every checkpoint of the project.

    trainer export runs/<name>                       # its newest checkpoint -> runs/<name>/export/step-N.ckpt
    trainer export runs/<name>/checkpoints/step-00000300.ckpt -o model.ckpt
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from trainer import exits, rundir
from trainer.checkpoint.manifest import algorithm_of, read_manifest, verify


class ExportError(Exception):
    pass


def source_checkpoint(target: Path) -> Path:
    """A run directory means its newest checkpoint; a checkpoint means itself. Either must verify, if it has
    a manifest (one made elsewhere has none)."""
    if (target / rundir.CHECKPOINT_DIR).is_dir():
        target = target / rundir.CHECKPOINT_DIR / rundir.LAST_CHECKPOINT
        if not target.exists():
            raise ExportError(f"{target.parent.parent}: the run has no checkpoint yet")
    if not target.exists():
        raise ExportError(f"{target}: expected a run directory or a checkpoint (no such path)")
    if read_manifest(target) is not None and (reason := verify(target)) is not None:
        raise ExportError(f"{target}: not a valid checkpoint ({reason})")
    return target


def load_weights(path: Path) -> dict[str, Any]:
    """The checkpoint's model weights as full tensors, plus its non-tensor metadata (no optimizer state).
    Nothing in the checkpoint can run code: one that tries raises ``UnsafeCheckpoint``."""
    from trainer.checkpoint.io import META_FILE, load_file, read_sharded

    if path.is_dir():  # sharded: gather the model entries only, in this process
        meta_file = path / META_FILE
        meta = load_file(meta_file, map_location="cpu") if meta_file.exists() else {}
        with warnings.catch_warnings():  # "no process group: loading in one process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            weights = read_sharded(path, {"state_dict"})["state_dict"]
    else:
        meta = load_file(path, map_location="cpu")
        weights = meta.pop("state_dict")
    keep = ("hyper_parameters", "hparams_name", "pytorch-lightning_version", "global_step", "epoch")
    out = {key: meta[key] for key in keep if key in meta}
    out["state_dict"] = {k: v.detach().contiguous() for k, v in weights.items()}
    return out


def export(source: Path, out: Path) -> dict[str, Any]:
    from trainer.checkpoint.io import AtomicCheckpointIO

    if out.exists():
        raise ExportError(f"{out}: already exists (choose another path with -o; nothing was overwritten)")
    checkpoint = load_weights(source)
    manifest = read_manifest(source) or {}
    algorithm = algorithm_of(manifest)
    checkpoint["exported_from"] = {"checkpoint": str(source), algorithm: manifest.get(algorithm)}
    AtomicCheckpointIO().save_checkpoint(
        checkpoint, out, storage_options={"manifest": {"source": str(source), "kind": "export"}}
    )
    tensors = checkpoint["state_dict"]
    return {"step": checkpoint.get("global_step"), "tensors": len(tensors), "bytes": out.stat().st_size}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trainer export", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run directory or a checkpoint (file or sharded directory)")
    parser.add_argument("-o", "--output", help="output file (default: <run dir>/export/<step-N>.ckpt)")
    args = parser.parse_args(argv)
    from trainer.checkpoint.io import CheckpointWriteError, UnsafeCheckpoint

    try:
        source = source_checkpoint(Path(args.target))
        # last.ckpt is a link to a step-N checkpoint; its manifest names which: the output is named after it
        resolved = source.resolve()
        step_name = (read_manifest(source) or {}).get("source") or resolved.name
        if args.output:
            out = Path(args.output)
        else:
            run_dir = (
                resolved.parent.parent if resolved.parent.name == rundir.CHECKPOINT_DIR else resolved.parent
            )
            out = run_dir / "export" / step_name
        result = export(source, out)
    except (ExportError, UnsafeCheckpoint) as err:
        print(f"error: {err}", file=sys.stderr)
        return exits.CONFIG
    except CheckpointWriteError as err:  # its partial file is removed already
        print(f"error: {err}", file=sys.stderr)
        return exits.FAILED
    if read_manifest(source) is None:  # said once it loaded: a refusal stays the only line
        print(
            f"note: {source} has no manifest (not written by trainer): exported unverified", file=sys.stderr
        )
    print(
        f"exported step {result['step']} ({result['tensors']} tensors, "
        f"{result['bytes'] / 1e6:.1f} MB) from {source} to {out}"
    )
    return 0
