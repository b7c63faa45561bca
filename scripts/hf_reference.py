#!/usr/bin/env python
"""Outside reference: HF transformers (torch, SDPA) dense decode of a random Llama-3-8B-shaped model.

    python scripts/hf_reference.py --contexts 2048,16384 --batch 1 --steps 32

Prefills `context` random tokens, then times `steps` greedy decode steps with the dynamic KV cache
(torch.cuda.synchronize around the loop; eager mode, no CUDA graphs). Prints ms per step.
"""

import argparse
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,16384")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for context in map(int, args.contexts.split(",")):
        tokens = torch.randint(0, config.vocab_size, (args.batch, context), device="cuda")
        with torch.no_grad():
            out = model(tokens, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(3):  # warm-up steps
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        print(f"hf-transformers dense N={context} B={args.batch}: {ms:.2f} ms/step "
              f"(torch {torch.__version__}, transformers {transformers.__version__})", flush=True)
        del cache, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
