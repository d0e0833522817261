"""The encoder throughput benchmark at GPU size: width 128, depth 4, K 256, batch 1024, bf16.

    python bench/encoder_gpu.py                    # on the GPU box (torch + numpy, no polars)
    python bench/encoder_gpu.py --compile          # both models under torch.compile
    python bench/encoder_gpu.py --device cpu --d-model 32 --layers 1 --max-len 32 --batch 64

The last line is a dry run on CPU. Same measurement as bench/encoder.py (which holds it), with
the GPU target's defaults. Target on an H200: ours >= 70,000 training sequences/s (a plain
reference reached 74,000 there).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import main  # noqa: E402  (bench/encoder.py; imports torch, numpy, eventml.encoder)

if __name__ == "__main__":
    main(
        device="cuda",
        d_model=128,
        layers=4,
        max_len=256,
        batch=1024,
        bf16=True,
        steps=50,
        warmup=10,
    )
