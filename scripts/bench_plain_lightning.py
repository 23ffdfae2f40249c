"""The quickstart's module and data in a plain Lightning script: the baseline that `make bench` holds
`trainer train` against (tokens/s, and process start to the end of the first step).

The same GPT, text data, AdamW with its parameter groups, warmup-cosine schedule and clipping as
`trainer train experiment=gpt_quickstart`, built from the same config; none of trainer's callbacks, loggers,
checkpoints or checks. Prints one JSON line: steady tokens/s (after 10 steps, validation excluded).

    python scripts/bench_plain_lightning.py [steps]
"""

from __future__ import annotations

import json
import sys
import time

import pytorch_lightning as pl

from trainer.config.compose import compose, session
from trainer.fit import build_data, build_model


class Speed(pl.Callback):
    def __init__(self, warmup: int = 10) -> None:
        self.warmup, self.started, self.samples = warmup, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.samples += batch[0].shape[0]


def main(steps: int) -> None:
    with session():
        c = compose(["experiment=gpt_quickstart", f"trainer.max_steps={steps}"], where="local")
    pl.seed_everything(c.conf.seed, verbose=False)
    model, data = build_model(c), build_data(c)
    speed = Speed()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=c.conf.trainer.gradient_clip_val,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[speed])  # fmt: skip
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - speed.started
    tokens = speed.samples * model.tokens_per_sample() / seconds if speed.samples else None
    print(json.dumps({"tokens_per_sec": tokens, "steps": trainer.global_step}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
