"""The Triton kernel of ``fused_top2`` (which documents it), in its own module so that ``import triton`` (0.1 s)
happens only when the kernel runs, and after ``TRITON_INTERPRET`` is read."""

import triton
import triton.language as tl


@triton.jit
def top2_kernel(f_ptr, c_ptr, tv_ptr, i1_ptr, n_rows, n_params, stride_f, stride_c,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < n_rows
    v1 = tl.full((BM,), float("-inf"), tl.float32)
    v2 = tl.full((BM,), float("-inf"), tl.float32)
    i1 = tl.zeros((BM,), tl.int64)
    for n0 in range(0, n_params, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < n_params
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            f = tl.load(f_ptr + rows[:, None] * stride_f + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_c + ks[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
            if PREC == 1:
                acc = tl.dot(f, tl.trans(c), acc, input_precision="tf32")
            elif PREC == 2:
                acc = tl.dot(f, tl.trans(c), acc, input_precision="ieee")
            else:
                acc = tl.dot(f, tl.trans(c), acc)
        acc = tl.where(cmask[None, :], acc, float("-inf"))
        t1 = tl.max(acc, axis=1)
        a1 = tl.argmax(acc, axis=1).to(tl.int64)
        # the tile's second value: its best masked out at that one position (a repeated best stays)
        t2 = tl.max(tl.where(tl.arange(0, BN)[None, :] == a1[:, None], float("-inf"), acc), axis=1)
        gt = t1 > v1  # a tie keeps the earlier parameter; the margin is then 0: undecided, decided exactly
        v2 = tl.where(gt, tl.maximum(v1, t2), tl.maximum(v2, t1))
        i1 = tl.where(gt, n0 + a1, i1)
        v1 = tl.where(gt, t1, v1)
    tl.store(tv_ptr + 2 * rows, v1, mask=rmask)
    tl.store(tv_ptr + 2 * rows + 1, v2, mask=rmask)
    tl.store(i1_ptr + rows, i1, mask=rmask)
