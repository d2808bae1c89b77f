"""Tables 5, 6 and 7: ActiveFT variants (one option changed) as columns, one line per sampling ratio.

The paper prints these with the ratio down the side and the variants across; so do we, with the EMD of each
selection beside the accuracy (it shows whether a variant changed the selection or only the noise).
"""

from __future__ import annotations

from bench_suite import report
from bench_suite.tables import grid, paper_numbers

SPECS = {
    "5": {"title": "Table 5 - ablations: the c_i update manner and the regularization design",
          "paper": ("Table 5 (CIFAR100, DINO DeiT-S)", paper_numbers.TABLE5_COLUMNS, paper_numbers.TABLE5),
          "about": "(a) No-Update keeps each sample's nearest parameter c_i fixed at its initial value; "
                   "(b) S1 drops the diversity term, S2 replaces it with InfoNCE; the rest is ActiveFT as in "
                   "Table 1 (the released code's objective). 'Eq. 11 as printed' optimises the paper's equation "
                   "literally (repulsion over the B x B parameter similarities with lambda = 1), which the paper "
                   "does not separate from the code's version."},
    "6": {"title": "Table 6 - effect of the temperature tau",
          "paper": ("Table 6 (CIFAR10, DINO DeiT-S)", paper_numbers.TABLE6_COLUMNS, paper_numbers.TABLE6),
          "about": "ActiveFT with only the temperature changed."},
    "7": {"title": "Table 7 - effect of the number of iterations T",
          "paper": ("Table 7 (appendix A; ImageNet 1%, DINO DeiT-S)", paper_numbers.TABLE7_COLUMNS,
                    paper_numbers.TABLE7),
          "about": "ActiveFT stopped after T iterations; T = 0 snaps the random initial parameters to their "
                   "nearest samples (the paper: 'same as random selection')."},
}


def markdown_for(table: str):
    spec = SPECS[table]

    def markdown(profile: dict, prov: dict, out: dict) -> str:
        cells = out["cells"]
        head = grid.header(profile, table, cells)
        acc = grid.metric_rows(profile, table, cells, grid.top1)
        acc = report.bold_best(acc, list(range(1, len(head))))
        emd = grid.metric_rows(profile, table, cells, grid.emd)
        p_title, p_cols, p_rows = spec["paper"]
        return "\n".join([
            f"# {spec['title']} ({profile['name']} profile)\n",
            report.provenance_markdown(prov, scaled_down=profile.get("scaled_down", True)),
            *grid.setting_lines(profile, table, out, "each cell is top-1 (%) of this recipe trained on the "
                                "selected samples only, on the held-out test split."),
            spec["about"] + "\n",
            "## Top-1 accuracy (%)\n",
            report.markdown_table(*grid.transpose(head, acc)),
            "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
            report.markdown_table(*grid.transpose(head, emd)),
            *grid.paper_reference(p_title, ["Sel. Ratio"] + p_cols, [[r] + v for r, v in p_rows.items()],
                                  "the datasets, encoder and recipe above differ."),
        ])
    return markdown
