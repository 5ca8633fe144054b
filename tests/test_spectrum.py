"""python -m continuum.spectrum: the table, its files, and its errors."""

import pandas as pd
import pytest

from continuum.spectrum import COLUMNS, main, spectrum_table


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    code = main(["--segments", "1,4,all", "--repeats", "2", "--warmup", "0", "--batch-size", "2",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    table = pd.read_csv(tmp_path / "continuum_small_depthwise_first_fwd_auto_cpu.csv", keep_default_na=False)
    assert list(table.columns) == COLUMNS
    assert list(table["segments"].astype(str)) == ["1", "4", "all"]
    assert table["params"].is_monotonic_decreasing and table["macs"].is_monotonic_decreasing
    assert table.loc[0, "params_vs_dense"] == 1.0 and (table["latency_ms"] > 0).all()
    markdown = (tmp_path / "continuum_small_depthwise_first_fwd_auto_cpu.md").read_text()
    assert "python -m continuum.spectrum --segments 1,4,all" in markdown
    assert "continuum_small" in capsys.readouterr().out


def test_invalid_counts_get_a_note_not_numbers():
    table = spectrum_table("continuum_small", [5, "all"], repeats=1, warmup=0, batch_size=1)
    assert "segments=5 does not fit" in table.loc[0, "note"] and pd.isna(table.loc[0, "params"])
    assert table.loc[1, "params"] > 0


def test_compare_adds_a_baseline_row():
    table = spectrum_table("continuum_small", ["all"], repeats=1, warmup=0, batch_size=1,
                           compare=["continuum_small"])
    assert list(table["note"]) == ["", "baseline"]


@pytest.mark.parametrize("args,message", [
    (["--segments", "0"], "segments=0 is not valid"),
    (["--order", "up"], "order='up' is not valid"),
    (["--model", "nonet"], "'nonet' is not a registered model"),
    (["--input-size", "28,28"], "give C,H,W"),
    (["--strategy", "fast"], "conv strategy mode 'fast' is not valid"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
