"""Tables 5, 6 and 7: ActiveFT variants (one option changed) as columns, one line per sampling ratio.

The paper prints these with the ratio down the side and the variants across; so do we, with the EMD of each
selection beside the accuracy (it shows whether a variant changed the selection or only the noise).
"""

from __future__ import annotations

from bench_suite import report
from bench_suite.profiles import Profile
from bench_suite.tables import grid, plots



def markdown_for(table: str, title: str, about: str, paper_title: str, paper_columns: list, paper_rows: dict,
                 plot_what: str = "Top-1 accuracy against the variant"):
    """The markdown function of a ratio table (rows: sampling ratios; columns: ActiveFT variants); the table's
    plot (``out["plot"]``, see ``plotter``) is embedded under the accuracy table when there is one."""

    def markdown(profile: Profile, prov: dict, out: dict) -> str:
        cells = out["cells"]
        head = grid.header(profile, table, cells)
        acc = grid.metric_rows(profile, table, cells, grid.top1)
        acc = report.bold_best(acc, list(range(1, len(head))))
        emd = grid.metric_rows(profile, table, cells, grid.emd)
        return "\n".join([
            f"# {title} ({profile.name} profile)\n",
            report.provenance_markdown(prov, scaled_down=profile.scaled_down),
            *grid.setting_lines(profile, table, out, "each cell is top-1 (%) of this recipe trained on the "
                                "selected samples only, on the held-out test split."),
            about + "\n",
            "## Top-1 accuracy (%)\n",
            report.markdown_table(*grid.transpose(head, acc)),
            plots.embed(out, plot_what),
            "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
            report.markdown_table(*grid.transpose(head, emd)),
            *grid.paper_reference(paper_title, ["Sel. Ratio"] + paper_columns, [[r] + v for r, v in paper_rows.items()],
                                  "the datasets, encoder and recipe above differ."),
        ])
    return markdown


def plotter(table: str, option: str, xlabel: str, title: str, logx: bool = False):
    """``draw(profile, out, path)`` for ``plots.plotted``: top-1 against the value of the one ActiveFT
    ``option`` the table's rows vary (tau, T), one line per sampling ratio."""

    def draw(profile: Profile, out: dict, path) -> None:
        x_of = {row["label"]: float(row["config"][option]) for row in grid.rows_of(profile, table)
                if isinstance(row["config"].get(option), (int, float))}
        plots.variant_plot(path, out["cells"], x_of, lambda d: plots.dataset_label(profile, d), xlabel=xlabel,
                           title=f"{title} ({profile.name} profile)", logx=logx)
    return draw
