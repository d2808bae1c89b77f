"""The screened pass's product and top-2 in one Triton kernel: per row, the best two values of ``F @ C.T`` and the
best one's index, without writing the N x B product to memory.

Why (issue 10): at the full ImageNet pool (1,281,167 x 384, B = 12,812) the screened pass writes the bf16 product
block by block (33 GB per iteration) and reads it back for its top-2. By arithmetic on an H200 that costs about as
much again as the GEMM, and the GEMM alone is about 4 s of the 10 s goal for 300 iterations. Here each program
keeps a tile of rows, runs over the parameters tile by tile (``tl.dot``, float32 accumulation) and merges each
tile's best two into a running top-2: three numbers per row leave the chip. Its values are not rounded to bf16 on
output either, which narrows the screen's window (``Assigner.screen_windows``): on a 50k x 384 clustered pool the
rows left undecided fell from 22% to 12% at B = 1000 and from 31% to 18% at B = 5000 (measured on this CPU with
the same arithmetic).

Exactness does not rest on this kernel: every row whose margin is inside the window is decided exactly by
``Assigner._screened``. What a wrong kernel could break is checked before use: ``self_check`` compares it with a
float64 product of the same rounded inputs on the pool's own rows (values within float32 accumulation error, the
same argmax wherever the margin clears it). A mismatch, a compile error or no Triton leaves the materialised
product in charge and says why (``top2_kernel_fallback`` in the selection's info).

The tile sizes are fixed, not autotuned: an autotuner's timing-dependent choice would change which rows are
screened undecided from run to run (never the assignments, but the reported counts).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from bench_suite.activeft.rounding import accumulation_bound

# rows, parameters and depth per tile, warps, pipeline stages: bf16 inputs; float32 (TF32) ones
TILES = {"bf16": (128, 128, 64, 8, 3), "fp32": (128, 64, 32, 8, 3)}
INTERPRETER_TILE = 32  # the interpreter ignores warps and stages; small tiles keep numpy's work small
CHECK_ROWS = 4059  # pool rows compared by self_check: not a multiple of any tile, so the last tile is a partial one
PRECISION = {"default": 0, "tf32": 1, "ieee": 2}


def interpreted() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernel on CPU tensors with numpy: the tests' way."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(device: torch.device) -> str | None:
    """None when the kernel can run on ``device``, else why not (one line)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return None
    return f"the Triton kernel runs on a CUDA device (here {device}; on a CPU only under TRITON_INTERPRET=1)"


def top2(f: torch.Tensor, c: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``(tv, i1)``: per row of ``f`` (m x d) its best two values of ``f @ c.T`` (m x 2 float32, descending; the
    second is -inf when B = 1) and the best one's index (int64; the lowest among tiles, any within one on a tie).
    ``f`` and ``c``: both bfloat16 (exact products, float32 sums), or both float32 (TF32 inputs on a GPU).
    ``out``: reusable contiguous (m x 2 float32, m int64) buffers."""
    m, d = int(f.shape[0]), int(f.shape[1])
    b = int(c.shape[0])
    if f.dtype != c.dtype or f.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"top2 needs two bfloat16 or two float32 inputs, not {f.dtype} and {c.dtype}")
    tv, i1 = out if out is not None else (torch.empty((m, 2), dtype=torch.float32, device=f.device),
                                          torch.empty(m, dtype=torch.long, device=f.device))
    if m == 0:
        return tv, i1
    kind = "bf16" if f.dtype == torch.bfloat16 else "fp32"
    bm, bn, bk, warps, stages = TILES[kind]
    prec = "default" if kind == "bf16" else "tf32"
    if interpreted():
        bm = bn = bk = INTERPRETER_TILE
        prec = "ieee"
        # the interpreter misreads bfloat16 (checked with triton 3.8): the same values go in as float32
        f, c = f.float(), c.float()
    f = f if f.stride(1) == 1 else f.contiguous()
    c = c if c.stride(1) == 1 else c.contiguous()
    from bench_suite.activeft.fused_top2_kernel import top2_kernel  # imports triton: only when the kernel runs

    with warnings.catch_warnings():  # triton 3.8 calls block pointers deprecated (they compile to cp.async loads)
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
        top2_kernel[(-(-m // bm),)](f, c, tv, i1, m, b, f.stride(0), c.stride(0), D=d, BM=bm, BN=bn, BK=bk,
                                    PREC=PRECISION[prec], num_warps=warps, num_stages=stages)
    return tv, i1


def self_check(feats: torch.Tensor, n_params: int, screen: str) -> str | None:
    """None when the kernel gives, on up to ``CHECK_ROWS`` of this rank's rows against ``n_params`` pseudo-parameters
    (pool rows spread over the rank, in the screen's precision), the top-2 of the float64 product of the same
    rounded inputs within float32 accumulation error, and its argmax wherever the margin clears twice that, and
    writes nothing past its rows; else what went wrong (one line). Any exception (no GPU compiler, a Triton error)
    is reported, not raised."""
    why = why_unavailable(feats.device)
    if why is not None:
        return why
    n, d = int(feats.shape[0]), int(feats.shape[1])
    if n == 0:
        return None
    low = torch.bfloat16 if screen == "bf16" else torch.float32
    f = feats[: min(n, CHECK_ROWS)].to(low)
    pick = torch.linspace(0, n - 1, int(n_params), device=feats.device).round().long()
    c = feats.index_select(0, pick).to(low)
    m = int(f.shape[0])
    # outputs with a tail past the m rows, filled with sentinels: a write out of bounds shows there
    tv_all = torch.full((m + 256, 2), 7.0, dtype=torch.float32, device=f.device)
    i1_all = torch.full((m + 256,), -7, dtype=torch.long, device=f.device)
    try:
        tv, i1 = top2(f, c, out=(tv_all[:m], i1_all[:m]))
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        return f"the top-2 kernel failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    ref = f.double() @ c.double().T
    k = min(2, int(n_params))
    rv, ri = ref.topk(k, dim=1)
    unit = 2.0 ** -10 if screen == "tf32" else 0.0  # TF32 rounds the float32 inputs on a GPU
    err = f.double().norm(dim=1) * c.double().norm(dim=1).max() * (accumulation_bound(d) + 2 * unit + unit * unit)
    bound = err * 1.001 + 1e-30
    bad_val = ((tv[:, :k].double() - rv).abs() > bound[:, None]).any(dim=1)
    if k > 1:
        clear = (rv[:, 0] - rv[:, 1]) > 2 * bound
        bad_idx = clear & (i1 != ri[:, 0])
    else:
        bad_idx = i1 != ri[:, 0]
    bad = bad_val | bad_idx
    if bool((tv_all[m:] != 7.0).any()) or bool((i1_all[m:] != -7).any()):
        return "the top-2 kernel wrote past its rows"
    if bool(bad.any()):
        worst = float((tv[:, :k].double() - rv).abs().max())
        return (f"the top-2 kernel disagreed with the float64 product on {int(bad.sum())} of {f.shape[0]} rows "
                f"(largest value error {worst:.2e}, allowed about {float(bound.max()):.2e})")
    return None
