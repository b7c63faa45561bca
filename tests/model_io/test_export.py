"""HF export of a converted checkpoint: transformers loads it and gives our logits; convert() reads it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import raas_jax
from raas_jax.model_io.export import export_hf

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "milestones-13m"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_hf(CKPT, tmp_path_factory.mktemp("hf") / "milestones-hf", dtype="f32")


def test_export_logits_match_transformers(exported):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from raas_jax.eval.tasks import milestones as M

    problem = M.make_problem(0, 0, difficulty=1)
    text = problem.prompt + " " + " ".join(problem.solution_words()[:60])
    tok = AutoTokenizer.from_pretrained(str(exported))
    ids = tok.encode(text)
    model = raas_jax.load(CKPT, dtype="f32")
    assert ids == model.encode(text, chat=False)
    ours = model.logits([ids])[0]
    hf = LlamaForCausalLM.from_pretrained(str(exported), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer.json").is_file()


def test_phoenix_checkpoint_export_logits_match_transformers(tmp_path):
    """The decode-phoenix checkpoint (640-word tokenizer with `recall`): same logits through a recall step."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from raas_jax.eval.tasks import milestones as M

    ckpt = CKPT.parent / "milestones-phoenix-13m"
    out = export_hf(ckpt, tmp_path / "phoenix-hf", dtype="f32")
    problem = M.make_problem(0, 0, n_steps=103, recall=True)
    text = problem.prompt + " " + problem.solution  # prompt with `recall`, and the recall line of step 102
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.encode(text)
    model = raas_jax.load(ckpt, dtype="f32")
    assert ids == model.encode(text, chat=False) and "<unk>" not in tok.convert_ids_to_tokens(ids)
    ours = model.logits([ids])[0]
    hf = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    # float32 through 1.4K positions: the same function up to rounding (the short-text test above holds 1e-4)
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-5, rel
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_export_converts_back(exported, tmp_path):
    from raas_jax.model_io.checkpoint import convert

    back = raas_jax.load(convert(exported, tmp_path / "back", dtype="f32", progress=False), dtype="f32")
    model = raas_jax.load(CKPT, dtype="f32")
    ids = [[1, 516, 632, 600, 630, 517]]
    np.testing.assert_array_equal(back.logits(ids), model.logits(ids))


def test_export_refuses_existing_and_unconverted(exported, tmp_path):
    with pytest.raises(FileExistsError):
        export_hf(CKPT, exported)
    with pytest.raises(FileNotFoundError):
        export_hf(tmp_path, tmp_path / "x")


def test_export_cli(tmp_path, capsys):
    from raas_jax.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(CKPT), str(out), "--dtype", "bf16"]) == 0
    assert (out / "model.safetensors").is_file() and "wrote" in capsys.readouterr().out
    assert main(["export", str(CKPT), str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "not a converted raas-jax directory" in capsys.readouterr().err


def test_export_refuses_to_overwrite_its_source(tmp_path):
    import shutil

    import pytest

    src = tmp_path / "ckpt"
    shutil.copytree(CKPT, src)
    with pytest.raises(ValueError, match="is the source or a folder holding it"):
        export_hf(src, src, overwrite=True)
    with pytest.raises(ValueError, match="is the source or a folder holding it"):
        export_hf(src, tmp_path, overwrite=True)
    assert (src / "params").is_dir()


def test_export_files_get_the_usual_mode_and_carry_kv_scales(tmp_path):
    import os
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(CKPT, src)
    (src / "kv_scales.json").write_text('{"k_absmax": [1.0], "v_absmax": [1.0]}')
    umask = os.umask(0o022)
    try:
        out = export_hf(src, tmp_path / "hf", dtype="f32")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (out / "kv_scales.json").read_text() == (src / "kv_scales.json").read_text()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_export_overwrite_onto_a_file_or_symlink_leaves_no_backup(kind, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("kept")
    out = tmp_path / "hf"
    if kind == "file":
        out.write_text("old")
    else:
        out.symlink_to(target)
    export_hf(CKPT, out, dtype="f32", overwrite=True)
    assert (out / "model.safetensors").is_file() and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "hf"]  # no .hf.old-PID behind
    assert target.read_text() == "kept"  # the link was replaced, not what it pointed to


def test_export_existing_out_names_the_flag(tmp_path, capsys):
    from raas_jax.cli import main

    (tmp_path / "hf").mkdir()
    assert main(["export", str(CKPT), str(tmp_path / "hf")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
