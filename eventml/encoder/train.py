"""The encoder's training loop: losses (masked multi-task BCE, the self-supervised aux task),
metrics, the training step and early stopping. Torch and numpy only, like the model."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from eventml.encoder.batches import batches_in, iter_part_batches, to_tensors
from eventml.encoder.infer import outputs
from eventml.encoder.model import Encoder, masked_bce

# ----------------------------------------------------------------------------- metrics


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) ROC AUC with tied scores given their average rank; NaN unless
    both classes are present. numpy only: the GPU box may have no scikit-learn."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(
        np.asarray(p, dtype=np.float64), return_inverse=True, return_counts=True
    )
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    patience: int = 3  # epochs without improvement before stopping
    monitor: Literal["loss", "auc"] = "loss"  # validation task loss, or mean AUC over tasks
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True  # bf16 autocast on CUDA; CPU always trains in fp32
    compile: bool = False  # torch.compile on CUDA
    # Batches of similar history length, cut to their longest: the same function of each batch
    # with less padding computed, but batches are less mixed, which can slow learning where
    # length and label correlate; off by default.
    bucket_by_length: bool = False
    eval_batch_size: int = 1024


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)  # one dict per epoch


Arrays = dict[str, np.ndarray]


def train(
    model: Encoder,
    train_data: Arrays | list[Arrays],
    valid_data: Arrays | list[Arrays] | None,
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = None,
    steps_per_epoch: int | None = None,
) -> TrainResult:
    """Train in place with AdamW, linear warmup then cosine decay, and early stopping; the
    model ends with the weights of its best epoch. Deterministic on CPU for a given seed.

    `log` receives one line per epoch (losses, validation loss and AUC per task, LR,
    sequences/s); the same figures are in `TrainResult.history`. Without validation data (or
    with no known validation label) the training loss, self-supervised part included, is
    monitored: a label-free pretraining run keeps its best epoch, not its first. On CUDA the
    arrays are moved to the GPU once, up front.

    The rows may come in parts (a list of arrays, e.g. a cluster worker's shards), which are
    never concatenated: each batch is drawn from one part (`iter_part_batches`).

    Inside a data-parallel group (`torch.distributed` initialized, as on a Ray Train worker) each
    replica trains on its own rows, `config.batch_size` of them a step, `steps_per_epoch` steps
    an epoch (the same on every replica), and validates on its own validation rows; the group's
    figures are computed over all of them, so the replicas agree on the best epoch and on when
    to stop.
    """
    log = log or (lambda line: None)
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)  # dropout and masked_event's choice of events
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if not cuda:  # CUDA's fused attention backward has no deterministic variant
        torch.use_deterministic_algorithms(True)
    try:
        return _train(model, train_data, valid_data, config, log, device, steps_per_epoch)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def make_train_step(
    model: Encoder, config: TrainConfig, total_steps: int
) -> tuple[
    Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    torch.optim.lr_scheduler.LRScheduler,
]:
    """One optimisation step as a function of a batch, and its LR schedule; `train` and the
    benchmarks run this same step. The model must already be on `config.device`."""
    cuda = torch.device(config.device).type == "cuda"
    step_model = torch.compile(model) if config.compile and cuda else model
    if _distributed():
        # One replica of a data-parallel group (a Ray Train worker): gradients are averaged over
        # the replicas in backward, so each step is the step of the replicas' batches together.
        device_ids = [torch.device(config.device).index] if cuda else None
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=device_ids)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config.bf16 else nullcontext()
    )

    # Weight decay on matrices and embeddings only, not on biases and norms (nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=cuda)
    warmup = min(config.warmup_steps, max(1, total_steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast:
            out = step_model(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        schedule.step()
        return out

    return step, schedule


def _parts(data: Arrays | list[Arrays] | None) -> list[Arrays]:
    return [] if data is None else data if isinstance(data, list) else [data]


def _train(model, train_data, valid_data, config, log, device, steps_per_epoch) -> TrainResult:
    cuda = device.type == "cuda"
    model.to(device)
    train_t = [to_tensors(part, device if cuda else "cpu") for part in _parts(train_data)]
    valid_parts = _parts(valid_data)
    has_labels = bool(valid_parts) and all("labels" in part for part in valid_parts)
    valid_t = [to_tensors(part, device if cuda else "cpu") for part in valid_parts]
    valid_t = valid_t if has_labels else None
    if steps_per_epoch is None:
        steps_per_epoch = sum(batches_in(len(part["mask"]), config.batch_size) for part in train_t)
    step, schedule = make_train_step(model, config, config.epochs * max(1, steps_per_epoch))

    higher_is_better = config.monitor == "auc"
    best = TrainResult(best_epoch=-1, best_metric=float("nan"))
    best_state, stale = None, 0
    for epoch in range(config.epochs):
        start = time.perf_counter()
        model.train()
        # the four losses, summed on the device and read once an epoch (no sync a step)
        sums = torch.zeros(4, device=device)
        steps = 0
        batches = iter_part_batches(
            train_t,
            config.batch_size,
            seed=config.seed + epoch,
            steps=steps_per_epoch,
            bucket=config.bucket_by_length,
            device=device,
        )
        for batch in batches:
            out = step(batch)
            losses = [out["loss"], out["task_loss"], out["aux_loss"], out["outlook_loss"]]
            sums += torch.stack(losses).detach()
            steps += 1
        if _distributed():  # every replica logs, and early-stops on, the group's figures
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        train_loss, train_task, train_aux, train_outlook = (sums / max(steps, 1)).tolist()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_task_loss": train_task,
            "train_aux_loss": train_aux,
            "train_outlook_loss": train_outlook,
            "lr": schedule.get_last_lr()[0],
        }
        if valid_t is not None:
            row.update(evaluate(model, valid_t, config.eval_batch_size, gather=_distributed()))
        row["seconds"] = time.perf_counter() - start
        replicas = dist.get_world_size() if _distributed() else 1
        row["sequences_per_s"] = replicas * steps * config.batch_size / row["seconds"]

        metric = row.get("valid_mean_auc" if higher_is_better else "valid_loss", float("nan"))
        if math.isnan(metric):  # nothing labelled to validate on: the training loss, aux included
            metric, higher_is_better = train_loss, False
        row["monitored"] = metric
        best.history.append(row)
        log(_format(row))

        improved = math.isnan(best.best_metric) or (
            metric > best.best_metric if higher_is_better else metric < best.best_metric
        )
        if improved:
            best.best_epoch, best.best_metric, stale = epoch, metric, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                log(f"early stop after epoch {epoch}: no improvement for {stale} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        log(f"restored epoch {best.best_epoch} (monitored {best.best_metric:.4f})")
    return best


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def evaluate(
    model: Encoder,
    data: dict[str, np.ndarray | torch.Tensor] | list[dict[str, np.ndarray | torch.Tensor]],
    batch_size: int = 1024,
    gather: bool = False,
) -> dict:
    """valid_loss: the task loss over every known label (not a mean of batch means);
    valid_auc_<task> per task and valid_mean_auc over the tasks that have both classes. With
    `gather`, a collective call of a data-parallel group whose replicas each hold a part of the
    validation rows: the figures over every replica's rows, the same on each."""
    parts = _parts(data)
    logits = torch.cat([outputs(model, part, ("logits",), batch_size)[0] for part in parts])
    labels = torch.cat([torch.as_tensor(part["labels"]).to(logits.device) for part in parts])
    if gather:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (logits.cpu(), labels.cpu()))
        logits = torch.cat([theirs for theirs, _ in everyone]).to(labels.device)
        labels = torch.cat([theirs for _, theirs in everyone]).to(logits.device)
    row = {"valid_loss": masked_bce(logits, labels, model.task_weights).item()}
    if not (~torch.isnan(labels)).any():
        row["valid_loss"] = float("nan")
    aucs = []
    for j, task in enumerate(model.config.tasks):
        known = ~torch.isnan(labels[:, j])
        auc = roc_auc(labels[known, j].cpu().numpy(), logits[known, j].cpu().numpy())
        row[f"valid_auc_{task}"] = auc
        aucs.append(auc)
    finite = [a for a in aucs if not math.isnan(a)]
    row["valid_mean_auc"] = float(np.mean(finite)) if finite else float("nan")
    return row


def _format(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    parts += [
        f"{k} {v:.4f}"
        for k, v in row.items()
        if k not in ("epoch", "seconds", "sequences_per_s", "lr")
    ]
    parts += [f"lr {row['lr']:.2e}", f"{row['sequences_per_s']:.0f} seq/s"]
    return ", ".join(parts)
