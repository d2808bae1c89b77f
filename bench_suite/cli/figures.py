"""The paper's Figures 3 and 4 from a profile's pools, into the report folder:

    python -m bench_suite.cli.figures --profile cpu [--work work_dirs] [--out results] [--figure 3|4|all]

writes ``figure3.png`` (every pool of Table 1, one panel each), ``figure4_<dataset>.png`` (by default the first
pool of Table 1, the one standing in for CIFAR-10), and ``figures.md`` + ``figures.json`` (provenance, the
numbers behind the plots, the picks).

- **Figure 3** (the check of Assumption 1): B parameters theta^1..theta^B are drawn at random from the pool
  (i.e. from p_fu, as the paper's caption says), B = the budget of each ``--ratios``; for every sample f_i the
  K = 20 most similar parameters (cosine similarity of the L2-normalised features) are found, and
  E_i[exp(sim(f_i, theta^(k)) / tau)] is plotted against k = 1..K, tau = the profile's ActiveFT temperature
  (0.07). A sample drawn as a parameter is not matched with itself (its similarity would be exactly 1; the
  paper does not say). Mean and std over one draw per seed of the profile.
- **Figure 4**: a t-SNE of the pool's features; one panel per method with its ``--ratio`` (1%) picks in black,
  over the pool coloured by class (the labels colour the plot only; label-free methods never see them). The
  picks come from the method registry (``run_selection``) with the options Table 1 uses on that dataset (the
  profile's, plus the dataset's active-learning protocol for CoreSet), so they are deterministic by
  ``--seed``; where Table 1 has the same cell in ``--work``, the picks' digest is checked against the cached
  cell's (the cell cache keeps only the digest, not the ids). t-SNE (scikit-learn, Barnes-Hut, PCA to 50 dims
  first, perplexity 30, seeded) runs on a subsample of at most ``--tsne-max`` points: every pick of every
  method plus a uniform random subsample of the rest, one shared embedding for all panels.

Why a command of its own and not part of ``run.py``: the figures are no table's cells; they reuse the
cached pool features of ``--work`` (extracting them first if they are missing), rerun only the selections
(seconds each), and the t-SNE costs about a minute that no table run should pay.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from bench_suite import report
from bench_suite import runtime as bdist
from bench_suite.cli import main_guard, parse_sources, setup_logging
from bench_suite.digest import ids_digest, json_digest
from bench_suite.errors import BadInputError
from bench_suite.methods import budget_from_ratio, registry, run_selection
from bench_suite.profiles import Profile, load_profile
from bench_suite.runtime import Runtime
from bench_suite.tables import plots
from bench_suite.tables.cells import CELL_VERSION
from bench_suite.tables.common import Context, prepare_split

log = logging.getLogger("bench_suite.cli.figures")

FIGURE4_METHODS = ("activeft", "random", "fds", "kmeans", "coreset", "typiclust", "probcover", "bilaf")
TOP_K = 20


# ----------------------------------------------------------------------------------- Figure 3
def exp_similarity_topk(features: np.ndarray, budget: int, *, tau: float, k: int = TOP_K, seed: int = 0,
                        block: int = 2048) -> dict:
    """One draw of Figure 3: ``budget`` parameters drawn from the pool's rows (uniformly, without replacement),
    then for each sample its ``k`` most similar parameters (itself excluded). Returns ``mean`` (k,):
    E_i[exp(sim_(k) / tau)], and ``median_ratio_1_2``: the median over samples of
    exp(sim_(1)/tau) / exp(sim_(2)/tau), how far the top-1 term dominates the next one."""
    feats = np.asarray(features, dtype=np.float32)
    n = len(feats)
    if budget < 2 or budget > n:
        raise BadInputError(f"figure 3: budget {budget} must be in [2, {n}] for a pool of {n}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=budget, replace=False))
    theta = feats[rows]
    k = min(k, budget - 1)
    column_of = np.full(n, -1, dtype=np.int64)
    column_of[rows] = np.arange(budget)
    total = np.zeros(k, dtype=np.float64)
    ratios = []
    for start in range(0, n, block):
        sim = feats[start:start + block] @ theta.T  # (b, B) cosine similarities
        own = column_of[start:start + block]
        hit = np.nonzero(own >= 0)[0]
        sim[hit, own[hit]] = -np.inf  # a drawn sample is not its own parameter
        top = -np.sort(-np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:], axis=1)  # (b, k) descending
        total += np.exp(top.astype(np.float64) / tau).sum(axis=0)
        ratios.append(np.exp((top[:, 0].astype(np.float64) - top[:, 1]) / tau) if k > 1 else np.ones(len(top)))
    return {"mean": total / n, "median_ratio_1_2": float(np.median(np.concatenate(ratios)))}


def figure3_numbers(features: np.ndarray, budgets: list[int], seeds: list[int], tau: float, k: int = TOP_K) -> dict:
    """``{budget: {mean, std (over seeds, ddof=0) per k, median_ratio_1_2 per seed}}``."""
    out = {}
    for b in budgets:
        draws = [exp_similarity_topk(features, b, tau=tau, k=k, seed=s) for s in seeds]
        means = np.stack([d["mean"] for d in draws])
        out[b] = {"mean": means.mean(axis=0).tolist(), "std": means.std(axis=0).tolist(),
                  "median_ratio_1_2": [d["median_ratio_1_2"] for d in draws]}
    return out


# ----------------------------------------------------------------------------------- Figure 4
def method_config(profile: Profile, method: str, dataset: str) -> dict:
    """The options Table 1's cell of ``method`` on ``dataset`` uses (``grid.build_cells``' rule)."""
    config = profile.method_options(method, None, dataset)
    al = profile.dataset(dataset).al
    if al and not registry.selector_class(method).label_free:
        config = {**al, **config}
    return config


def cached_digests(work: Path | None) -> dict:
    """``{(pool fingerprint, ratio, seed, method, options digest): ids_sha}`` of every cached cell in ``work``."""
    out = {}
    folder = Path(work) / "cells" / f"v{CELL_VERSION}" if work else None
    if folder is None or not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        try:
            c = json.loads(path.read_text())
            key = c["key"]
            out[(key["pool_features"], float(key["ratio"]), int(key["seed"]), key["method"],
                 json_digest(key["method_options"]))] = c.get("ids_sha")
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return out


def figure4_picks(store, profile: Profile, dataset: str, methods: list[str], ratio: float, seed: int,
                  cached: dict | None = None) -> dict:
    """``{method: {label, rows, ids_sha, seconds, check}}``: each method's picks on ``store`` at ``ratio``;
    ``check`` compares the digest with Table 1's cached cell where there is one. A method whose budget does
    not exceed its initial random set (the tables' "-") is left out, with a note."""
    budget = budget_from_ratio(ratio, len(store))
    fingerprint = store.meta.get("fingerprint") or store.checksum()
    out = {}
    for m in methods:
        config = method_config(profile, m, dataset)
        selector = registry.get(m, **config)
        init = selector.initial_set(len(store))
        if budget <= init:
            out[m] = {"label": registry.label(m), "skipped": f"budget {budget} <= the initial random set ({init})"}
            continue
        t0 = time.perf_counter()
        sel = run_selection(store, m, budget, seed, config, labels=store.labels, dist=Runtime())
        digest = ids_digest(sel.ids)
        key = (fingerprint, float(ratio), int(seed), m, json_digest(selector.config()))
        want = (cached or {}).get(key)
        check = ("no cached Table 1 cell" if want is None else
                 "same picks as the cached Table 1 cell" if want == digest else
                 f"DIFFERS from the cached Table 1 cell ({want})")
        out[m] = {"label": registry.label(m), "rows": store.rows_of_ids(sel.ids).tolist(), "ids_sha": digest,
                  "seconds": time.perf_counter() - t0, "check": check}
        log.info("figure 4: %s picked %d of %d in %.1f s (%s)", m, budget, len(store), out[m]["seconds"], check)
    return out


def tsne_embedding(features: np.ndarray, keep: np.ndarray, *, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, xy)``: the rows embedded (every row of ``keep``, plus a uniform random subsample of the others
    up to ``max_points`` in all; sorted) and their 2-D t-SNE coordinates."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    if n <= max_points:
        rows = np.arange(n)
    else:
        rest = np.setdiff1d(np.arange(n), keep)
        extra = max(0, max_points - len(keep))
        rng = np.random.default_rng(seed)
        rows = np.sort(np.concatenate([keep, rng.choice(rest, size=min(extra, len(rest)), replace=False)]))
    x = np.asarray(features[rows], dtype=np.float32)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(5.0, (len(x) - 1) / 3.0)))
    # one OpenMP thread: t-SNE's gradient loop with a thread per core slows down ~10x on a busy 2-core machine
    # (measured: 400 points, 81 s vs 8 s at load 9), and is barely faster on a quiet one
    with threadpool_limits(limits=1):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1).fit_transform(x)
    return rows, np.asarray(xy, dtype=np.float32)


