"""Float32 rounding bounds shared by the exact nearest-parameter search (``assign``) and the check of the Triton
top-2 kernel (``fused_top2``)."""

U32 = 2.0 ** -24  # float32's unit roundoff


def accumulation_bound(d: int) -> float:
    """Relative error of a float32 sum of d products (with |f| |c| = 1), counted at twice round-to-nearest's bound
    (tensor cores are not documented to round to nearest)."""
    return 2.0 * (d + 2) * U32
