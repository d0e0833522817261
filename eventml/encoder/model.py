"""The sequence encoder: a small Transformer over a decision's prior events, its config, and
save/load without pickle (the training loop is `eventml.encoder.train`).

Imports only torch, numpy and the standard library, so the same file trains on a GPU box that
has neither polars nor dagster. Its input is a dict of tensors built by `eventml.sequences`:

    event_type (B, K) int64, 0 = padding   cats (B, K, C) int64   nums (B, K, F) float32
    time       (B, K, T) float32           mask (B, K) bool, True = a real event
    labels     (B, n_tasks) float32, NaN where the label is missing or not yet matured (optional)
    outlook    (B, n_outlook) float32, the same for the outlook targets (optional)

Layout, top to bottom: config, model (attention → block → encoder), save/load.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

BATCH_KEYS = ("event_type", "cats", "nums", "time", "mask", "labels", "outlook")
ROW_KEYS = ("labels", "outlook")  # one value per row, not per event: never cut to a width
IGNORE = -100  # cross-entropy target for positions the aux task does not score


@dataclass(frozen=True)
class EncoderConfig:
    """The model's shape and objective; the input sizes come from
    `eventml.sequences.SequenceSpec.encoder_dims()`."""

    n_event_types: int  # vocabulary size including the padding id 0
    cat_cardinalities: tuple[int, ...] = ()  # one per categorical attribute, ids in [0, card)
    n_numeric: int = 0  # F: numeric features per event
    n_time_features: int = 0  # T: time encodings per event
    max_len: int = 128  # K: the most recent events kept before each decision
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    emb_dim: int = 32  # width of the pooled embedding handed to the scorer
    tasks: tuple[str, ...] = ("target",)  # the dataset pack's labels (eventml.embedding)
    task_weights: tuple[float, ...] = (1.0,)
    # The self-supervised task that learns from every sequence, labelled or not.
    aux_task: Literal["masked_event", "next_event"] = "masked_event"
    aux_weight: float = 0.5
    mask_prob: float = 0.15  # share of real events hidden per sequence by "masked_event"
    # Outlook targets: what happens to the person soon after the decision (e.g. "a late payment
    # within 30 days"), predicted from the embedding. They mature fast, so they teach the
    # embedding on fresher and older histories than the decision labels can; never scored.
    outlook: tuple[str, ...] = ()
    outlook_weight: float = 1.0  # of their mean BCE in the loss

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if len(self.task_weights) != len(self.tasks):
            raise ValueError(
                f"task_weights has {len(self.task_weights)} entries for {len(self.tasks)} tasks "
                f"{self.tasks}; give one weight per task"
            )
        if self.aux_task not in ("masked_event", "next_event"):
            raise ValueError(f"aux_task={self.aux_task!r}: use 'masked_event' or 'next_event'")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob={self.mask_prob} must lie strictly between 0 and 1")

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        # JSON has no tuples; turn its lists back so the frozen config compares and hashes.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_heads = config.n_heads
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN: normalising before each sublayer keeps the residual stream an identity path,
    which trains stably without a long learning-rate warmup."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        x = x + self.mlp(self.ln_2(x))
        return x


class Encoder(nn.Module):
    """Events → per-position states → one pooled embedding → a logit per task.

    Pooling is a masked mean rather than a CLS token: every real event reaches the embedding
    directly (which trains faster on short histories), no extra slot makes T = K + 1 (a multiple
    of 16 suits the GPU attention kernels), and an empty history pools to zero, so it gets the
    projection's bias as its embedding: finite, and the same for everyone with no history.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.mask_id = config.n_event_types  # one extra row: the [MASK] input of masked_event
        self.wte = nn.Embedding(config.n_event_types + 1, d)
        # All categorical attributes share one table, each at its own offset, and an
        # EmbeddingBag sums a position's C lookups in one kernel without a (B, T, C, d) tensor.
        cards = config.cat_cardinalities
        self.wce = nn.EmbeddingBag(sum(cards), d, mode="sum") if cards else None
        offsets = torch.tensor([0, *np.cumsum(cards)[:-1]], dtype=torch.long) if cards else None
        self.register_buffer("cat_offsets", offsets, persistent=False)
        # A buffer, so the loss reads the weights on the model's device without a copy per step.
        self.register_buffer("task_weights", torch.tensor(config.task_weights), persistent=False)
        n_features = config.n_numeric + config.n_time_features
        self.wfe = nn.Linear(n_features, d) if n_features else None
        # Sequences are right-aligned, so position K-1 is always the most recent event and this
        # embedding encodes recency rank, which the time features only give up to its log.
        self.wpe = nn.Embedding(config.max_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.to_emb = nn.Linear(d, config.emb_dim)
        self.task_head = nn.Linear(config.emb_dim, len(config.tasks))
        self.outlook_head = (
            nn.Linear(config.emb_dim, len(config.outlook)) if config.outlook else None
        )
        self.register_buffer(
            "outlook_weights",
            torch.full((len(config.outlook),), 1.0 / max(1, len(config.outlook))),
            persistent=False,
        )
        self.aux_head = nn.Linear(d, config.n_event_types)  # per position: which event type

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream (nanoGPT model.py).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns emb (B, E), logits (B, n_tasks), aux_logits (B, K, V); with `labels` in the
        batch also loss, task_loss, aux_loss and outlook_loss (zero without `outlook`)."""
        cfg = self.config
        mask = batch["mask"]  # (B, T)
        B, T = mask.shape
        # Canonical padding: whatever padded slots hold (even NaN) is replaced before use, so it
        # cannot reach any output, gradient included.
        pad = ~mask[..., None]
        event_type = batch["event_type"].masked_fill(~mask, 0)  # (B, T)
        cats = batch["cats"].masked_fill(pad, 0)  # (B, T, C)
        nums = batch["nums"].masked_fill(pad, 0.0)  # (B, T, F)
        times = batch["time"].masked_fill(pad, 0.0)  # (B, T, n_time)

        aux_target = None
        if cfg.aux_weight > 0 and cfg.aux_task == "masked_event" and self.training:
            # BERT-style: hide what happened at a few events (type, attributes, amounts) but keep
            # when it happened; the model must infer it from the rest of the history.
            hidden = (torch.rand(B, T, device=mask.device) < cfg.mask_prob) & mask  # (B, T)
            aux_target = event_type.masked_fill(~hidden, IGNORE)
            event_type = event_type.masked_fill(hidden, self.mask_id)
            cats = cats.masked_fill(hidden[..., None], 0)
            nums = nums.masked_fill(hidden[..., None], 0.0)
        elif cfg.aux_weight > 0 and cfg.aux_task == "next_event":
            # Position t predicts the type at t+1, scored where both are real events.
            aux_target = torch.full_like(event_type, IGNORE)
            both = mask[:, :-1] & mask[:, 1:]
            aux_target[:, :-1] = event_type[:, 1:].masked_fill(~both, IGNORE)

        pos = torch.arange(cfg.max_len - T, cfg.max_len, device=mask.device)  # right-aligned
        x = self.wte(event_type) + self.wpe(pos)  # (B, T, d)
        if self.wce is not None:
            x = x + self.wce((cats + self.cat_offsets).view(B * T, -1)).view(B, T, -1)
        if self.wfe is not None:
            x = x + self.wfe(torch.cat([nums, times], dim=-1))
        x = self.drop(x)

        allowed = self._attention_mask(mask)
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln_f(x)  # (B, T, d)

        w = mask[..., None].to(x.dtype)  # (B, T, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, d); zero for an empty history
        emb = self.to_emb(pooled)  # (B, E)
        out = {"emb": emb, "logits": self.task_head(emb), "aux_logits": self.aux_head(x)}
        if "labels" in batch:
            out["task_loss"] = masked_bce(out["logits"], batch["labels"], self.task_weights)
            out["aux_loss"] = (
                aux_cross_entropy(out["aux_logits"], aux_target)
                if aux_target is not None
                else torch.zeros((), device=mask.device)
            )
            out["outlook_loss"] = (
                masked_bce(self.outlook_head(emb), batch["outlook"], self.outlook_weights)
                if self.outlook_head is not None and "outlook" in batch
                else torch.zeros((), device=mask.device)
            )
            out["loss"] = (
                out["task_loss"]
                + cfg.aux_weight * out["aux_loss"]
                + cfg.outlook_weight * out["outlook_loss"]
            )
        return out

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """True where a query may attend to a key: (B, 1, 1, T), or (B, 1, T, T) when causal."""
        B, T = mask.shape
        # Real events never attend to padding. An empty history attends over its (canonical)
        # padding instead, so no softmax row is all -inf (which would give NaN).
        keys = mask | ~mask.any(dim=1, keepdim=True)  # (B, T)
        allowed = keys[:, None, None, :]
        if self.config.aux_task == "next_event":
            # Causal, so position t cannot read the event it must predict. A padded query left of
            # the first event then sees no key at all: let every position see itself.
            causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=mask.device)
            allowed = (allowed & causal) | eye  # (B, 1, T, T)
        return allowed

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Encoder:
        path = Path(path)
        config = EncoderConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = cls(config)
        state = torch.load(path / "state_dict.pt", map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model.eval()


# ----------------------------------------------------------------------------- losses


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over tasks of the mean BCE over the labels that are known (not NaN).

    A missing or unmatured label is selected away by `where`, not multiplied by zero, so it adds
    neither loss nor gradient; a task with no known label in the batch contributes zero.
    """
    logits = logits.float()  # (B, n_tasks); the loss in fp32 whatever the autocast dtype
    known = ~torch.isnan(labels)
    bce = F.binary_cross_entropy_with_logits(logits, labels.nan_to_num(0.0), reduction="none")
    per_task = torch.where(known, bce, 0.0).sum(0) / known.sum(0).clamp(min=1)  # (n_tasks,)
    return (per_task * weights).sum()


def aux_cross_entropy(aux_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions; zero, not NaN, when a batch scores none."""
    scored = (target != IGNORE).sum()
    total = F.cross_entropy(
        aux_logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total / scored.clamp(min=1)


# ----------------------------------------------------------------------------- save / load


def save(model: Encoder, path: str | Path) -> Path:
    """Write config.json and state_dict.pt (tensors only: `Encoder.load` reads it with
    weights_only=True, so loading a checkpoint cannot run code)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every key
    (path / "config.json").write_text(json.dumps(asdict(model.config), indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path / "state_dict.pt")
    return path
