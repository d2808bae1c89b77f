"""Table 2: semantic segmentation - mIoU of a segmenter finetuned on each method's selection, one line per
sampling ratio. Selection runs on image-level features (the paper: CLS concatenated with the mean patch token)."""

from __future__ import annotations

from bench_suite import report
from bench_suite.tables import grid, paper_numbers

TABLE = "2"


run = grid.runner(TABLE)


def markdown(profile: dict, prov: dict, out: dict) -> str:
    cells = out["cells"]
    head = grid.header(profile, TABLE, cells)
    miou = report.bold_best(grid.metric_rows(profile, TABLE, cells, grid.miou), list(range(1, len(head))))
    emd = grid.metric_rows(profile, TABLE, cells, grid.emd)
    return "\n".join([
        f"# Table 2 - semantic segmentation ({profile['name']} profile)\n",
        report.provenance_markdown(prov, scaled_down=profile.get("scaled_down", True)),
        *grid.setting_lines(profile, TABLE, out, "a segmenter (the encoder's backbone + a fresh decoder) finetuned "
                            "on the selected images only; each cell is mIoU (%) over the held-out split's pixels "
                            "(per-class IoU from one confusion matrix, ignore index skipped)."),
        "## mIoU (%)\n",
        report.markdown_table(*grid.transpose(head, miou)),
        "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
        report.markdown_table(*grid.transpose(head, emd)),
        *grid.paper_reference("Table 2 (ADE20k, Segmenter on DINO ViT-S, mmsegmentation)",
                              ["Sel. Ratio"] + paper_numbers.TABLE2_COLUMNS,
                              [[r] + v for r, v in paper_numbers.TABLE2.items()],
                              "the dataset, encoder and training budget above differ."),
    ])
