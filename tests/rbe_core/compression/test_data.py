"""Data specs for calibration and refinement: sources, prose filter, dedup, held-out split, exclusions."""

from __future__ import annotations

import gzip

import pytest

from rbe_core.compression import data
from rbe_core.models import ModelError

PARA = "This paragraph has enough plain English words to count as prose for the filter number {i}."


def test_folder_spec_dedups_splits_and_filters(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(PARA.format(i=i) for i in range(200)))
    (tmp_path / "b.md").write_text("\n\n".join(PARA.format(i=i) for i in range(100)))  # all duplicates of a.txt
    with gzip.open(tmp_path / "README.gz", "wt") as fh:
        fh.write("\n\n".join(PARA.format(i=1000 + i) for i in range(50)) + "\n\nx = [1, 2, 3] # 4 5 6 7 8 9 10 11\n")
    (tmp_path / "table.csv").write_text(PARA.format(i=-1))  # not a text suffix: skipped
    (tmp_path / "COPYING").write_text(PARA.format(i=-2))  # licenses are evaluation texts: never read
    d = data.load(str(tmp_path))
    train, held = d.train.split("\n\n"), d.held_out.split("\n\n")
    assert len(train) + len(held) == 250 and not set(train) & set(held)
    assert 0 < len(held) < 40  # about one in twenty
    assert "number -1." not in d.train + d.held_out and "number -2." not in d.train + d.held_out
    assert "x = [1" not in d.train  # code is not prose
    again = data.load(str(tmp_path))
    assert again.held_out == d.held_out  # the split is stable


def test_long_blocks_without_blank_lines_are_cut(tmp_path):
    (tmp_path / "log.txt").write_text("\n".join(PARA.format(i=i) for i in range(400)))
    d = data.load(str(tmp_path))
    assert max(len(p) for p in (d.train + "\n\n" + d.held_out).split("\n\n")) <= data.MAX_PARAGRAPH + 200


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown data source"):
        data.load("builtin:nope")
    with pytest.raises(ModelError, match="no such file"):
        data.load(str(tmp_path / "missing.txt"))
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(ModelError, match="too little prose"):
        data.load(str(tmp_path / "tiny.txt"))
    with pytest.raises(ModelError, match="license"):
        data.load("/usr/share/common-licenses/GPL-3")
    with pytest.raises(ModelError, match="causal LM"):
        data.load("builtin:teacher")


def test_builtin_stdlib_and_several_sources(tmp_path):
    (tmp_path / "mine.txt").write_text("\n\n".join(PARA.format(i=i) for i in range(40)))
    d = data.load(f"builtin:stdlib,{tmp_path / 'mine.txt'}")
    assert set(d.sources) == {"builtin:stdlib", str(tmp_path / "mine.txt")}
    assert len(d.train) > 50_000