# ----------------------------------------------------------------------------------- the command
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench_suite.cli.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu", help="built-in profile name (cpu, paper) or a YAML file")
    p.add_argument("--work", default="work_dirs", help="the tables' cache folder (features, cells); reused")
    p.add_argument("--out", default="results", help="report folder")
    p.add_argument("--source", action="append", default=[], metavar="DATASET=PATH",
                   help="local copy of a paper dataset (cifar10, cifar100, imagenet)")
    p.add_argument("--figure", choices=("3", "4", "all"), default="all")
    p.add_argument("--datasets", help="comma-separated pools (default: Figure 3 every pool of Table 1, "
                                      "Figure 4 the first)")
    p.add_argument("--ratios", default="0.01,0.05", help="Figure 3: the budgets, as sampling ratios")
    p.add_argument("--ratio", type=float, default=0.01, help="Figure 4: the sampling ratio of the picks (paper: 1%%)")
    p.add_argument("--methods", default=",".join(FIGURE4_METHODS), help="Figure 4: the methods, one panel each")
    p.add_argument("--seed", type=int, default=0, help="Figure 4: the selection and t-SNE seed")
    p.add_argument("--tsne-max", type=int, default=4000, help="Figure 4: at most this many points in the t-SNE")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    t_start = time.perf_counter()
    profile = load_profile(args.profile)
    sources = parse_sources(args.source)
    pools = list(profile.table("1").cells) if "1" in profile.tables else list(profile.datasets)
    datasets = _csv(args.datasets) if args.datasets else None
    for d in datasets or []:
        profile.dataset(d)  # an unknown name fails here, with the known ones
    fig3_sets = datasets or pools
    fig4_sets = datasets or pools[:1]
    methods = [m for m in _csv(args.methods)]
    for m in methods:
        registry.selector_class(m)  # an unknown method fails before any work
    try:
        ratios = [float(r) for r in _csv(args.ratios)]
    except ValueError as exc:
        raise BadInputError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from exc
    tau = float(profile.method_options("activeft").get("temperature", 0.07))
    out_dir = Path(args.out)
    ctx = Context(profile, Path(args.work), out_dir, bdist.make_accelerator(), sources, quiet=True,
                  revision=report.git_revision())
    encoder = profile.encoder_of("1") if "1" in profile.tables else profile.encoder  # Table 1's features
    stores = {d: prepare_split(ctx, d, "pool", encoder=encoder) for d in dict.fromkeys(
        (fig3_sets if args.figure in ("3", "all") else []) + (fig4_sets if args.figure in ("4", "all") else []))}
    if ctx.rank != 0:
        return bdist.exit_process(0)
    data: dict = {"provenance": None, "figure3": {}, "figure4": {}}
    md: list[str] = []
    if args.figure in ("3", "all"):
        md += figure3(profile, stores, fig3_sets, ratios, tau, out_dir, data)
    if args.figure in ("4", "all"):
        md += figure4(profile, stores, fig4_sets, methods, args, out_dir, data, cached_digests(Path(args.work)))
    elapsed = time.perf_counter() - t_start
    prov = report.provenance(profile, profile.seeds, ctx.world, {"wall_time": f"{elapsed:.0f} s"})
    data["provenance"] = prov
    head = [f"# The paper's Figures 3 and 4 ({profile.name} profile)\n",
            report.provenance_markdown(prov, scaled_down=profile.scaled_down)]
    report.write_report(out_dir, "figures", "\n".join(head + md), data)
    log.info("wrote %s in %.0f s", out_dir / "figures.md", elapsed)
    return bdist.exit_process(0)


