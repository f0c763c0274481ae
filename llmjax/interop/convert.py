"""`llmjax convert from-hf HF_DIR WORKDIR` and `llmjax convert to-hf WORKDIR HF_DIR`.

from-hf writes a workdir exactly like one `llmjax train` leaves after step 0: `config.yaml`
(the resolved config: the model from HF_DIR/config.json, everything else from --config and
the overrides) and `checkpoints/0` holding the imported parameters with a fresh optimizer
state and the data iterator at the start of the stream. So

  llmjax eval --workdir WORKDIR / llmjax generate --workdir WORKDIR --prompt ...
  llmjax train --config WORKDIR/config.yaml --workdir WORKDIR [data.path=...]   (continues training)

use it as it is. The parameters are read straight into the shardings of the config's mesh.
The model's own tokenizer (HF_DIR's tokenizer.json with its tokenizer_config.json, chat_template.jinja
and generation_config.json, else its tokenizer.model) is stored in WORKDIR/tokenizer/ (the run's
tokenizer copy) and set as data.tokenizer, so eval/generate (and `generate --chat`, with the
model's chat template and end-of-turn ids) use the right tokens with no further setting; BOS is
added as the tokenizer's config says (`add_bos_token`, else its post-processor).

to-hf writes the newest checkpoint's parameters as the Hugging Face model of its family
(`llmjax.interop.hf_families`) that `transformers` loads (`from_pretrained`), with the tokenizer
files, the special-token ids in config.json and a generation_config.json (`hf_tokens`).
A LoRA workdir (lora.rank > 0) exports its adapters alone in the PEFT layout
(`llmjax.interop.peft`), or with `--merge-lora` the merged weights W + (alpha / rank) A B as a
plain model.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from llmjax.config import Config, ConfigError, load_config, parse_override, save_config
from llmjax.data.tokenizers.run_tokenizer import run_tokenizer, save_copy, tokenizer_dir
from llmjax.data.tokenizers.tokenizer import Tokenizer, check_vocab, load_tokenizer
from llmjax.guards import inside
from llmjax.interop.hf_config import (
    ARCH_FIELDS,
    MOE_ARCH_FIELDS,
    check_exportable,
    model_config_from_hf,
    read_hf_config,
)
from llmjax.interop.hf_families import family_for
from llmjax.interop.hf_tokens import export_tokenizer, special_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def log(msg: str) -> None:
    print(f"llmjax: {msg}", file=sys.stderr, flush=True)


def _check_overrides(overrides: list[str], source: Path) -> None:
    """The architecture comes from config.json: overriding it would not match the weights."""
    for item in overrides:
        keys, _ = parse_override(item)
        if keys[:1] != ["model"] or len(keys) < 2:
            continue
        if keys[1] in ARCH_FIELDS or (keys[1] == "moe" and len(keys) > 2 and keys[2] in MOE_ARCH_FIELDS):
            raise ConfigError(f"{'.'.join(keys)}: set by {source}; it cannot be overridden on import")


def import_config(hf_dir: Path, config: str | None, overrides: list[str], workdir: Path) -> tuple[Config, list[str]]:
    """The workdir's resolved Config and the notes to log (no JAX needed). Raises ConfigError."""
    source = hf_dir / "config.json"
    hf_data = read_hf_config(hf_dir)
    _check_overrides(overrides, source)
    base = load_config(config, overrides, check=False)  # validated with the imported model (`from_hf`)
    model, notes = model_config_from_hf(hf_data, str(source), base.model)
    cfg = dataclasses.replace(base, model=model)
    if cfg.data.tokenizer is None:
        found = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
        if found:
            inside(hf_dir, found[0], "HF_DIR")  # not a link to a file elsewhere
            cfg.data.tokenizer = str(tokenizer_dir(workdir).absolute())
            notes.append(f"stored the model's tokenizer ({hf_dir / found[0]}) in {cfg.data.tokenizer} "
                         "(data.tokenizer)")
        else:
            notes.append(f"{hf_dir} has no tokenizer.json or tokenizer.model: set data.tokenizer to the model's "
                         "tokenizer for eval/generate/train on text (left unset, a new tokenizer is trained on the "
                         "corpus, whose ids do not match the imported embeddings)")
    return cfg, notes


def import_tokenizer(hf_dir: Path, cfg: Config, workdir: Path) -> Tokenizer | None:
    """The tokenizer to store in the workdir: HF_DIR's own (when import_config chose it) or the user's
    data.tokenizer; checked against the vocabulary. None when there is neither."""
    if cfg.data.tokenizer is None:
        return None
    own = cfg.data.tokenizer == str(tokenizer_dir(workdir).absolute())
    tok = load_tokenizer(hf_dir if own else cfg.data.tokenizer, str(hf_dir) if own else "data.tokenizer")
    check_vocab(tok, cfg, str(hf_dir / Path(tok.path).name) if own else "data.tokenizer")
    return tok


