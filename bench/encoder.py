"""Training throughput of the sequence encoder against a plain PyTorch reference of the same size.

    python bench/encoder.py                       # CPU defaults, about 1-2 minutes on 2 cores
    python bench/encoder.py --device cuda --d-model 128 --layers 4 --max-len 256 --batch 1024 \
        --bf16 --compile

Ours: `eventml.encoder.make_train_step` (the step `train` runs: multi-task + aux loss, AdamW,
schedule, clipping) fed by `iter_batches` with shuffling, from numpy arrays as
`eventml.sequences` builds them (int32 ids widened per batch). On CUDA the arrays are moved to
the GPU once, as `train` does. Measured twice: every batch at full width K ("ours"), and with
`bucket=True` ("ours_bucketed", TrainConfig.bucket_by_length): batches of similar length cut
to their longest history, which skips padding; the synthetic lengths are uniform on 1..K, so
about half the slots are padding.

Reference: `nn.TransformerEncoder` (pre-LN, GELU; same width, depth, heads, K and batch) with
an event-type embedding, a feature projection, masked-mean pooling and one BCE head, trained by
a plain loop over contiguous slices of tensors already in place.

Imports only torch, numpy and the standard library, so it runs on a GPU box without polars.
Prints sequences/s for both (median of interleaved rounds), the ratio, and on CUDA the GPU-side
time per step (CUDA events).

Threads: the step budget of `eventml.threads` (all cores given, by default). On CPU it then
measures ours again beside a second training process, as a second heavy step or a retrain on
the same machine would run: first each with its share of the cores (EVENTML_STEPS_AT_ONCE=2's
budget), then each taking every core (no budget, as before there was one), each figure as a
fraction of ours alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eventml.encoder import (  # noqa: E402
    Encoder,
    EncoderConfig,
    TrainConfig,
    iter_batches,
    make_train_step,
    to_tensors,
)
from eventml.threads import cores_given, thread_environment, use_step_threads  # noqa: E402

N_TYPES, CATS, N_NUMERIC, N_TIME = 24, (1025, 18, 6), 4, 6  # about what the simulator's spec gives


def synthetic_arrays(n: int, max_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays shaped like `build_sequences` output: right-aligned histories of 1..K events."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n)
    mask = np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    cats = np.stack([rng.integers(1, c, (n, max_len)) for c in CATS], axis=2) * mask[..., None]
    labels = rng.integers(0, 2, (n, 2)).astype(np.float32)
    labels[rng.random((n, 2)) < 0.3] = np.nan  # unmatured labels
    return {
        "event_type": (rng.integers(1, N_TYPES + 1, (n, max_len)) * mask).astype(np.int32),
        "cats": cats.astype(np.int32),
        "nums": (rng.normal(size=(n, max_len, N_NUMERIC)) * mask[..., None]).astype(np.float32),
        "time": (rng.normal(size=(n, max_len, N_TIME)) * mask[..., None]).astype(np.float32),
        "mask": mask,
        "labels": labels,
    }


class Reference(nn.Module):
    """What a plain PyTorch model of the same size looks like."""

    def __init__(self, d_model: int, layers: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(N_TYPES + 1, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.wfe = nn.Linear(N_NUMERIC + N_TIME, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            4 * d_model,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, event_type, feats, mask):
        pos = torch.arange(event_type.shape[1], device=event_type.device)
        x = self.wte(event_type) + self.wpe(pos) + self.wfe(feats)
        x = self.ln_f(self.blocks(x, src_key_padding_mask=~mask))
        w = mask[..., None].to(x.dtype)
        return self.head((x * w).sum(1) / w.sum(1)).squeeze(-1)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(run_steps, steps: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per step of wall time, and of GPU time on CUDA (events around the same steps)."""
    sync(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    run_steps(steps)
    if device.type == "cuda":
        end.record()
    sync(device)
    wall = (time.perf_counter() - start) / steps
    gpu = begin.elapsed_time(end) / 1000 / steps if device.type == "cuda" else None
    return wall, gpu


def setup_ours(args, arrays, device, bucket: bool):
    """The project's training step fed by iter_batches; returns run_steps(k)."""
    config = EncoderConfig(
        n_event_types=N_TYPES + 1,
        cat_cardinalities=CATS,
        n_numeric=N_NUMERIC,
        n_time_features=N_TIME,
        max_len=args.max_len,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        dropout=args.dropout,
        tasks=("task_a", "task_b"),
        task_weights=(1.0, 1.0),
    )
    model = Encoder(config).to(device)
    train_config = TrainConfig(
        batch_size=args.batch,
        device=str(device),
        bf16=args.bf16,
        compile=args.compile,
        warmup_steps=10,
    )
    step, _ = make_train_step(model, train_config, total_steps=1000)
    data = to_tensors(arrays, device) if device.type == "cuda" else arrays
    state = {"epoch": 0, "batches": iter(())}

    def run_steps(k: int):
        for _ in range(k):
            batch = next(state["batches"], None)
            if batch is None:  # a new epoch: reshuffle, as train does
                state["epoch"] += 1
                state["batches"] = iter_batches(
                    data,
                    args.batch,
                    shuffle=True,
                    seed=state["epoch"],
                    drop_last=True,
                    bucket=bucket,
                    device=device,
                )
                batch = next(state["batches"])
            step(batch)

    print(
        f"ours{' (length-bucketed)' if bucket else ''}: {model.num_params():,} parameters",
        flush=True,
    )
    return run_steps


def setup_reference(args, arrays, device):
    """A plain loop over a plain model; returns run_steps(k)."""
    model = Reference(args.d_model, args.layers, args.heads, args.max_len, args.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    cuda_bf16 = device.type == "cuda" and args.bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda_bf16 else nullcontext()
    forward = torch.compile(model) if args.compile and device.type == "cuda" else model
    event_type = torch.as_tensor(arrays["event_type"]).long().to(device)
    feats = torch.cat([torch.as_tensor(arrays["nums"]), torch.as_tensor(arrays["time"])], -1).to(
        device
    )
    mask = torch.as_tensor(arrays["mask"]).to(device)
    target = torch.nan_to_num(torch.as_tensor(arrays["labels"][:, 0])).to(device)
    n = len(mask) - len(mask) % args.batch
    state = {"at": 0}

    def run_steps(k: int):
        for _ in range(k):
            i = slice(state["at"], state["at"] + args.batch)
            state["at"] = (state["at"] + args.batch) % n
            with autocast:
                logits = forward(event_type[i], feats[i], mask[i])
            loss = F.binary_cross_entropy_with_logits(logits.float(), target[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    print(f"reference: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    return run_steps


def parse(argv=None, **defaults) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=30, help="timed steps per model, all rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (compilation included)"
    )
    p.add_argument(
        "--rows", type=int, default=0, help="rows of synthetic data (default: 8 batches)"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA only)")
    p.add_argument("--only", choices=["reference", "ours", "ours_bucketed"], default=None)
    p.add_argument("--alone", action="store_true", help="skip the runs beside a second training")
    p.add_argument(
        "--neighbour", action="store_true", help=argparse.SUPPRESS
    )  # trains until killed
    p.set_defaults(**defaults)
    return p.parse_args(argv)


def median_rate(args, run_steps, device) -> float:
    rounds = [time_steps(run_steps, args.steps // args.rounds, device) for _ in range(args.rounds)]
    return args.batch / float(np.median([wall for wall, _ in rounds]))


@contextmanager
def training_process(threads: int, model_args: list[str] = (), preexec_fn=None):
    """A second process training ours (this bench's step, until stopped) on `threads`, from
    its first step on; `preexec_fn` sets how it shares the machine (priority, cores)."""
    neighbour = subprocess.Popen(
        [sys.executable, __file__, "--neighbour", *model_args],
        env={**os.environ, **thread_environment(threads)}, stdout=subprocess.PIPE, text=True,
        preexec_fn=preexec_fn,
    )  # fmt: skip
    try:
        while "training" not in (line := neighbour.stdout.readline()):
            if not line:
                raise RuntimeError("the second training process ended before it trained")
        yield
    finally:
        neighbour.kill()
        neighbour.wait()


def beside_a_neighbour(args, run_steps, threads: int) -> float:
    """Ours at `threads`, while a second process trains the same model at `threads`."""
    model = [f"--{name.replace('_', '-')}={getattr(args, name)}"
             for name in ("d_model", "layers", "heads", "max_len", "batch", "dropout", "rows")]  # fmt: skip
    with training_process(threads, model):
        torch.set_num_threads(threads)
        return median_rate(args, run_steps, torch.device("cpu"))


def main(argv=None, **defaults):
    args = parse(argv, **defaults)
    device = torch.device(args.device)
    torch.manual_seed(0)
    use_step_threads()
    if args.neighbour:
        run_steps = setup_ours(args, synthetic_arrays(args.rows or 8 * args.batch, args.max_len),
                               device, bucket=False)  # fmt: skip
        run_steps(1)
        print("training", flush=True)
        while True:
            run_steps(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        print(
            f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True
        )
    print(vars(args), flush=True)
    arrays = synthetic_arrays(args.rows or 8 * args.batch, args.max_len)
    setups = {
        "reference": lambda: setup_reference(args, arrays, device),
        "ours": lambda: setup_ours(args, arrays, device, bucket=False),
        "ours_bucketed": lambda: setup_ours(args, arrays, device, bucket=True),
    }
    runners = {name: make() for name, make in setups.items() if args.only in (None, name)}
    for run_steps in runners.values():
        run_steps(args.warmup)  # compilation, allocator and caches settle here
    # Rounds interleave the models so that load from other processes falls on all of them;
    # each figure is the median over rounds.
    timings = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run_steps in runners.items():
            timings[name].append(time_steps(run_steps, args.steps // args.rounds, device))
    results = {}
    for name, rounds in timings.items():
        wall = float(np.median([w for w, _ in rounds]))
        results[name] = args.batch / wall
        per_step = f"{wall * 1000:.1f} ms/step wall"
        if device.type == "cuda":
            gpu = float(np.median([g for _, g in rounds]))
            per_step += f", GPU time {gpu * 1000:.2f} ms/step ({args.batch / gpu:,.0f} seq/s)"
        print(f"{name}: {results[name]:,.0f} sequences/s ({per_step})", flush=True)
    for name in ("ours", "ours_bucketed"):
        if name in results and "reference" in results:
            print(f"ratio {name}/reference: {results[name] / results['reference']:.3f}", flush=True)
    if device.type == "cpu" and "ours" in results and not args.alone:
        alone, budget = results["ours"], torch.get_num_threads()
        for label, threads in (("each its share of the cores", max(1, cores_given() // 2)),
                               ("each every core (no budget)", cores_given())):  # fmt: skip
            rate = beside_a_neighbour(args, runners["ours"], threads)
            results[f"ours_beside ({threads} threads)"] = rate
            print(
                f"ours beside a second training, {label}, {threads} threads: {rate:,.0f} "
                f"sequences/s, {rate / alone:.2f}x ours alone ({budget} threads)",
                flush=True,
            )
        torch.set_num_threads(budget)
    return results


if __name__ == "__main__":
    main()
