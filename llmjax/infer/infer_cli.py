"""Arguments of `llmjax generate | eval | bench-generate` (no JAX import: `llmjax --help` stays fast)."""

from __future__ import annotations

from typing import Any

INFER_VERBS = ("generate", "eval", "bench-generate")
QUANT_METHODS = ("none", "int8", "int4", "int4-gptq")  # llmjax.infer.quantize.METHODS


def add_quant_arguments(p: Any, several: bool = False) -> None:
    """--quant (one method; `several`: a comma-separated list, each compared with float), its int4 options, and
    the older --int8 (= --quant int8)."""
    if several:
        p.add_argument("--quant", default="", metavar="METHOD[,METHOD...]",
                       help="also evaluate quantized weights: " + ", ".join(QUANT_METHODS[1:]) + " (comma-separated); "
                            "report memory and the change against float")
    else:
        p.add_argument("--quant", choices=QUANT_METHODS, default="none",
                       help="weight-only quantization: int8 per channel, int4 group-wise (round to nearest), "
                            "int4-gptq (GPTQ calibrated on the run's training data)")
    p.add_argument("--int8", dest="quant", action="store_const", const="int8", help="the same as --quant int8")
    p.add_argument("--quant-group-size", type=int, default=128,
                   help="int4: inputs per scale (a positive even number dividing every matrix's input width)")
    p.add_argument("--calib-sequences", type=int, default=256,
                   help="int4-gptq: training sequences to calibrate on (rounded up to whole batches)")
    p.add_argument("--gptq-damp", type=float, default=0.01,
                   help="int4-gptq: damping added to the Hessian's diagonal, as a fraction of its mean")


def add_arguments(sub: Any) -> None:
    """Register the inference verbs on the CLI's subparsers."""
    g = sub.add_parser("generate", help="continue prompts with a trained model (KV cache; streams to stdout)")
    g.add_argument("--workdir", required=True, help="a training run directory (config.yaml + checkpoints/)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("--prompt-file", help="a file of prompts, one per line (blank lines skipped)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--beams", type=int, default=1, help="beam search width (deterministic; 1 = off)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    add_quant_arguments(g)
    g.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn, rendered with the model's chat template; stops at its "
                        "end-of-turn tokens and prints the reply")
    g.add_argument("--system", help="with --chat: a system message before each prompt")
    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model")
    e.add_argument("--workdir", required=True)
    e.add_argument("--split", choices=("validation", "train"), default="validation")
    e.add_argument("--batches", type=int, default=None, help="batches to evaluate (default: eval.batches)")
    add_quant_arguments(e, several=True)
    b = sub.add_parser("bench-generate", help="prefill and decode tokens/s, cached vs uncached decoding")
    b.add_argument("--workdir", required=True)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    add_quant_arguments(b)