def figure3(profile, stores, datasets, ratios, tau, out_dir: Path, data: dict) -> list[str]:
    panels, lines = {}, []
    rows = []
    for d in datasets:
        store = stores[d]
        budgets = [budget_from_ratio(r, len(store)) for r in ratios]
        nums = figure3_numbers(np.asarray(store.features), budgets, list(profile.seeds), tau)
        label = plots.dataset_label(profile, d)
        panels[f"{label} (pool {len(store)})"] = {f"B = {b} ({r * 100:g}%)": (v["mean"], v["std"])
                                                  for (b, v), r in zip(nums.items(), ratios)}
        data["figure3"][d] = {str(b): v for b, v in nums.items()}
        for (b, v), r in zip(nums.items(), ratios):
            m = v["mean"]
            rows.append([label, f"{r * 100:g}% (B={b})", f"{m[0]:.4g}", f"{m[1]:.4g}", f"{m[-1]:.4g} (k={len(m)})",
                         f"{m[0] / m[1]:.2f}", f"{np.median(v['median_ratio_1_2']):.2f}"])
    plots.figure3_plot(out_dir / "figure3.png", panels, tau=tau,
                       title=f"Figure 3 - each sample's top-{TOP_K} parameters, drawn from the pool "
                             f"({profile.name} profile)")
    lines += ["## Figure 3: similarity between features and parameters (Assumption 1)\n",
              "![Figure 3](figure3.png)\n",
              f"For each pool, B parameters are drawn at random from the pool's own features (the pool's "
              f"distribution p_fu), B = the budget of each ratio; each sample's {TOP_K} most similar parameters "
              f"are ranked, and E_i[exp(sim / tau)] at each rank is averaged over all samples, tau = {tau:g} (the "
              f"profile's ActiveFT temperature). A sample drawn as a parameter is not matched with itself. Bars: "
              f"mean over {len(profile.seeds)} draws (seeds {list(profile.seeds)}); error bars: std over the "
              "draws; log scale. Assumption 1 holds where the top-1 term is far larger than the others.\n",
              report.markdown_table(["pool", "budget", "k=1", "k=2", f"last k (min({TOP_K}, B-1))",
                                     "k=1 / k=2 (of the means)",
                                     "median over samples of exp(s1/tau) / exp(s2/tau)"], rows)]
    return lines


