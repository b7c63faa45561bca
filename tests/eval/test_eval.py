"""The eval runner on a tiny model: grid, resume after interruption, skipped cells, outputs."""

from __future__ import annotations

import json

import pytest

import raas_jax
from raas_jax.cli import main as cli_main
from raas_jax.eval import runner
from raas_jax.eval.datasets import load_samples
from raas_jax.eval.runner import EvalConfig, grid, parse_page_sizes, run_eval, summarize, write_plots, write_summary


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


@pytest.fixture()
def dataset(tmp_path):
    rows = [{"q": "the quick fox " * n, "a": str(n)} for n in (1, 2, 12)]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grid_takes_policy_variants():
    cells = grid(EvalConfig(dataset="x", policies=("raas", "RaaS:score=estimate:refresh=0.05", "raas"), budgets=(64,),
                            page_size=4))
    assert [c.key for c in cells] == ["raas@64", "raas:score=estimate:refresh=0.05@64"]
    # the default is the ablation's choice (docs/accuracy.md): the exact page mass, top half refreshed
    assert cells[0].policy.score == "exact" and cells[0].policy.refresh == "top_half"
    assert cells[1].policy.score == "estimate" and cells[1].policy.refresh == 0.05
    for bad, says in (("raas:bogus=1", "it takes"), ("raas:score", "OPTION=VALUE"), ("h2o:score=exact", "it takes"),
                      ("raas:refresh=2x", "refresh"), ("raas:score=nope", "score")):
        with pytest.raises(ValueError, match=says):
            grid(EvalConfig(dataset="x", policies=(bad,), budgets=(64,), page_size=4))


def test_grid_runs_dense_once():
    cells = grid(EvalConfig(dataset="x", policies=("dense", "raas", "h2o"), budgets=(64, 128), page_size=4))
    assert [c.key for c in cells] == ["dense", "raas@64", "raas@128", "h2o@64", "h2o@128"]
    assert grid(EvalConfig(dataset="x", policies=("raas",), budgets=(64,), fidelity=True))[0].key == "dense"
    with pytest.raises(ValueError, match="unknown policy"):
        grid(EvalConfig(dataset="x", policies=("nope",), budgets=(64,)))


def test_grid_stores_every_cell_in_the_page_dtype():
    """--kv-dtype applies to every cell, dense (the fidelity reference) included."""
    cells = grid(EvalConfig(dataset="x", policies=("dense", "raas", "h2o:recent_fraction=0.25"), budgets=(64,),
                            page_size=4, kv_dtype="fp8"))
    assert [c.policy.kv_dtype for c in cells] == ["fp8"] * 3
    assert {c.policy.kv_dtype for c in grid(EvalConfig(dataset="x", policies=("dense", "raas"), budgets=(64,)))} \
        == {"auto"}


def test_per_policy_page_sizes():
    default, per_policy = parse_page_sizes("16,h2o=1/16,StreamingLLM=1")
    assert (default, per_policy) == (16, (("h2o", (1, 16)), ("streaming", (1,))))
    cells = grid(EvalConfig(dataset="x", policies=("raas", "h2o", "streaming"), budgets=(64,), page_size=default,
                            policy_page_sizes=per_policy))
    assert [(c.key, c.policy.page_size) for c in cells] == [
        ("raas@64", 16), ("h2o@64/p1", 1), ("h2o@64", 16), ("streaming@64/p1", 1)]
    for bad, message in (("16,foo=1", "unknown policy 'foo'"), ("h2o=x", "POLICY=N"), ("0", ">= 1"),
                         ("1/16", "one number")):
        with pytest.raises(ValueError, match=message):
            parse_page_sizes(bad)


@pytest.mark.parametrize("policies,budgets", [
    (("dense", "raas"), (112,)),  # the fast set: a refused sample, fidelity, summary and plots, in 2 cells
    pytest.param(("dense", "raas", "streaming"), (112, 256), marks=pytest.mark.slow),  # a grid of 5 cells
], ids=["dense-raas", "grid"])
def test_eval_writes_rows_summary_and_plots(model, dataset, tmp_path, policies, budgets):
    samples = load_samples(str(dataset), question_field="q", answer_field="a")
    config = EvalConfig(dataset=str(dataset), policies=policies, budgets=budgets,
                        page_size=4, max_new_tokens=12, batch_size=2, fidelity=True)
    out = tmp_path / "out"
    rows = run_eval(model, samples, config, out, progress=False)
    cells = 1 + (len(policies) - 1) * len(budgets)
    assert len(rows) == 3 * cells
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * cells
    skipped = [r for r in rows if r["skipped"]]
    # with the template and instruction the prompts are 88, 91 and 121 tokens: only 121 needs > 112, and only
    # RaaS (which pins the prompt) refuses it; StreamingLLM evicts prompt pages
    assert {r["cell"] for r in skipped} == {"raas@112"} and all("budget" in r["reason"] for r in skipped)
    ran = [r for r in rows if not r["skipped"] and r["policy"] != "dense"]
    assert all(0 <= r["agreement"] <= 1 and r["kl"] >= -1e-9 and r["first_divergence"] >= 0 for r in ran)
    table = summarize(rows)
    write_summary(table, out, "toy")
    plots = write_plots(table, out, "toy")
    assert {p.name for p in plots} == {"accuracy_vs_budget.png", "agreement_vs_budget.png"}
    md = (out / "summary.md").read_text()
    assert "raas@112/p4: 1" in md and "| raas | 112 | 4 | 2 | 1 |" in md  # 2 samples ran, 1 refused
    assert "| raas | 256 | 4 | 3 | 0 |" in md if 256 in budgets else "| raas | 256 |" not in md
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("policy,budget,page_size,samples,skipped")


