"""``python -m bench_suite.bench.top2 [--device cuda] [--n N] [--b B] [--dim D]``: one screened pass's top-2, the
Triton kernel (``activeft.fused_top2``) at several tile sizes against the bf16 product written out block by block
and torch's top-k (the selector's path without the kernel), in the same run on the same rows.

Prints seconds per pass, TFLOPS (2 N B d per pass) and the ratio to the written-out product for each tile, and the
share of rows whose best parameter agrees between the two wherever the written-out margin is clear. The defaults
are the full ImageNet pool (1,281,167 x 384, B = 12,812). The kernel's tiles in ``fused_top2.TILES`` are fixed, not
autotuned: this is how to choose them on a new GPU. Without a GPU (or Triton) only the written-out product runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_suite.activeft import fused_top2
from bench_suite.bench.selector import sync
from bench_suite.runtime import resolve_device

# rows, parameters, depth per tile, warps, stages (the first: fused_top2.TILES["bf16"])
CANDIDATES = [fused_top2.TILES["bf16"], (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 128, 32, 4, 4), (128, 64, 64, 4, 3)]


def _best_of(fn, reps: int, device: torch.device) -> tuple[float, object]:
    out, best = None, float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def written_out(f: torch.Tensor, c: torch.Tensor, block: int, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The selector's path without the kernel: the bf16 product of each block and its top-k (float32 sums; k = 8:
    what the undecided rows' recheck costs per row, with or without the kernel)."""
    tv = torch.empty((f.shape[0], k), dtype=torch.float32, device=f.device)
    ti = torch.empty(f.shape[0], dtype=torch.long, device=f.device)
    cuda = torch.backends.cuda.matmul
    before = cuda.allow_bf16_reduced_precision_reduction
    cuda.allow_bf16_reduced_precision_reduction = False
    try:
        for s in range(0, f.shape[0], block):
            v, i = (f[s:s + block] @ c.T).topk(k, dim=1)
            tv[s:s + block] = v
            ti[s:s + block] = i[:, 0]
    finally:
        cuda.allow_bf16_reduced_precision_reduction = before
    return tv, ti


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--n", type=int, default=1281167)
    p.add_argument("--b", type=int, default=12812)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--block", type=int, default=0, help="rows per written-out block (0: the selector's GPU default)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=gen, device=device), dim=1)
    c = f[torch.randperm(args.n, generator=gen, device=device)[: args.b]]
    c = torch.nn.functional.normalize(c + 0.05 * torch.randn(c.shape, generator=gen, device=device), dim=1)
    f, c = f.to(torch.bfloat16), c.to(torch.bfloat16)
    flop = 2.0 * args.n * args.b * args.dim
    block = args.block or max(4096, (2 ** 30) // (4 * args.b))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.n} x {args.dim} rows, B = {args.b}, bf16, on {device} ({name}); {flop / 1e12:.2f} TFLOP per pass")
    t_ref, (rv, ri) = _best_of(lambda: written_out(f, c, block), args.reps, device)
    print(f"written out ({block} rows per block) + top-2: {t_ref:.4f} s per pass, {flop / t_ref / 1e12:.1f} TFLOPS")
    t8, _ = _best_of(lambda: written_out(f, c, block, 8), args.reps, device)
    print(f"written out + top-8 (the undecided rows' recheck; times the undecided share per iteration): {t8:.4f} s "
          "per pass")
    why = fused_top2.why_unavailable(device)
    if why is not None:
        print(f"no kernel timings: {why}")
        return 0
    clear = (rv[:, 0] - rv[:, 1]) > 0.02
    default = fused_top2.TILES["bf16"]
    try:
        for tiles in CANDIDATES:
            fused_top2.TILES["bf16"] = tiles
            try:
                fused_top2.top2(f[:4096], c)  # compile outside the timing
                t, (tv, i1) = _best_of(lambda: fused_top2.top2(f, c), args.reps, device)
            except Exception as exc:  # noqa: BLE001 - a tile the GPU cannot run is reported, the others still timed
                print(f"kernel {tiles}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            agree = float((i1[clear] == ri[clear]).float().mean()) if bool(clear.any()) else float("nan")
            print(f"kernel {tiles}: {t:.4f} s per pass, {flop / t / 1e12:.1f} TFLOPS, {t_ref / t:.2f}x the "
                  f"written-out path; same best where the margin > 0.02: {agree:.4%}")
    finally:
        fused_top2.TILES["bf16"] = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
