"""The Triton kernel of ``fused_top2`` (which documents it), in its own module so that ``import triton`` (0.1 s)
happens only when the kernel runs, and after ``TRITON_INTERPRET`` is read."""

import triton
import triton.language as tl


@triton.jit
def top2_kernel(f_ptr, c_ptr, tv_ptr, i1_ptr, n_rows, n_params, stride_f, stride_c,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # block pointers rather than tiles of 64-bit pointers: fewer registers (ptxas for sm_90a at 128 x 128 x 64, 8 warps,
    # with the launch's alignment hints: 166 per thread against 218; no spills either way), the same cp.async pipeline
    row0 = tl.program_id(0).to(tl.int64) * BM
    f_rows = f_ptr + row0 * stride_f  # the tile's first row, in 64 bits: element offsets of the pool overflow 32
    n_left = (n_rows - row0).to(tl.int32)
    v1 = tl.full((BM,), float("-inf"), tl.float32)
    v2 = tl.full((BM,), float("-inf"), tl.float32)
    i1 = tl.zeros((BM,), tl.int32)
    cols = tl.arange(0, BN)
    KT: tl.constexpr = (D + BK - 1) // BK
    acc = tl.zeros((BM, BN), tl.float32)
    # one loop over (parameter tile, depth step), so the load pipeline runs on across parameter tiles instead of
    # refilling for each (a tile is only D / BK = 6 steps deep at d = 384); the top-2 merge runs on a tile's last step
    for it in range(0, tl.cdiv(n_params, BN) * KT):
        kt = it % KT
        n0 = (it // KT) * BN
        fb = tl.make_block_ptr(f_rows, shape=(n_left, D), strides=(stride_f, 1), offsets=(0, kt * BK),
                               block_shape=(BM, BK), order=(1, 0))
        cb = tl.make_block_ptr(c_ptr, shape=(D, n_params), strides=(1, stride_c), offsets=(kt * BK, n0),
                               block_shape=(BK, BN), order=(0, 1))
        f = tl.load(fb, boundary_check=(0, 1), padding_option="zero")
        c = tl.load(cb, boundary_check=(0, 1), padding_option="zero")
        if PREC == 1:
            acc = tl.dot(f, c, acc, input_precision="tf32")
        elif PREC == 2:
            acc = tl.dot(f, c, acc, input_precision="ieee")
        else:
            acc = tl.dot(f, c, acc)
        if kt == KT - 1:
            acc = tl.where((n0 + cols < n_params)[None, :], acc, float("-inf"))
            t1, a1 = tl.max(acc, axis=1, return_indices=True)
            # the tile's second value: its best masked out at that one position (a repeated best stays)
            t2 = tl.max(tl.where(cols[None, :] == a1[:, None], float("-inf"), acc), axis=1)
            gt = t1 > v1  # a tie keeps the earlier parameter; the margin is then 0: undecided, decided exactly
            v2 = tl.where(gt, tl.maximum(v1, t2), tl.maximum(v2, t1))
            i1 = tl.where(gt, n0 + a1, i1)
            v1 = tl.where(gt, t1, v1)
            acc = tl.zeros((BM, BN), tl.float32)
    rows = tl.arange(0, BM)
    keep = rows < n_left
    tl.store(tv_ptr + 2 * row0 + 2 * rows, v1, mask=keep)
    tl.store(tv_ptr + 2 * row0 + 2 * rows + 1, v2, mask=keep)
    tl.store(i1_ptr + row0 + rows, i1.to(tl.int64), mask=keep)
