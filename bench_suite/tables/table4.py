"""Table 4: the same selection methods on features of other pretrained encoders (the paper: DeiT-S from
iBOT, ResNet-50 from DINO), one sub-table per encoder, the CIFAR-10 role dataset."""

from __future__ import annotations

import copy
import dataclasses

from bench_suite import report
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.tables import grid
from bench_suite.tables.registry import TableSpec, register

TABLE = "4"
PAPER = {  # Table 4 (a) and (b), CIFAR-10; "-" as printed
    "DeiT-Small pretrained with iBOT": {"Random": ["81.7", "83.0", "89.8"], "CoreSet": ["-", "82.8", "89.2"],
                                        "LearnLoss": ["-", "83.6", "89.2"], "VAAL": ["-", "85.1", "89.3"],
                                        "ActiveFT (ours)": ["87.6±0.8", "88.3±0.2", "90.9±0.2"]},
    "ResNet-50 pretrained with DINO": {"Random": ["64.8", "76.2", "83.7"], "CoreSet": ["-", "70.4", "83.2"],
                                       "LearnLoss": ["-", "71.7", "81.3"], "VAAL": ["-", "75.0", "83.3"],
                                       "ActiveFT (ours)": ["68.5±0.4", "78.6±0.7", "84.9±0.3"]},
}


def run(ctx, progress_factory=None) -> dict:
    parts = []
    for entry in ctx.profile.table(TABLE).encoders:
        sub = copy.copy(ctx)
        sub.profile = ctx.profile.with_encoder(TABLE, entry.encoder, entry.recipe)
        parts.append({"label": entry.label, "encoder": dataclasses.asdict(entry.encoder), "recipe": entry.recipe,
                      **grid.run(sub, TABLE, progress_factory)})
        for counter in ("cells_computed", "cells_cached", "cells_skipped", "cells_total"):
            setattr(ctx, counter, getattr(sub, counter))
    return {"parts": parts}


def markdown(profile: Profile, prov: dict, out: dict) -> str:
    lines = [f"# Table 4 - other pretrained encoders ({profile.name} profile)\n",
             report.provenance_markdown(prov, scaled_down=profile.scaled_down)]
    for i, part in enumerate(out["parts"]):
        prof = profile.with_encoder(TABLE, EncoderRef(**part["encoder"]), part.get("recipe"))
        head = grid.header(prof, TABLE, part["cells"])
        acc = grid.metric_rows(prof, TABLE, part["cells"], grid.top1)
        lines += [f"## ({chr(97 + i)}) {part['label']}\n",
                  *grid.setting_lines(prof, TABLE, part, "each cell is top-1 (%) on the held-out test split.")[1:],
                  report.markdown_table(head, acc, bold_max_cols=list(range(1, len(head))))]
    lines.append("\"-\": the budget does not exceed the active-learning method's random initial set, as in the "
                 "paper.\n")
    for title, rows in PAPER.items():
        lines += grid.paper_reference(f"Table 4, {title} (CIFAR10)", ["Methods", "0.5%", "1%", "2%"],
                                      [[m] + v for m, v in rows.items()], "the datasets, encoders and recipe differ.")
    return "\n".join(lines)


SPEC = register(TableSpec(TABLE, "other encoders", run, markdown, ["Methods", "0.5%", "1%", "2%"], PAPER))