def from_hf(args: argparse.Namespace) -> int:
    hf_dir, workdir = Path(args.hf_dir), Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"WORKDIR: {workdir} exists and is not a directory")
    ckpts = workdir / "checkpoints"
    if ckpts.is_dir() and any(d.name.isdigit() for d in ckpts.iterdir()):
        raise ConfigError(f"WORKDIR: {ckpts} already holds checkpoints; import into a new directory")
    cfg, notes = import_config(hf_dir, args.config, list(args.overrides), workdir)
    from llmjax.interop.hf_weights import SafetensorsReader

    reader = SafetensorsReader(hf_dir)  # its shard names checked (inside HF_DIR, present) before anything is built

    import jax

    from llmjax.config import validate
    from llmjax.runtime import setup_jax

    setup_jax(cfg)
    from llmjax.train.preflight import check_fits

    try:  # before anything is built from the sizes (a name table of 10,000,000 layers would never end)
        check_fits(cfg, jax.devices())
    except ConfigError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    validate(cfg, jax.device_count())
    tokenizer = import_tokenizer(hf_dir, cfg, workdir)

    from llmjax.interop.hf import load_params
    from llmjax.train.checkpoint.manager import Checkpointer
    from llmjax.train.setup import build_setup
    from llmjax.train.step import TrainState

    setup = build_setup(cfg)
    params = load_params(hf_dir, cfg.model, setup.state_shardings.params, reader)

    def initial_state(p):
        # The same rng split as a fresh run (`train.setup._fresh_state`): the second key drives training.
        rng = jax.random.split(jax.random.PRNGKey(cfg.seed))[1]
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=setup.tx.init(p), rng=rng)

    state = jax.jit(initial_state, out_shardings=setup.state_shardings, donate_argnums=0)(params)
    workdir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        save_copy(tokenizer, tokenizer_dir(workdir))
    ckpt = Checkpointer(ckpts, cfg.checkpoint.keep, async_save=False)
    try:
        ckpt.save(0, state, {"step": 0})  # no iterator state: training starts at the beginning of the stream
    finally:
        ckpt.close()
    save_config(cfg, workdir / "config.yaml")  # last: a config.yaml next to checkpoints/ marks a finished import
    n = sum(x.size for x in jax.tree.leaves(state.params))
    m = cfg.model
    kind = f"MoE {m.moe.num_experts} experts top-{m.moe.top_k}" if m.moe.enabled else "dense"
    for note in notes:
        log(f"note: {note}")
    log(f"imported {hf_dir} ({m.n_layers} layers, d_model {m.d_model}, {m.n_heads}/{m.n_kv_heads} heads, "
        f"vocab {m.vocab_size}, {kind}; {n:,} parameters) into {workdir}: config.yaml + {ckpts / '0'}")
    log(f"use it: llmjax eval --workdir {workdir}; llmjax generate --workdir {workdir} --prompt ...; "
        f"llmjax train --config {workdir / 'config.yaml'} --workdir {workdir} [data.path=... train.steps=...]")
    return 0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2 * 2**30, '1000' -> 1000. ConfigError naming --max-shard-size."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(number * powers[unit])
    if size < 1:
        raise ConfigError(f"--max-shard-size must be positive, got {text!r}")
    return size


def to_hf(args: argparse.Namespace) -> int:
    workdir, hf_dir = Path(args.workdir), Path(args.hf_dir)
    max_shard = parse_size(args.max_shard_size)
    cfg_path = workdir / "config.yaml"
    if cfg_path.is_file():  # refuse unexportable models before restoring anything
        check_exportable(load_config(str(cfg_path)).model)
    if hf_dir.exists() and (not hf_dir.is_dir() or any(hf_dir.iterdir())):
        raise ConfigError(f"HF_DIR: {hf_dir} exists and is not an empty directory")

    from llmjax.infer.workdir_model import Loaded
    from llmjax.interop.hf import save

    loaded = Loaded(workdir)
    cfg = loaded.cfg
    if args.merge_lora and loaded.lora is None:
        raise ConfigError(f"--merge-lora: {workdir} is not a LoRA run (lora.rank=0): its weights are exported as they "
                          "are without the flag")
    if loaded.lora is not None and not args.merge_lora:  # the adapters alone, PEFT layout
        from llmjax.interop.peft import save_adapters
        from llmjax.train.checkpoint.init_from import read_pointer

        base = (read_pointer(workdir) or {}).get("init_from")
        files = save_adapters(cfg.model, cfg.lora, loaded.lora, loaded.adapters, hf_dir, base, args.dtype)
        log(f"wrote the LoRA adapters (step {loaded.step}, PEFT layout) to {hf_dir}: {', '.join(files)}; base "
            f"{base or 'the random init of seed ' + str(cfg.seed)} (export it with `convert to-hf`, or pass "
            "--merge-lora for merged weights)")
        return 0
    if cfg.model.moe.enabled and cfg.model.moe.capacity_factor > 0:
        log(f"note: model.moe.capacity_factor={cfg.model.moe.capacity_factor} drops tokens over capacity; "
            "transformers' Mixtral routes every token (dropless), so its outputs can differ where tokens were dropped")
    tok = run_tokenizer(cfg, workdir)  # the run's copy
    if tok is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).expanduser().exists():
        tok = load_tokenizer(cfg.data.tokenizer)
    files = save(cfg.model, loaded.params, hf_dir, args.dtype, max_shard, None if tok is None else special_ids(tok))
    if tok is None:
        log("note: the workdir has no tokenizer copy and data.tokenizer is unset: no tokenizer was written")
    else:
        files += export_tokenizer(tok, hf_dir)
    arch = family_for(cfg.model).architecture
    if cfg.train.objective == "reward":  # a reward model: the decoder above plus its score head
        from llmjax.interop.hf_reward import export_reward_model

        files += export_reward_model(workdir, hf_dir, tok)
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
    log(f"wrote {arch} (step {loaded.step}, {args.dtype or cfg.model.param_dtype}) to {hf_dir}: config.json, "
        f"{', '.join(files)}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"from-hf": from_hf, "to-hf": to_hf}[args.convert_verb](args)
