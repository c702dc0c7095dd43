"""A GPT-style byte-level language model on text every machine has: the Python standard library's source.

The corpus is the standard library's top-level ``*.py`` files (found with ``sysconfig``; no
download), sorted by name: every tenth file is held out for validation, the rest is the training
text, capped at ``max_bytes``. A training sample is ``block + 1`` bytes starting at chunk
``i * block`` shifted by a random offset (drawn from the per-sample seed the elastic input pipeline
sets, so it differs across ranks and epochs and repeats on a repeated run). The model is a
pre-norm decoder-only transformer (causal self-attention, GELU MLP, tied embeddings), about 1.2M
parameters at the defaults. Evaluation reports validation loss, perplexity and bits per byte.

What it exercises: ``build_optimizer`` (AdamW, no weight decay on norms, biases and embeddings),
the ``lr_schedule(tau, total_progress)`` hook (linear warm-up then cosine, written in tau),
gradient clipping, evaluation during training, a per-step metric (bits per byte).

    elastic run examples/charlm.yaml
"""

from __future__ import annotations

import math
import random
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def stdlib_text(max_bytes: int, validation_every: int = 10) -> tuple[bytes, bytes]:
    """(train, validation) bytes from the standard library's top-level modules, split by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise RuntimeError(f"no *.py files in {sysconfig.get_paths()['stdlib']}")
    train, val = bytearray(), bytearray()
    for k, path in enumerate(files):
        target = val if k % validation_every == 0 else train
        target += path.read_bytes()
    return bytes(train[:max_bytes]), bytes(val)


class ByteChunks(torch.utils.data.Dataset):
    """Item i: ``block + 1`` bytes from ``i * block`` plus a random shift in [0, block) (train only)."""

    def __init__(self, data: bytes, block: int, shift: bool) -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.block, self.shift = block, shift

    def __len__(self) -> int:
        return (len(self.data) - 2 * self.block - 1) // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.block + (random.randrange(self.block) if self.shift else 0)
        chunk = self.data[start:start + self.block + 1].long()
        return {"x": chunk[:-1], "y": chunk[1:]}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, block: int, dim: int, layers: int, heads: int, vocab: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.ln(self.blocks(h)) @ self.tok.weight.T  # tied input / output embeddings


class CharLMTask:
    """``task: examples.charlm:CharLMTask``."""

    def __init__(self, block: int = 64, dim: int = 128, layers: int = 6, heads: int = 4,
                 max_bytes: int = 2_000_000, val_chunks: int = 64, lr: float = 1e-3,
                 weight_decay: float = 0.1, warmup_fraction: float = 0.05) -> None:
        train, val = stdlib_text(max_bytes)
        self.train = ByteChunks(train, block, shift=True)
        self.val = ByteChunks(val, block, shift=False)
        self.val_chunks = min(val_chunks, len(self.val))
        self.block, self.dim, self.layers, self.heads = block, dim, layers, heads
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction

    def build_model(self) -> nn.Module:
        return ByteGPT(self.block, self.dim, self.layers, self.heads)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "tok" not in n and "pos" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "tok" not in n and "pos" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.95))

    def lr_schedule(self, tau: float, total_progress: float) -> float:
        """Linear warm-up over the first ``warmup_fraction`` of tau, then cosine to 10%."""
        warmup = self.warmup_fraction * total_progress
        if tau < warmup:
            return (tau + 1) / (warmup + 1)
        frac = min(1.0, (tau - warmup) / max(total_progress - warmup, 1e-9))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.train

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["x"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())
        return loss, {"bits_per_byte": float(loss.detach()) / math.log(2)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for start in range(0, self.val_chunks, 16):
            items = [self.val[i] for i in range(start, min(start + 16, self.val_chunks))]
            x = torch.stack([it["x"] for it in items]).to(device)
            y = torch.stack([it["y"] for it in items]).to(device)
            logits = model(x).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
        model.train(was_training)
        val_loss = total / count
        return {"val_loss": val_loss, "val_perplexity": math.exp(val_loss), "val_bits_per_byte": val_loss / math.log(2)}
