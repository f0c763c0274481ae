"""`llmjax generate | eval | bench-generate`: the command-line verbs of inference on a training workdir.

Loading the workdir (model, parameters, tokenizer, mesh) and the prompt helpers are the library module
`llmjax.infer.workdir_model`; this module only parses, checks and prints. Errors in the input (no
checkpoint, empty or too long prompt, invalid sampling values) raise ConfigError: exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError
from llmjax.data.tokenizers.decode import ModelVocabulary
from llmjax.infer.quantize import METHODS, QuantOptions, dequantize, nbytes, quantized_paths
from llmjax.infer.sampling import SamplingParams
from llmjax.infer.workdir_model import Loaded, bos_prefix, chat_prompts

# ----------------------------------------------------------------------------- generate


def quant_options(args: argparse.Namespace, method: str | None = None) -> QuantOptions:
    """--quant (or `method`) and its options, checked (ConfigError naming the option)."""
    return QuantOptions(method or args.quant or "none", args.quant_group_size, args.calib_sequences,
                        args.gptq_damp).check()


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(args, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, beams=args.beams, seed=args.seed, stop=tuple(args.stop)).validate()


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file: {path} not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"--prompt-file: cannot read {path}: {e.strerror or e}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--prompt-file: {path} holds no prompt")
        prompts += lines
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i + 1} is empty")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    sp = sampling_params(args)
    quant = quant_options(args)
    prompts = read_prompts(args)
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat")
    if args.chat and sp.beams > 1:
        raise ConfigError("--chat stops at each of the model's end-of-turn tokens; beam search (--beams) stops at one")
    loaded = Loaded(args.workdir)
    loaded.check_quant(quant)
    tokenizer = loaded.tokenizer()
    tok = ModelVocabulary(tokenizer, loaded.family.token_names())
    if args.chat:
        ids, stops = chat_prompts(loaded.cfg, tokenizer, prompts, args.system)
        print(f"llmjax: chat: {len(prompts)} conversation(s); stopping at ids {list(stops)}", file=sys.stderr)
    else:
        ids, stops = [bos_prefix(loaded.cfg, tokenizer) + p for p in tok.encode(prompts)], tok.eos_id
    engine = loaded.engine(quant)
    engine.check_prompts(ids)
    engine.check_generation(ids, sp)  # the KV-cache memory they imply, before the notes and the allocation
    if any(len(p) + sp.max_new_tokens > loaded.cfg.model.max_seq_len for p in ids):
        print(f"llmjax: note: generation stops when the context of {loaded.cfg.model.max_seq_len} tokens is full",
              file=sys.stderr)
    stream = len(prompts) == 1 and sp.beams == 1
    if stream and not args.chat:  # a continuation is printed after its prompt, a chat reply alone
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    results = engine.generate(ids, sp, stops, tok, on_text if stream else None)
    dt = time.perf_counter() - t0
    if stream:
        sys.stdout.write("\n")
    else:
        for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
            print(f"=== {i + 1} ===\n{p}\n--- reply ---\n{r.text}" if args.chat else f"=== {i + 1} ===\n{p}{r.text}")
    n = sum(len(r.tokens) for r in results)
    why = ", ".join(sorted({r.finish for r in results}))
    print(f"llmjax: {n} new tokens in {dt:.2f}s (including compilation); stopped by: {why}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from llmjax.train.objectives import objective_for

    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {args.batches}")
    methods = [m.strip() for m in (args.quant or "").split(",") if m.strip()]
    for m in methods:
        if m not in METHODS[1:]:
            raise ConfigError(f"--quant: unknown method {m!r} (choose from {', '.join(METHODS[1:])})")
    quants = [quant_options(args, m) for m in dict.fromkeys(methods)]
    loaded = Loaded(args.workdir)
    for q in quants:
        loaded.check_quant(q)
    cfg = loaded.cfg
    objective = objective_for(cfg)
    if not objective.language_modelling:
        raise ConfigError(f"llmjax eval: {args.workdir} is a train.objective={objective.name} run: its validation "
                          "metrics (DPO loss, reward margin and accuracy) are in metrics.jsonl; `llmjax eval` "
                          "measures language modelling")
    from llmjax.train.checkpoint.data_state import latest_saved_shares

    # the run's data shares, so the validation batches are the ones the trainer evaluated
    data = objective.open_data(cfg, loaded.family, tokenizer=loaded.tokenizer(),
                               shares=latest_saved_shares(loaded.workdir / "checkpoints"))
    n = args.batches or cfg.eval.batches or 16
    if args.split == "validation":
        batches = []
        for b in data.eval_batches():  # eval.batches of them (0 = all)
            batches.append(b)
            if args.batches and len(batches) == args.batches:
                break
        if not batches:
            raise ConfigError(f"the validation split holds fewer rows than a batch of {cfg.train.batch_size}")
    else:
        it = data.train_iterator()
        batches = [next(it) for _ in range(n)]
        it.close()
    from llmjax.models.families import batch_from_dict

    nbytes_tok = data.tokenizer.model_token_bytes(cfg.model.vocab_size)
    typed = [batch_from_dict(loaded.family.batch_type, b) for b in batches]
    total_bytes = sum(float((nbytes_tok[b.targets] * b.weights).sum()) for b in typed)
    tokens = sum(int(b.weights.sum()) for b in typed)

    def report(label: str, sums: dict[str, float]) -> tuple[float, float]:
        metrics = loaded.family.eval_metrics(sums)
        bpb = sums["nll_sum"] / math.log(2) / max(total_bytes, 1.0)
        extra = "".join(f"  {k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                        if k not in ("eval_loss", "eval_ppl"))
        print(f"{label}loss {metrics['eval_loss']:.4f}  perplexity {metrics['eval_ppl']:.3f}  bits/byte {bpb:.4f}"
              f"{extra}")
        return metrics["eval_loss"], bpb

    print(f"{args.split}: {len(batches)} batches, {tokens} tokens, {int(total_bytes)} bytes; checkpoint step "
          f"{loaded.step}")
    from llmjax.train.evaluation import evaluate

    width = max([len(q.method) for q in quants] + [5]) + 2
    loss, bpb = report("float:".ljust(width) if quants else "",
                       evaluate(loaded.family, loaded.eval_step(loaded.params), batches).sums)
    dt = jnp.dtype(cfg.model.param_dtype)
    fb = nbytes(loaded.params)
    for opts in quants:
        q = loaded.quantized(opts)
        lq, bq = report(f"{opts.method}:".ljust(width),
                        evaluate(loaded.family, loaded.eval_step(q, lambda p: dequantize(p, dt)), batches).sums)
        qb = nbytes(q)
        paths = quantized_paths(q)
        group = f", group size {opts.group_size}" if opts.method.startswith("int4") else ""
        print(f"{opts.method} weights: {qb / 2**20:.2f} MiB vs {fb / 2**20:.2f} MiB ({cfg.model.param_dtype}), "
              f"{100 * (1 - qb / fb):.1f}% saved{group}; loss {lq - loss:+.4f}, bits/byte {bq - bpb:+.4f}, "
              f"perplexity change {100 * (math.exp(lq - loss) - 1):+.2f}%; {len(paths)} tensors quantized: "
              f"{', '.join(paths)}")
    return 0


# ----------------------------------------------------------------------------- benchmark


def cmd_bench(args: argparse.Namespace) -> int:
    if min(args.batch, args.prompt_len, args.new_tokens) < 1:
        raise ConfigError("--batch, --prompt-len and --new-tokens must be >= 1")
    quant = quant_options(args)
    loaded = Loaded(args.workdir)
    loaded.check_quant(quant)
    m = loaded.cfg.model
    if args.prompt_len + args.new_tokens > m.max_seq_len:
        raise ConfigError(f"--prompt-len + --new-tokens must be <= model.max_seq_len={m.max_seq_len}")
    engine = loaded.engine(quant)
    slots = engine.cache_slots(args.prompt_len, args.new_tokens)
    engine.check_memory(args.batch, args.prompt_len, slots, f"--batch {args.batch}")  # before building prompts
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, m.vocab_size, args.prompt_len)) for _ in range(args.batch)]
    sp = SamplingParams(max_new_tokens=args.new_tokens)

    def prefill() -> Any:
        logits, cache, _ = engine.prefill(prompts, slots)
        return jax.block_until_ready(logits)

    prefill()  # compile
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        prefill()
    t_prefill = (time.perf_counter() - t0) / reps
    loops = (("on-device loop", True), ("host loop", False))
    for _, on_device in loops:
        engine.generate(prompts, sp, device_loop=on_device)  # compile
    timings = {label: float("inf") for label, _ in loops}
    for _ in range(reps):  # alternating, best of `reps` each: the machine may be shared
        for label, on_device in loops:
            t0 = time.perf_counter()
            engine.generate(prompts, sp, device_loop=on_device)
            timings[label] = min(timings[label], max(time.perf_counter() - t0 - t_prefill, 1e-9))
    print(f"model: {m.family}, {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; weights {weights_note(quant, engine.params, loaded.params)}")
    print(f"prefill: {args.batch * args.prompt_len / t_prefill:,.0f} tokens/s ({1e3 * t_prefill:.1f} ms)")
    steps = max(args.new_tokens - 1, 1)
    for label, t in timings.items():
        print(f"decode, {label} (KV cache): {args.batch * steps / t:,.1f} tokens/s ({1e3 * t / steps:.2f} ms/step)")
    return 0


def weights_note(quant: QuantOptions, params: Any, float_params: Any) -> str:
    """'float32, 32.0 MiB' or 'int4 (group 128), 4.6 MiB (85.6% saved)': what bench-generate decoded with."""
    if quant.method == "none":
        return f"{jax.tree.leaves(params)[0].dtype}, {nbytes(params) / 2**20:.1f} MiB"
    qb, fb = nbytes(params), nbytes(float_params)
    group = f" (group {quant.group_size})" if quant.method.startswith("int4") else ""
    return f"{quant.method}{group}, {qb / 2**20:.1f} MiB ({100 * (1 - qb / fb):.1f}% saved)"


def run(args: argparse.Namespace) -> int:
    return {"generate": cmd_generate, "eval": cmd_eval, "bench-generate": cmd_bench}[args.verb](args)
