"""A decoder-only transformer language model (GPT-2 style) as a LightningModule.

Pre-norm blocks, causal self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient
kernels where the device has them), GELU MLP, optional tied input/output embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import optim as optim_lib
from trainer.namespace import pl


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The network alone (no training logic), so a hand-written loop can use the very same code."""

    def __init__(
        self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, dropout: float, bias: bool,
        tie_weights: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream: keeps its variance
        # independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per parameter (forward + backward multiply-adds) plus attention.

        Formula of Chowdhery et al. 2022 (PaLM), Appendix B: 6N + 12 * L * d * T, with N the parameters that
        take part in matmuls (the position embedding is a lookup, so it is left out).
        """
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        n_layer, d = len(self.blocks), self.wte.weight.shape[1]
        return 6.0 * n + 12.0 * n_layer * d * self.block_size


class GPTModule(pl.LightningModule):
    """Next-token prediction with cross-entropy; batches are (inputs, targets) token tensors."""

    # Keyword-only, without defaults: they live in one place, GPTConfig (trainer/config/schema.py).
    def __init__(
        self,
        *,
        n_layer: int,
        n_head: int,
        n_embd: int,
        block_size: int,
        vocab_size: int,
        dropout: float,
        bias: bool,
        tie_weights: bool,
        compile: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        # The optimizer and schedule are training settings (config.yaml records them), not the network's.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.net = GPT(n_layer, n_head, n_embd, block_size, vocab_size, dropout, bias, tie_weights)
        if compile:  # in place: parameter names (and so checkpoints) stay those of the eager module
            self.net.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        if self.optimizer is None:
            raise ValueError("GPTModule needs an optimizer to train (trainer passes the `optim` config)")
        return optim_lib.configure(self, self.optimizer, self.scheduler)

    # Read by the throughput monitor for tokens/s and MFU.
    def tokens_per_sample(self) -> int:
        return self.net.block_size

    def flops_per_sample(self) -> float:
        return self.net.flops_per_token() * self.net.block_size
