"""Table 2: semantic segmentation - mIoU of a segmenter finetuned on each method's selection, one line per
sampling ratio. Selection runs on image-level features (the paper: CLS concatenated with the mean patch token)."""

from __future__ import annotations

from bench_suite import report
from bench_suite.profiles import Profile
from bench_suite.tables import grid
from bench_suite.tables.registry import TableSpec, register

TABLE = "2"

# The paper's Table 2: semantic segmentation mIoU on ADE20k (rows: ratio); only ActiveFT has a std in the paper.
PAPER_COLUMNS = ["Random", "FDS", "K-Means", "ActiveFT (ours)"]
PAPER_ROWS = {"5%": ["14.54", "6.74", "13.62", "15.37±0.11"],
              "10%": ["20.27", "12.65", "19.12", "21.60±0.40"]}


def markdown(profile: Profile, prov: dict, out: dict) -> str:
    cells = out["cells"]
    head = grid.header(profile, TABLE, cells)
    miou = report.bold_best(grid.metric_rows(profile, TABLE, cells, grid.miou), list(range(1, len(head))))
    emd = grid.metric_rows(profile, TABLE, cells, grid.emd)
    return "\n".join([
        f"# Table 2 - semantic segmentation ({profile.name} profile)\n",
        report.provenance_markdown(prov, scaled_down=profile.scaled_down),
        *grid.setting_lines(profile, TABLE, out, "a segmenter (the encoder's backbone + a fresh decoder) finetuned "
                            "on the selected images only; each cell is mIoU (%) over the held-out split's pixels "
                            "(per-class IoU from one confusion matrix, ignore index skipped)."),
        "## mIoU (%)\n",
        report.markdown_table(*grid.transpose(head, miou)),
        "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
        report.markdown_table(*grid.transpose(head, emd)),
        *grid.paper_reference("Table 2 (ADE20k, Segmenter on DINO ViT-S, mmsegmentation)",
                              ["Sel. Ratio"] + PAPER_COLUMNS,
                              [[r] + v for r, v in PAPER_ROWS.items()],
                              "the dataset, encoder and training budget above differ."),
    ])


SPEC = register(TableSpec(TABLE, "segmentation", grid.runner(TABLE), markdown, PAPER_COLUMNS, PAPER_ROWS,
                          headline_metric=("miou", True)))