def test_interrupted_eval_resumes_without_redoing(model, dataset, tmp_path, monkeypatch):
    samples = load_samples(str(dataset), question_field="q", answer_field="a")
    config = EvalConfig(dataset=str(dataset), policies=("dense", "raas"), budgets=(64,), page_size=4,
                        max_new_tokens=8, batch_size=1)
    out = tmp_path / "out"
    full = run_eval(model, samples, config, out, progress=False)
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing the 4th line

    calls = []
    real = runner._run_cell
    monkeypatch.setattr(runner, "_run_cell", lambda m, cell, pending, *a: calls.append(
        (cell.key, [s.id for s in pending])) or real(m, cell, pending, *a))
    resumed = run_eval(model, samples, config, out, progress=False)
    assert sorted(k for k, _ in calls) == sorted([json.loads(line)["cell"] for line in lines[3:]])
    assert [(r["cell"], r["id"], r.get("token_ids")) for r in resumed] == \
           [(r["cell"], r["id"], r.get("token_ids")) for r in full]
    assert run_eval(model, samples, config, out, progress=False) and len(calls) == len(lines) - 3  # nothing left


def test_resume_with_other_settings_is_refused(model, dataset, tmp_path):
    samples = load_samples(str(dataset), question_field="q", answer_field="a", limit=1)
    config = EvalConfig(dataset=str(dataset), policies=("dense",), budgets=(64,), page_size=4, max_new_tokens=4)
    run_eval(model, samples, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval(model, samples, EvalConfig(**{**config.__dict__, "max_new_tokens": 5}), tmp_path, progress=False)


def test_dataset_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="neither one of gsm8k"):
        load_samples(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="--question-field"):
        load_samples(str(bad))
    assert cli_main(["eval", "--dataset", str(bad), "--policies", "dense,bogus"]) == 2
    assert "unknown policy 'bogus'" in capsys.readouterr().err


def test_known_datasets_from_shared_data():
    from raas_jax.eval.datasets import default_data_dir

    if default_data_dir() is None:
        pytest.skip("no shared/data beside or above the checkout (set RAAS_JAX_DATA)")
    gsm8k = load_samples("gsm8k", limit=3)
    assert gsm8k[0].gold == "18" and "Janet" in gsm8k[0].question
    assert len(load_samples("aime24")) == 30
    assert load_samples("math500", limit=1)[0].gold


def test_wilson_interval_matches_known_values():
    from raas_jax.eval.runner import wilson_interval

    low, high = wilson_interval(0, 64)
    assert low == 0 and high == pytest.approx(0.0565, abs=1e-3)
    low, high = wilson_interval(31, 32)
    assert low == pytest.approx(0.8426, abs=1e-3) and high == pytest.approx(0.9945, abs=1e-3)
    assert wilson_interval(0, 0) == (None, None)


def test_resume_checks_dtype_fields_data_hash_fidelity_and_resolved_model(tmp_path):
    from raas_jax.eval.runner import check_config

    config = EvalConfig(dataset="d.jsonl", policies=("dense",), budgets=(64,), model=str(tmp_path / "m"))
    recorded = dict(dtype="float32", question_field="q", answer_field="a", data_sha256="abc")
    check_config(tmp_path, config, **recorded)
    check_config(tmp_path, config)  # run_eval's own call: the recorded keys are kept
    assert json.loads((tmp_path / "config.json").read_text())["data_sha256"] == "abc"
    check_config(tmp_path, EvalConfig(**{**config.__dict__, "model": str(tmp_path / "x" / ".." / "m")}), **recorded)
    for key, value in (("dtype", "bfloat16"), ("question_field", "question"), ("answer_field", None),
                       ("data_sha256", "abd")):
        with pytest.raises(ValueError, match=key):
            check_config(tmp_path, config, **{**recorded, key: value})
    for change in ({"fidelity": True}, {"model": str(tmp_path / "other")}, {"kv_dtype": "fp8"}):
        with pytest.raises(ValueError, match="different (fidelity|model_resolved|kv_dtype)"):
            check_config(tmp_path, EvalConfig(**{**config.__dict__, **change}), **recorded)


