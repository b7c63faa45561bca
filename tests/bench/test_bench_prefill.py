"""`raas-jax bench prefill` (raas_jax/bench/prefill.py) end to end on CPU with the tiny model (the real run needs a GPU)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest



def _script():
    return importlib.import_module("raas_jax.bench.prefill")


def test_bad_cases_are_refused(capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--out", "x.json", "--cases", "1by32"])
    assert "BATCHxLENGTH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script().parse_args(["--out", "x.json", "--chunk", "100"])


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "prefill.json"
    assert _script().main(["--model-size", "tiny", "--cases", "2x256", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["check"]["ok"] and report["check"]["chunked_vs_reference"] < 3e-2
    paths = [(r["path"], r["batch"], r["prompt"], r["status"]) for r in report["rows"]]
    assert paths[:2] == [("flash", 2, 256, "ok"), ("chunked", 2, 256, "ok")]
    assert [p for p in paths if p[0] == "reference"] == [("reference", 1, 512, "ok"), ("reference", 4, 256, "ok")]
    assert all(r["tokens_per_s"] > 0 and r["xla_peak_gib"] > 0 for r in report["rows"])
