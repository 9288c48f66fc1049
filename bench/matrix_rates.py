"""The CPU's (or GPU's) matrix-multiplication rate in float32 and bfloat16 at a T5's shapes: the
bound on what any trainer reaches in each precision, printed beside bench/compare.py's figures.

    python bench/matrix_rates.py --model small

Each shape is one of the model's products for a batch of `rows` tokens: the attention projections
(d_model x inner), the gated feed-forward (d_model x d_ff, d_ff x d_model) and the LM head
(d_model x vocabulary). Each runs for about `seconds` after a warm-up; the rate is the FLOPs of
all shapes over their time (and each shape's own rate, for the range). Per CPU-second too: on one
thread of a machine shared with other work, that is the rate the core gives while it runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def t5_shapes(model: str, rows: int) -> List[Tuple[int, int, int]]:
    """(m, k, n) of the products a training step of `rows` tokens runs, one of each kind."""
    from ipu_t5.models import canonical_size

    size = canonical_size(model)
    return [(rows, size.d_model, size.inner_dim), (rows, size.d_model, size.d_ff), (rows, size.d_ff, size.d_model),
            (rows, size.d_model, size.vocab_size)]


def rate(m: int, k: int, n: int, dtype, device, seconds: float) -> Tuple[float, float, float]:
    """(FLOPs, seconds, CPU-seconds) of repeated (m x k) @ (k x n) products in `dtype`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: oneDNN picks and caches its kernel
    count, started, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        torch.matmul(a, b)
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2.0 * m * k * n * count, elapsed, time.process_time() - cpu


def matrix_rates(model: str, rows: int = 2048, seconds: float = 0.4) -> Dict[str, Dict[str, float]]:
    """GFLOP/s per precision: over all of the model's shapes, and the slowest and fastest shape."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates: Dict[str, Dict[str, float]] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        measured = [rate(m, k, n, dtype, device, seconds) for m, k, n in t5_shapes(model, rows)]
        each = [flops / elapsed / 1e9 for flops, elapsed, _ in measured]
        flops = sum(f for f, _, _ in measured)
        rates[name] = {"gflops": flops / sum(e for _, e, _ in measured) / 1e9,
                       "min_gflops": min(each), "max_gflops": max(each),
                       "gflops_per_cpu_second": flops / sum(c for _, _, c in measured) / 1e9}
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--rows", type=int, default=2048, help="tokens per product (batch x sequence)")
    args = parser.parse_args(argv)
    print(json.dumps(matrix_rates(args.model, args.rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
