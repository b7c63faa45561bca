"""Conversion: sharded HF checkpoints, atomic output, clear errors for bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import raas_jax
from raas_jax.model_io.checkpoint import CheckpointError, convert, iter_safetensors
from raas_jax.cli import main as cli_main

from conftest import VOCAB, make_hf_model


@pytest.fixture()
def sharded_dir(tmp_path):
    model = make_hf_model(tmp_path / "hf", "qwen2", tokenizer=True)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="60KB")
    (tmp_path / "hf" / "model.safetensors").unlink(missing_ok=True)
    return tmp_path / "hf", model


def test_sharded_checkpoint_converts_and_matches(sharded_dir, tmp_path):
    src, hf_model = sharded_dir
    assert len(list(src.glob("model-*.safetensors"))) > 2
    out = convert(src, tmp_path / "out", dtype="f32", progress=False)
    for name in ("config.json", "tokenizer.json", "generation_config.json", "params", "raas_jax.json"):
        assert (out / name).exists(), name
    model = raas_jax.load(out, dtype="f32")
    tokens = np.arange(25)[None] % VOCAB
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    assert np.linalg.norm(model.logits(tokens) - ref) / np.linalg.norm(ref) <= 1e-4
    assert model.tokenizer is not None and model.eos_ids == (2,)


def test_bf16_conversion_stores_bf16(tiny_llama_dir, tmp_path):
    out = convert(tiny_llama_dir, tmp_path / "bf16", dtype="bf16", progress=False)
    assert json.loads((out / "raas_jax.json").read_text())["dtype"] == "bfloat16"
    model = raas_jax.load(out, dtype="bf16")
    assert model.params["embed_tokens"]["embedding"].dtype.name == "bfloat16"
    assert np.isfinite(model.logits([[1, 2, 3]])).all()


def test_missing_shard_names_the_file(sharded_dir, tmp_path):
    src, _ = sharded_dir
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "a failed conversion left a temporary directory"


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_shard_names_the_file(sharded_dir, tmp_path, damage):
    src, _ = sharded_dir
    victim = sorted(src.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[18:])
    with pytest.raises(CheckpointError, match=f"corrupt.*{victim.name}"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, src)
    tensors = {k: v.copy() for k, v in iter_safetensors(src / "model.safetensors")}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.numpy import save_file

    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.mlp\.up_proj\.kernel \(layers \[1\]\)"):
        convert(src, tmp_path / "out", progress=False)


def test_shape_mismatch_is_named(tiny_llama_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 100
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight.*has shape.*config.json implies"):
        convert(src, tmp_path / "out", progress=False)


def test_existing_output_is_refused_unless_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tiny_llama_dir, out, progress=False)
    assert (out / "precious.txt").read_text() == "user data"
    convert(tiny_llama_dir, out, overwrite=True, progress=False)
    assert (out / "params").is_dir() and not (out / "precious.txt").exists()


def test_failed_overwrite_keeps_the_old_output(tiny_llama_dir, tmp_path):
    out = convert(tiny_llama_dir, tmp_path / "out", dtype="f32", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError):
        convert(broken, out, overwrite=True, progress=False)
    assert raas_jax.load(out, dtype="f32").logits([[1, 2]]).shape == (1, 2, VOCAB)


def test_unknown_architecture_via_cli(tmp_path, capsys):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "Qwen2ForCausalLM" in err and "Traceback" not in err


def test_cli_convert_and_missing_source(tiny_llama_dir, tmp_path, capsys):
    assert cli_main(["convert", str(tiny_llama_dir), str(tmp_path / "out"), "--dtype", "f32", "--quiet"]) == 0
    assert (tmp_path / "out" / "params").is_dir()
    assert cli_main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "neither a model directory nor a .gguf" in capsys.readouterr().err


def test_safetensors_bf16_arrive_as_ml_dtypes(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    values = (np.arange(12, dtype=np.float32) / 7).reshape(3, 4)
    save_file({"w": values.astype(ml_dtypes.bfloat16), "b": values[0]}, str(tmp_path / "m.safetensors"))
    got = dict(iter_safetensors(tmp_path / "m.safetensors"))
    assert got["w"].dtype == ml_dtypes.bfloat16 and got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["w"].astype(np.float32), values.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_output_that_is_or_holds_the_source_is_refused(tiny_llama_dir, tmp_path):
    src = tmp_path / "models" / "hf"
    shutil.copytree(tiny_llama_dir, src)
    for out in (src, src.parent, tmp_path / "models" / ".." / "models" / "hf"):
        with pytest.raises(ValueError, match="would delete the source"):
            convert(src, out, overwrite=True, progress=False)
    assert (src / "model.safetensors").is_file()


def test_stale_temporaries_are_removed_and_the_umask_respected(tiny_llama_dir, tmp_path):
    import os

    stale = [tmp_path / ".out.tmp-abc123", tmp_path / ".out.tmp-999999999-xyz"]
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a conversion still running in this process
    for d in stale + [live]:
        d.mkdir()
        (d / "big").write_bytes(b"x" * 100)
    old = os.umask(0o022)
    try:
        out = convert(tiny_llama_dir, tmp_path / "out", dtype="f32", progress=False)
    finally:
        os.umask(old)
    assert not any(d.exists() for d in stale) and live.is_dir()
    assert out.stat().st_mode & 0o777 == 0o755


def test_sigterm_during_convert_removes_the_temporary(tiny_llama_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\nfrom raas_jax.model_io import checkpoint\n"
            "checkpoint.save_params = lambda *a, **k: (print('saving', flush=True), time.sleep(60))\n"
            f"checkpoint.convert({str(tiny_llama_dir)!r}, {str(tmp_path / 'out')!r}, dtype='f32', progress=False)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
        assert list(tmp_path.glob(".out.tmp-*"))
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        child.kill()
    time.sleep(0.1)
    assert not list(tmp_path.glob(".out.tmp-*")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.pop("hidden_size"), r"config\.json lacks 'hidden_size'"),
    (lambda c: c.update(hidden_size="64"), r"field 'hidden_size' must be a positive integer, got '64'"),
    (lambda c: c.update(rms_norm_eps="1e-5"), "field 'rms_norm_eps' must be a number"),
    (lambda c: c.update(num_hidden_layers=1),
     r"'model\.layers\.1\..* is for layer 1, but config\.json has num_hidden_layers=1"),
])
def test_bad_config_json_is_named(tiny_llama_dir, tmp_path, capsys, edit, message):
    src = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_config_json_that_is_not_an_object(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, src)
    (src / "config.json").write_text("[1, 2]")
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert "config.json must hold a JSON object, got a list" in capsys.readouterr().err