def test_cli_eval_refuses_a_changed_data_file_before_loading(dataset, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: loads.append(1) or (_ for _ in ()).throw(
        ValueError("stop here")))
    argv = ["eval", "--dataset", str(dataset), "--question-field", "q", "--answer-field", "a", "--policies",
            "dense", "--out-dir", str(tmp_path / "out"), "--dtype", "f32"]
    assert cli_main(argv) == 2 and loads == [1] and "stop here" in capsys.readouterr().err
    dataset.write_text(dataset.read_text() + json.dumps({"q": "new", "a": "1"}) + "\n")
    assert cli_main(argv) == 2 and loads == [1]
    assert "different data_sha256" in capsys.readouterr().err
    assert cli_main(argv[:-1] + ["bf16"]) == 2 and "dtype" in capsys.readouterr().err


def test_non_row_lines_in_samples_are_skipped_with_a_warning(tmp_path):
    from raas_jax.eval.runner import read_done

    path = tmp_path / "samples.jsonl"
    rows = [{"cell": "dense", "id": "0"}, {"cell": "dense", "id": "1"}]
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\nhand-edited note\n" + json.dumps(rows[1]) + '\n{"cel')
    with pytest.warns(UserWarning) as caught:
        done = read_done(path)
    assert sorted(done) == [("dense", "0"), ("dense", "1")]
    assert [str(w.message) for w in caught] == [f"{path}:2 is not a sample row; skipped",
                                                f"{path}:3 is not a sample row; skipped"]


def test_duplicate_sample_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": "q", "answer": "1"}) + "\n" for i in (7, 8, 7)))
    with pytest.raises(ValueError, match=r"dup\.jsonl:3 repeats sample id '7' of line 1"):
        load_samples(str(path))


def test_plots_name_their_axes_and_page_sizes(monkeypatch, tmp_path):
    import raas_jax.plots

    calls = []
    monkeypatch.setattr(raas_jax.plots, "line_plot", lambda series, path, xlabel, ylabel, *a, **k: calls.append(
        (sorted(series), ylabel)) or path)
    table = [{"policy": "dense", "budget": None, "page_size": 16, "accuracy": 0.5, "steps_right": None,
              "agreement": None},
             {"policy": "h2o", "budget": 64, "page_size": 1, "accuracy": 0.25, "steps_right": None, "agreement": 0.9},
             {"policy": "h2o", "budget": 64, "page_size": 16, "accuracy": 0.5, "steps_right": None, "agreement": 0.8},
             {"policy": "raas", "budget": 64, "page_size": 16, "accuracy": 0.5, "steps_right": None, "agreement": 1.0}]
    write_plots(table, tmp_path, "t")
    assert calls == [(["h2o p1", "h2o p16", "raas"], "accuracy"),
                     (["h2o p1", "h2o p16", "raas"], "teacher-forced top-1 agreement with dense")]


def test_a_torn_last_line_is_dropped_and_nothing_else_touched(tmp_path):
    from raas_jax.eval.runner import _Appender, read_done, repair_torn_line

    path = tmp_path / "samples.jsonl"
    whole = json.dumps({"cell": "dense", "id": "0"}) + "\n" + "a hand-written line\n"
    path.write_text(whole + '{"cell": "dense", "id": "1", "te')
    with pytest.warns(UserWarning):
        assert sorted(read_done(path)) == [("dense", "0")]  # the torn row is not done: it runs again
    appender = _Appender(path)  # what a resumed run opens
    appender.write({"cell": "dense", "id": "1"})
    appender.close()
    assert path.read_text() == whole + json.dumps({"cell": "dense", "id": "1"}) + "\n"
    assert not repair_torn_line(path) and path.read_text().endswith("\n")
    path.write_text(json.dumps({"cell": "dense", "id": "2"}))  # a whole row, but its newline never written
    assert read_done(path) == {} and repair_torn_line(path) and path.read_text() == ""


def test_cells_that_are_the_same_policy_run_once_with_a_note():
    with pytest.warns(UserWarning, match="'raas:score=exact' is the same cell as 'raas'"):
        cells = grid(EvalConfig(dataset="x", policies=("raas", "raas:score=exact", "raas:refresh=top_half"),
                                budgets=(64,), page_size=4))
    assert [c.key for c in cells] == ["raas@64"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"), ("batch_size", 2.5, "batch_size must be"),
    ("limit", 0, "limit must be None or an integer >= 1"), ("budgets", (64, -5), "budgets must be integers >= 1"),
    ("policies", "raas", "policies is a tuple"),
])
def test_eval_config_refuses_what_the_cli_refuses(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(dataset="x", **{field: value})
