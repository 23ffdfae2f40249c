"""Using what was trained: ``trainer sample`` (text from a language model) and ``trainer evaluate`` (the
validation metrics of a run's newest checkpoint, e.g. a classifier's accuracy).

Both rebuild the model from the run's own ``config.yaml`` and load the weights of its newest valid checkpoint
(file or sharded) the way ``trainer export`` reads them: weights only, nothing in a checkpoint can run code.
One process, on the CPU unless ``--device`` says otherwise; nothing is written.

    trainer sample runs/gpt_quickstart-<hash> --prompt "def " --tokens 200
    trainer evaluate runs/digits_mlp-<hash>
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from trainer import exits, rundir

LANGUAGE_MODEL = "trainer.models.gpt.GPTModule"


class UseError(Exception):
    pass


def _config(run: Path) -> dict:
    """The run's resolved config (its config.yaml)."""
    config = run / rundir.CONFIG_FILE
    if not config.is_file():
        raise UseError(f"{run}: expected a run directory (no {rundir.CONFIG_FILE} here)")
    return yaml.safe_load(config.read_text())


def _load(run: Path, cfg: dict, device: str) -> tuple[Any, Path]:
    """The run's LightningModule with its newest weights, and the checkpoint used."""
    from hydra.utils import instantiate

    from trainer import namespace
    from trainer.export import ExportError, source_checkpoint

    try:
        checkpoint = source_checkpoint(run)
    except ExportError as err:
        raise UseError(str(err)) from None
    namespace.select(namespace.DEFAULT)
    from trainer.checkpoint.io import UnsafeCheckpoint
    from trainer.export import load_weights

    try:
        weights = load_weights(checkpoint)["state_dict"]
    except UnsafeCheckpoint as err:
        raise UseError(str(err)) from None
    model = instantiate({k: v for k, v in cfg["model"].items() if k != "compile"}, _convert_="all")
    model.load_state_dict(weights)
    return model.to(device).eval(), checkpoint


def sample(model: Any, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """``tokens`` more bytes after ``prompt`` from a byte-level GPT (``GPTModule.net``)."""
    import torch

    net = model.net
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(net.parameters()).device
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(tokens):
            logits = net(idx[:, -net.block_size :])[:, -1, :].float().cpu()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    cutoff = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < cutoff] = -float("inf")
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt.to(device)], dim=1)
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


def evaluate(model: Any, cfg: dict, device: str) -> dict[str, float]:
    """The run's validation metrics (what its module logs in ``validation_step``) on its validation set."""
    from hydra.utils import instantiate

    from trainer.namespace import pl

    data = instantiate(cfg["data"], _convert_="all")
    # The metrics are the answer: Lightning's notes about the machine and its advice are not.
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    trainer = pl.Trainer(accelerator=device, devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def main(argv: list[str], command: str) -> int:
    parser = argparse.ArgumentParser(prog=f"trainer {command}", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (its newest valid checkpoint is used)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or gpu")
    if command == "sample":
        parser.add_argument("--prompt", default="\n", help="the text to continue (default: a new line)")
        parser.add_argument(
            "--tokens", type=int, default=200, help="how many bytes to generate (default 200)"
        )
        parser.add_argument("--temperature", type=float, default=0.8, help="0: always the likeliest byte")
        parser.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest bytes only")
        parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    args = parser.parse_args(argv)
    if command == "sample" and (args.tokens < 1 or args.temperature < 0 or (args.top_k or 1) < 1):
        print("error: --tokens and --top-k must be at least 1, --temperature at least 0", file=sys.stderr)
        return exits.CONFIG
    run = Path(args.run)
    try:
        cfg = _config(run)
        target = (cfg.get("model") or {}).get("_target_")
        if command == "sample" and target != LANGUAGE_MODEL:
            raise UseError(f"{run}: its model is {target}; `trainer sample` continues text with {LANGUAGE_MODEL} "
                           "(`trainer evaluate` gives any run's validation metrics)")  # fmt: skip
        model, checkpoint = _load(run, cfg, args.device)
    except UseError as err:
        print(f"error: {err}", file=sys.stderr)
        return exits.CONFIG
    if command == "sample":
        print(sample(model, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
        return exits.OK
    metrics = evaluate(model, cfg, args.device)
    print(f"{checkpoint}: " + "   ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return exits.OK
