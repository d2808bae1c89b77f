"""The transcribed paper numbers must match the paper text in ../shared (when the workspace has it)."""

import re
from pathlib import Path

import pytest

from bench_suite.tables.registry import get_table

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "activeft-cvpr2023.md"


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not in this checkout's workspace")
def test_table1_transcription_matches_paper():
    text = PAPER.read_text()
    block = text[text.index("Methods\tCIFAR10"):]
    for name, values in get_table("1").paper_rows.items():
        row = next(line for line in block.splitlines() if re.sub(r"<[^>]+>", "", line).startswith(name))
        cells = [re.sub(r"<[^>]+>", "", c).replace(" ", "") for c in row.split("\t")[1:]]
        assert cells == [v or "-" for v in values], name


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not in this checkout's workspace")
@pytest.mark.parametrize("table", ["2", "3", "5", "6", "7"])
def test_ratio_tables_transcription_matches_paper(table):
    numbers = get_table(table).paper_rows
    text = re.sub(r"</?b>", "", PAPER.read_text())
    block = text[text.index(f"Table {table}. **"):]
    for ratio, values in numbers.items():
        row = next(line for line in block.splitlines() if line.startswith(ratio + "\t"))
        cells = [c.replace(" ", "") for c in row.split("\t")[1:] if c != ratio]  # Table 5 repeats the ratio
        assert cells == values, (table, ratio)


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not in this checkout's workspace")
def test_table4_transcription_matches_paper():
    T4 = get_table("4").paper_rows
    text = re.sub(r"</?b>", "", PAPER.read_text())
    for (title, rows), start in zip(T4.items(), ("(a) Performance on DeiT-Small", "(b) Performance on ResNet-50")):
        block = text[text.index(start):]
        for name, values in rows.items():
            line = next(ln for ln in block.splitlines() if ln.startswith(name.split(" (")[0]))
            assert [c.replace(" ", "") for c in line.split("\t")[1:]] == values, (title, name)
