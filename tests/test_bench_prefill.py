"""scripts/bench_prefill.py end to end on CPU with the tiny model (the real run needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_prefill.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_prefill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
