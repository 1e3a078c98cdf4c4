"""SASRec (Kang & McAuley, ICDM 2018): a causal self-attention next-item model, the baseline bar.

``SASRec`` is the plain ``nn.Module`` (readable on its own, like TorchRec's unsharded modules);
``SASRecModule`` is the Lightning stage that trains it and inherits the shared full-ranking
evaluation. Two training losses are offered:

* ``ce`` (default): softmax cross-entropy over the whole catalogue at every position. On ML-1M's
  3.7k items this is cheap and is known to train SASRec to a stronger, fairer baseline than the
  original loss (Klenitskiy & Vasilev, RecSys 2023).
* ``bce``: the original one-positive-one-sampled-negative binary loss.

Item embeddings are tied between input and output, as in the paper. With ``embedding="sharded"``
the input item table is a row-sharded ``ShardedEmbeddingCollection`` (trained by
``strategy=nestpipe`` with a row-wise optimizer) and the output layer gets its own dense item
matrix: full-catalogue softmax needs every row on every rank, which is exactly what sharding avoids
holding, so the two are untied in that mode.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nestrec.errors import ConfigError
from nestrec.evaluation import NextItemRecommender
from nestrec.pipeline.lightning import PipelinedLightningModule
from nestrec.schedules import with_schedule
from nestrec.sharding.item_embedding import ShardedItemEmbedding

__all__ = ["PipelinedSASRecModule", "SASRec", "SASRecModule", "sasrec_module"]


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block with causal, padding-aware attention."""

    def __init__(self, dim: int, heads: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        # Dropout on the [B, H, L, L] attention map dominated CPU step time (Bernoulli sampling),
        # so it has its own knob, off by default; residual/FFN dropout stays at ``dropout``.
        self.attention_dropout = attention_dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x))
            .view(batch, length, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        x = x + self.resid_dropout(self.out(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Item + position embeddings → causal Transformer blocks → hidden state per position."""

    def __init__(
        self,
        num_items: int,
        max_len: int = 200,
        dim: int = 64,
        blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attention_dropout: float = 0.0,
        input_embedding: nn.Module | None = None,
        similarity: str = "dot",
        temperature: float = 0.05,
    ):
        super().__init__()
        if similarity not in ("dot", "cosine"):
            raise ConfigError(f"unknown SASRec similarity {similarity!r}; expected dot or cosine")
        if similarity == "cosine" and not temperature > 0:
            raise ConfigError(f"SASRec temperature must be > 0 for cosine similarity, got {temperature}")
        self.num_items = num_items
        self.similarity = similarity
        self.temperature = temperature
        # Output item matrix (and, unless a sharded input table is given, the tied input table).
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.input_embedding = input_embedding
        self.position_embedding = nn.Embedding(max_len, dim)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(dim, heads, dropout, attention_dropout) for _ in range(blocks)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)
        nn.init.normal_(self.item_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, items: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``items [B, L]`` (left-padded with 0) → hidden ``[B, L, dim]`` (zero at padded positions).

        ``rows`` are the items' input embeddings when a pipeline has already looked them up.
        """
        batch, length = items.shape
        present = items > 0
        positions = torch.arange(length, device=items.device)
        if rows is None:
            rows = (
                self.input_embedding(items)
                if self.input_embedding is not None
                else self.item_embedding(items)
            )
        x = rows * self.scale + self.position_embedding(positions)
        x = self.embed_dropout(x) * present.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        # Attend to earlier real items; a position always sees itself so padded rows never go all-masked.
        attn_mask = (causal & present.unsqueeze(1)) | torch.eye(length, dtype=torch.bool, device=items.device)
        attn_mask = attn_mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, attn_mask) * present.unsqueeze(-1)
        return self.final_norm(x)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of hidden states against every item (tied embeddings; column 0 is padding)."""
        return self.similarity_to(hidden, self.item_embedding.weight)

    def similarity_to(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D]`` against item rows ``[N, D]`` → ``[..., N]``.

        ``cosine`` L2-normalises both sides and divides by a temperature (the retrieval set-up of
        Zhai et al. 2023 that the HSTU paper's SASRec numbers use): bounded logits keep popular
        items' norms from dominating the softmax, which speeds up and steadies training.
        """
        if self.similarity == "cosine":
            # Temperature folded into the [.., D] side: the same logits without another pass
            # over the [.., N] matrix (which costs a third of a CPU training step at N = 3.7k).
            return (F.normalize(hidden, dim=-1) / self.temperature) @ F.normalize(items, dim=-1).t()
        return hidden @ items.t()


class SASRecModule(NextItemRecommender):
    """Lightning stage for SASRec: next-item training on every position, full-ranking evaluation."""

    def __init__(
        self,
        num_items: int,
        max_len: int = 200,
        dim: int = 64,
        blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attention_dropout: float = 0.0,
        loss: Literal["ce", "bce"] = "ce",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        similarity: str = "dot",
        temperature: float = 0.05,
        ks: tuple[int, ...] = (1, 5, 10, 20, 50),
        exclude_history: bool = False,
        genre_item_mask: torch.Tensor | None = None,
        embedding: Literal["dense", "sharded"] = "dense",
        sparse_optimizer: str = "adam",
        sparse_lr: float = 1e-3,
        sharding: Literal["range", "cyclic"] = "range",
        seed: int = 0,
    ):
        super().__init__(num_items, genre_item_mask, ks, exclude_history)
        if loss not in ("ce", "bce"):
            raise ConfigError(f"unknown SASRec loss {loss!r}; expected ce or bce")
        if embedding not in ("dense", "sharded"):
            raise ConfigError(f"unknown SASRec embedding {embedding!r}; expected dense or sharded")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"unknown SASRec lr_schedule {lr_schedule!r}; expected constant or cosine")
        self.save_hyperparameters(ignore=["genre_item_mask"])
        sharded = (
            ShardedItemEmbedding(num_items, dim, sparse_optimizer, sparse_lr, sharding, seed)
            if embedding == "sharded"
            else None
        )
        self.model = SASRec(
            num_items,
            max_len,
            dim,
            blocks,
            heads,
            dropout,
            attention_dropout,
            input_embedding=sharded,
            similarity=similarity,
            temperature=temperature,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        present = batch["target"] > 0
        loss = self.token_loss(batch, self.model(batch["input"]), "mean")
        self.log("train/loss", loss, prog_bar=True, batch_size=int(present.shape[0]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=int(present.shape[0]))
        return loss

    def token_loss(
        self, batch: dict[str, torch.Tensor], hidden: torch.Tensor, reduction: str
    ) -> torch.Tensor:
        """Next-item loss over every real target position (``mean`` or ``sum`` over positions)."""
        target = batch["target"]
        present = target > 0
        hidden, target = hidden[present], target[present]
        if self.hparams.loss == "ce":
            # Score real items only (skip the padding row) instead of masking a copy of the logits.
            logits = self.model.similarity_to(hidden, self.model.item_embedding.weight[1:])
            return F.cross_entropy(logits, target - 1, reduction=reduction)
        negatives = torch.randint(1, self.num_items + 1, target.shape, device=target.device)
        weight = self.model.item_embedding.weight
        pos = self._pair_scores(hidden, weight[target])
        neg = self._pair_scores(hidden, weight[negatives])
        per_pair = F.binary_cross_entropy_with_logits(
            torch.stack([pos, neg], 1),
            torch.stack([torch.ones_like(pos), torch.zeros_like(neg)], 1),
            reduction="none",
        ).mean(1)
        return per_pair.sum() if reduction == "sum" else per_pair.mean()

    def _pair_scores(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Row-wise score of each hidden state against its own item row (the ``bce`` loss)."""
        if self.model.similarity == "cosine":
            return (F.normalize(hidden, dim=-1) * F.normalize(rows, dim=-1)).sum(-1) / self.model.temperature
        return (hidden * rows).sum(-1)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(batch["history"])[:, -1]
        return self.model.scores(hidden)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.98), weight_decay=self.hparams.weight_decay
        )
        return with_schedule(optimizer, self.hparams.lr_schedule, self.hparams.warmup_steps, self)


class PipelinedSASRecModule(PipelinedLightningModule, SASRecModule):
    """SASRec with a row-sharded input item table, split at the embedding boundary so every
    ``strategy.pipeline`` schedule trains it. The loss is the per-token sum divided by the local
    batch's number of target tokens — the same mean the unpipelined module takes.

    Dropout draws from the RNG per micro-batch, so ``fwp``/``nested`` match ``sync`` in
    distribution, not bit for bit, unless dropout is 0 (the brief's RNG-parity condition).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)

    def sharded_tables(self):
        return self.model.input_embedding.tables

    def sparse_features(self, batch: dict[str, torch.Tensor]):
        from nestrec.sparse import JaggedFeatures

        items = batch["input"]
        lengths = torch.full((items.shape[0],), items.shape[1], dtype=torch.long, device=items.device)
        return JaggedFeatures.from_dict({"history": (items.reshape(-1), lengths)})

    def select_samples(self, batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[index.to(v.device)] for k, v in batch.items()}

    def loss_normalizer(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["target"] > 0).sum())

    def loss_sum(self, batch: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        items = batch["input"]
        rows = pooled["history"].view(items.shape[0], items.shape[1], -1)
        return self.token_loss(batch, self.model(items, rows=rows), "sum")


def sasrec_module(**kwargs) -> SASRecModule:
    """The Hydra target: the pipelined module when the item table is sharded, the plain one otherwise."""
    if kwargs.get("embedding", "dense") == "sharded":
        return PipelinedSASRecModule(**kwargs)
    return SASRecModule(**kwargs)


# Its parameters are SASRecModule's (what config validation and ``inspect.signature`` read).
sasrec_module.__wrapped__ = PipelinedSASRecModule