def figure4(profile, stores, datasets, methods, args, out_dir: Path, data: dict, cached: dict) -> list[str]:
    lines = ["## Figure 4: t-SNE of the pool's features with each method's picks\n"]
    for d in datasets:
        store = stores[d]
        picks = figure4_picks(store, profile, d, methods, args.ratio, args.seed, cached)
        chosen = {m: p for m, p in picks.items() if "rows" in p}
        keep = np.concatenate([np.asarray(p["rows"], dtype=np.int64) for p in chosen.values()]) if chosen else \
            np.zeros(0, dtype=np.int64)
        t0 = time.perf_counter()
        rows, xy = tsne_embedding(np.asarray(store.features), keep, max_points=args.tsne_max, seed=args.seed)
        t_tsne = time.perf_counter() - t0
        where = {int(r): i for i, r in enumerate(rows)}
        panel_rows = {p["label"]: [where[int(r)] for r in p["rows"]] for p in chosen.values()}
        labels = None if store.labels is None else np.asarray(store.labels)[rows]
        label = plots.dataset_label(profile, d)
        budget = budget_from_ratio(args.ratio, len(store))
        name = f"figure4_{d}.png"
        sub = len(rows) < len(store)
        plots.figure4_plot(out_dir / name, xy, labels, panel_rows,
                           title=f"Figure 4 - t-SNE of {label} ({len(rows)} of {len(store)} points), "
                                 f"{args.ratio * 100:g}% picks (B={budget}) in black, seed {args.seed}")
        data["figure4"][d] = {"ratio": args.ratio, "budget": budget, "seed": args.seed, "tsne_rows": len(rows),
                              "pool": len(store), "tsne_seconds": t_tsne,
                              "picks": {m: {k: v for k, v in p.items()} for m, p in picks.items()}}
        lines += [f"### {label}: {args.ratio * 100:g}% picks (B = {budget}), seed {args.seed}\n",
                  f"![Figure 4, {label}]({name})\n",
                  (f"t-SNE of a subsample: {len(rows)} of the pool's {len(store)} points (every pick of every "
                   f"method, plus a uniform random sample of the rest), " if sub else
                   f"t-SNE of all {len(store)} points of the pool, ")
                  + f"one embedding shared by the panels (scikit-learn Barnes-Hut after PCA to 50 dims, seed "
                  f"{args.seed}; {t_tsne:.0f} s). Colours: the classes (used for the plot only); black: the "
                  "method's picks, made by the method registry with Table 1's options for this pool.\n",
                  report.markdown_table(["method", "picks", "selection time", "check against --work"],
                                        [[p["label"], str(len(p["rows"])) if "rows" in p else "-",
                                          f"{p['seconds']:.1f} s" if "seconds" in p else "-",
                                          p.get("check") or p.get("skipped", "")] for p in picks.values()])]
    return lines


if __name__ == "__main__":
    main()
