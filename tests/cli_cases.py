"""A corpus of bad (and a few good) command lines for every `llmjax` verb, run by tests/test_cli_fuzz.py.

Each case is `Case(verb, argv, codes, needle)`: `llmjax ARGV` must exit with a status in `codes` (2 usage, 3
storage, 0 valid), print at most one `llmjax: error:` line (exactly one on failure, or argparse's usage),
never a traceback, and, when `needle` is given, name it in the error. Adding cases: append to the verb's
table in `cases()` (files go under `root`, made by `inputs(root)`; `{root}` in an argument is replaced).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USAGE, STORAGE = {2}, {3}
FAILS = {2, 3}

# A tiny model that validates (8 CPU devices, mesh.data=-1 -> 8, batch 8); train --check cases stop before
# compiling (every one of them is refused), so the model is never built.
TINY = [
    "model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "train.steps=4",
    "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=1", "eval.every_steps=0",
    "sample.max_new_tokens=0", "data.validation_fraction=0.2",
]


@dataclass(frozen=True)
class Case:
    verb: str
    argv: tuple[str, ...]
    codes: frozenset[int]
    needle: str | None = None

    @property
    def id(self) -> str:
        return " ".join(self.argv)[:120]


def case(argv: list[str], codes: set[int] = FAILS, needle: str | None = None) -> Case:
    return Case(argv[0] if argv else "", tuple(argv), frozenset(codes), needle)


# ----------------------------------------------------------------------------- input files


BAD_YAML = {  # name -> content of a config/spec file that must be refused
    "list_model.yaml": "model: [1, 2]\n",
    "bool_train.yaml": "train: true\n",
    "set_model.yaml": "model: !!set {a, b}\n",
    "str_data.yaml": "data: hello\n",
    "int_optim.yaml": "optim: 3\n",
    "python_tag.yaml": "seed: !!python/object/apply:os.system ['true']\n",
    "dup.yaml": "seed: 1\nseed: 2\n",
    "binary.yaml": b"\xff\xfe\x00\x01garbage",
    "toplist.yaml": "- a\n- b\n",
    "scalar.yaml": "42\n",
    "deep.yaml": "model: " + "[" * 1500 + "]" * 1500 + "\n",
    "tab.yaml": "model:\n\td_model: 3\n",
    "unknown.yaml": "nosuch: {a: 1}\n",
    "unknown_key.yaml": "model: {nosuch: 1}\n",
    "bad_value.yaml": "model: {d_model: abc}\n",
    "alias.yaml": "model: *nope\n",
    "binary_tag.yaml": "seed: !!binary aGk=\n",
    "date.yaml": "seed: 2001-01-01\n",
    "nan_lr.yaml": "optim: {lr: .nan}\n",
    "neg_steps.yaml": "train: {steps: -5}\n",
}

SWEEPS = {  # name -> (spec, needle)
    "escape.yaml": ("name: ../../x\ngrid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, "
                    "d_ff: 64}]\n", "plain directory name"),
    "slash.yaml": ("name: a/b\ngrid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                   "plain directory name"),
    "dotdot.yaml": ("name: '..'\ngrid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, "
                    "d_ff: 64}]\n", "plain directory name"),
    "absname.yaml": ("name: /tmp/x\ngrid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, "
                     "d_ff: 64}]\n", "plain directory name"),
    "listname.yaml": ("name: [a]\ngrid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, "
                      "d_ff: 64}]\n", "'name'"),
    "nan_budget.yaml": ("isoflop: {budgets: [.nan]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                        "isoflop.budgets"),
    "inf_budget.yaml": ("isoflop: {budgets: [.inf]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                        "isoflop.budgets"),
    "neg_budget.yaml": ("isoflop: {budgets: [-1]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                        "isoflop.budgets"),
    "str_budget.yaml": ("isoflop: {budgets: [x]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                        "isoflop.budgets"),
    "nan_tokens.yaml": ("grid: {tokens: [.nan]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                        "grid.tokens"),
    "empty_tokens.yaml": ("grid: {tokens: []}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n",
                          "grid.tokens"),
    "both.yaml": ("grid: {tokens: [1e5]}\nisoflop: {budgets: [1e12]}\nshapes: [{d_model: 32, n_layers: 1, "
                  "n_heads: 1, d_ff: 64}]\n", "exactly one"),
    "neither.yaml": ("shapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n", "exactly one"),
    "noshapes.yaml": ("grid: {tokens: [1e5]}\n", "exactly one of 'sizes'"),
    "shape_missing.yaml": ("grid: {tokens: [1e5]}\nshapes: [{d_model: 32}]\n", "lacks"),
    "shapes_str.yaml": ("grid: {tokens: [1e5]}\nshapes: hello\n", "'shapes'"),
    "unknown_key.yaml": ("grid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n"
                         "nosuch: 1\n", "unknown keys"),
    "bad_override.yaml": ("grid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n"
                          "overrides: [nosuch.key=1]\n", "nosuch"),
    "overrides_int.yaml": ("grid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n"
                           "overrides: 5\n", "'overrides'"),
    "extends_missing.yaml": ("extends: nowhere.yaml\n", "extends"),
    "extends_self.yaml": ("extends: extends_self.yaml\n", "loops back"),
    "huge.yaml": ("grid: {tokens: [1e5, 2e5, 4e5, 8e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n"
                  "hyperparameters:\n  optim.lr: [" + ", ".join(f"{1e-4 * (1 + i / 1000):.7g}" for i in range(400))
                  + "]\n  seed: [" + ", ".join(map(str, range(100))) + "]\n", "160,000 points"),
    "hp_unknown.yaml": ("grid: {tokens: [1e5]}\nshapes: [{d_model: 32, n_layers: 1, n_heads: 1, d_ff: 64}]\n"
                        "hyperparameters: {nosuch.key: [1, 2]}\n", "nosuch.key"),
    "dup.yaml": ("name: s\nname: t\ngrid: {tokens: [1e6]}\n", "duplicate key 'name'"),
    "binary.yaml": (b"\xff\xfe\x00garbage", None),
    "toplist.yaml": ("- a\n", None),
    "sizes_bad.yaml": ("grid: {tokens: [1e5]}\nsizes: {d_model: hello}\n", "sizes.d_model"),
}

CSV_HEADER = "name,params,tokens,loss\n"
CSV_GOOD = CSV_HEADER + "".join(f"r{i},{n:.3g},{d:.3g},{3 + 1e3 / n ** 0.3 + 1e3 / d ** 0.3:.5f}\n"
                                for i, (n, d) in enumerate((n, d) for n in (1e5, 2e5, 4e5) for d in (1e6, 2e6, 4e6)))
CSVS = {  # name -> (content, needle)
    "empty.csv": ("", None),
    "header_only.csv": (CSV_HEADER, None),
    "nonnumeric.csv": (CSV_HEADER + "a,x,2e6,3.1\n", None),
    "negative.csv": (CSV_HEADER + "a,-1,2e6,3.1\n", None),
    "nan.csv": (CSV_HEADER + "a,1e5,nan,3.1\n", None),
    "inf.csv": (CSV_HEADER + "a,1e5,inf,3.1\n", None),
    "binary.csv": (b"\xff\xfe\x00\x01", "not UTF-8"),
    "ragged.csv": (CSV_HEADER + "a,1e5,2e6,3.1,extra\n", None),
    "no_loss.csv": ("name,params,tokens\na,1e5,2e6\n", None),
    "two_rows.csv": (CSV_HEADER + "a,1e5,2e6,3.1\nb,2e5,4e6,2.9\n", None),
    "overflow.csv": (CSV_HEADER + "a,1e999,2e6,3.1\n", None),
    "good.csv": (CSV_GOOD, None),
}

FITS = {  # name -> content of a --fit file
    "list.json": "[1, 2]",
    "number.json": "42",
    "string.json": '"fit"',
    "null.json": "null",
    "empty_obj.json": "{}",
    "wrong_types.json": json.dumps({"approach3": [1, 2], "options": "x", "approach1": 5}),
    "broken.json": "{",
    "binary.json": b"\xff\x00",
    "deep.json": "[" * 100000 + "]" * 100000,
}

HF_CONFIGS = {  # name -> config.json of a directory to import (no weights: refused before any is read)
    "list": "[1]",
    "binary": b"\xff\x00",
    "broken": "{",
    "empty": "{}",
    "unknown_type": json.dumps({"model_type": "nosuchmodel"}),
    "neg_layers": json.dumps({"model_type": "llama", "num_hidden_layers": -1, "hidden_size": 32,
                              "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 64}),
    "str_hidden": json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": "x",
                              "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 64}),
    "no_weights": json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32,
                              "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 64}),
    "heads_zero": json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32,
                              "intermediate_size": 64, "num_attention_heads": 0, "vocab_size": 64}),
}

TINY_HF = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
           "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
ESCAPES = {  # name -> a weight_map entry that points outside the model directory (never opened)
    "up": "../../outside/secret.safetensors", "etc": "/etc/passwd", "proc": "/proc/self/environ",
}
HUGE_HF = {  # name -> config.json fields that would need far more memory than the machine has
    "layers": {"num_hidden_layers": 10_000_000}, "width": {"hidden_size": 1_000_000},
    "vocab": {"vocab_size": 10**12},
}
TEMPLATES = {  # name -> a chat template that must be refused within its limits (or not compile)
    "repeat": "{{ 'a' * 4000000000 }}",
    "loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "range": "{% for i in range(10**9) %}{% endfor %}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'other.jinja' as o %}",
}
CURATE_BAD = [  # (override, needle): `data prepare` refuses before writing anything
    ("curate.near_dedup.threshold=1.5", "curate.near_dedup.threshold"),
    ("curate.near_dedup.threshold=0", "curate.near_dedup.threshold"),
    ("curate.stages=[exact_dedup,exact_dedup]", "curate.stages"),
    ("curate.stages=[nope]", "curate.stages"),
    ("curate.quality.filters=[nosuch_filter]", "curate.quality.filters"),
]

WORKDIR_CONFIGS = {  # name -> config.yaml of a workdir that generate/eval/convert to-hf must refuse
    "no_config": None,
    "binary": b"\xff\xfe\x00",
    "list_model": "model: [1, 2]\n",
    "toplist": "- 1\n",
    "unknown_key": "model: {nosuch: 1}\n",
    "no_checkpoints": "seed: 0\n",
    "broken": "model: {d_model: [\n",
}


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def inputs(root: Path) -> None:
    """Write every file the cases read under `root`."""
    for name, content in BAD_YAML.items():
        _write(root / "yaml" / name, content)
    for name, (content, _) in SWEEPS.items():
        _write(root / "sweeps" / name, content)
    for name, (content, _) in CSVS.items():
        _write(root / "csv" / name, content)
    for name, content in FITS.items():
        _write(root / "fits" / name, content)
    for name, content in HF_CONFIGS.items():
        _write(root / "hf" / name / "config.json", content)
    (root / "hf" / "no_config").mkdir(parents=True, exist_ok=True)
    for name, content in WORKDIR_CONFIGS.items():
        (root / "work" / name).mkdir(parents=True, exist_ok=True)
        if content is not None:
            _write(root / "work" / name / "config.yaml", content)
    for name, entry in ESCAPES.items():
        _write(root / "hf_escape" / name / "config.json", json.dumps(TINY_HF))
        _write(root / "hf_escape" / name / "model.safetensors.index.json",
               json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": entry}}))
    for name, fields in HUGE_HF.items():
        _write(root / "hf_huge" / name / "config.json", json.dumps({**TINY_HF, **fields}))
        _write(root / "hf_huge" / name / "model.safetensors.index.json",  # a shard that is never opened
               json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-1.safetensors"}}))
        _write(root / "hf_huge" / name / "model-1.safetensors", b"")
    for name, text in TEMPLATES.items():
        _write(root / "templates" / f"{name}.jinja", text)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    _write(root / "chat.jsonl", "\n".join(json.dumps(chat) for _ in range(40)) + "\n")
    _write(root / "nested.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    _write(root / "yaml" / "long_int.yaml", "seed: " + "7" * 5000 + "\n")
    _write(root / "a_file", "not a directory\n")
    (root / "empty_dir").mkdir(exist_ok=True)
    _write(root / "prompts.bin", bytes(range(256)) * 4)


# ----------------------------------------------------------------------------- the cases, per verb

BAD_OVERRIDES = [  # (override, needle): refused by every verb that takes a config
    ("=", None), ("model.", None), ("model..d_model=1", None), ("a=b=c", None), ("model.d_model=[", "model.d_model"),
    ("model.d_model={", "model.d_model"), ("model=5", "model"), ("model.moe=3", "model.moe"), ("=3", None),
    ("model.d_model=&a", None), ("model.d_model=*a", None), ("mesh.rules=[x]", "mesh.rules"), ("nosuch.key=1",
    "nosuch"), ("seed.x=1", None), ("model.n_heads", None), ("seed=99999999999999999999999", "seed"),
    ("seed=-1", "seed"), ("model.vocab_size=1000000000000", "model.vocab_size"), ("train.steps=1e30", "train.steps"),
    ("optim.b2=5", "optim.b2"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=-.inf", "optim.lr"),
    ("model.d_model=abc", "model.d_model"), ("model.norm=nope", "model.norm"), ("train=true", "train"),
    ("model=[1, 2]", "model"), ("data.path=", "data.path"), ("train.batch_size=0", "train.batch_size"),
    ("model.n_heads=3", None), ("data.seq_len=100000", "data.seq_len"), ("model.d_model=!!python/none x", None),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("model.rope_theta=0", "model.rope_theta"),
    ("train.objective=nope", "train.objective"), ("lora.rank=-1", "lora.rank"),
]


def _config_verbs(root: Path) -> list[Case]:
    out = []
    for override, needle in BAD_OVERRIDES:
        out.append(case(["config", "show", *TINY, override], USAGE, needle))
        out.append(case(["train", "--check", "--workdir", f"{root}/never", *TINY, override], USAGE, needle))
    for name in BAD_YAML:
        out.append(case(["config", "show", "--config", f"{root}/yaml/{name}"], USAGE))
        out.append(case(["train", "--check", "--workdir", f"{root}/never", "--config", f"{root}/yaml/{name}"], USAGE))
    for section, name in (("model", "list_model"), ("train", "bool_train"), ("model", "set_model"),
                          ("data", "str_data"), ("optim", "int_optim")):
        out.append(case(["train", "--workdir", f"{root}/never", "--config", f"{root}/yaml/{name}.yaml"], USAGE,
                        f"{section}: expected a mapping"))
    for override, needle in BAD_OVERRIDES[:12]:
        out += [case(["bench", *TINY, override], USAGE, needle), case(["bench-data", *TINY, override], USAGE, needle),
                case(["compile", "--topology", "v5e-8", *TINY, override], USAGE, needle),
                case(["mup-check", *TINY, override], USAGE, needle)]
    out += [
        case(["config", "show", *TINY], {0}), case(["config", "show", *TINY, "model.d_model=64"], {0}),
        case(["config", "show", "--config", f"{root}/nothere.yaml"], USAGE, "nothere.yaml"),
        case(["config", "show", "--config", f"{root}/empty_dir"], USAGE), case(["config", "show", "--config", ""],
                                                                                USAGE),
        case(["config"], USAGE), case(["config", "nope"], USAGE),
        case(["train", "--check", "--workdir", "/proc/llmjax/run", *TINY], STORAGE, "/proc"),
        case(["train", "--workdir", "/proc/llmjax/run", *TINY], STORAGE, "/proc"),
        case(["train", "--check", "--workdir", f"{root}/a_file", *TINY], USAGE, "not a directory"),
        case(["train", "--check", "--workdir", "", *TINY], USAGE, "--workdir"),
        case(["train", "--check", "--workdir", f"{root}/never", *TINY, f"train.init_from={root}/empty_dir"], USAGE,
             "train.init_from"),
        case(["train", "--workdir", f"{root}/never", *TINY, f"train.init_from={root}/empty_dir"], USAGE,
             "train.init_from"),
        case(["train", "--check", "--workdir", f"{root}/never", *TINY, f"data.path={root}/nothere"], USAGE,
             "data.path"),
        case(["train", "--check", "--workdir", f"{root}/never", *TINY, f"data.tokenizer={root}/a_file"], USAGE,
             "data.tokenizer"),
        case(["train", "--check", "--workdir", f"{root}/never", *TINY, f"eval.tasks=[{root}/a_file]"], USAGE),
        case(["train", "--nope"], USAGE), case(["train", "--check", "--config"], USAGE),
        case(["bench", "--steps", "0", *TINY], USAGE, "--steps"), case(["bench", "--steps", "x"], USAGE),
        case(["bench", "--steps", "-3", *TINY], USAGE, "--steps"),
        case(["bench", "--rounds", "0", *TINY], USAGE, "--rounds"), case(["bench", "--warmup", "-1", *TINY], USAGE,
                                                                         "--warmup"),
        case(["bench-data", "--batches", "x"], USAGE), case(["bench-data", "--batches", "0", *TINY], USAGE),
        case(["bench-data", *TINY, f"data.path={root}/nothere"], USAGE, "data.path"),
        case(["mup-check", "--widths", "a,b", *TINY], USAGE, "--widths"),
        case(["mup-check", "--widths", "-1", *TINY], USAGE, "--widths"),
        case(["mup-check", "--widths", "", *TINY], USAGE, "--widths"),
        case(["mup-check", "--parametrizations", "nope", *TINY], USAGE, "--parametrizations"),
        case(["mup-check", "--steps", "0", *TINY], USAGE, "--steps"),
        case(["compile", "--topology", "nope-8", *TINY], USAGE, "nope-8"),
        case(["compile", "--topology", "", *TINY], USAGE),
        case(["compile", "--topology", "v5e-8", "--slices", "0", *TINY], USAGE),
        case(["compile", "--topology", "v5e-8", "--slices", "x"], USAGE), case(["compile"], USAGE),
    ]
    return out


def _workdir_verbs(root: Path) -> list[Case]:
    out = []
    readers = [["generate", "--prompt", "x", "--workdir"], ["eval", "--workdir"], ["bench-generate", "--workdir"],
               ["harness", "--tasks", "x", "--workdir"]]
    targets = [f"{root}/nothere", f"{root}/a_file", f"{root}/empty_dir", "/proc/llmjax",
               *(f"{root}/work/{name}" for name in WORKDIR_CONFIGS)]
    for head in readers:
        for target in targets:
            out.append(case([*head, target], FAILS))
    for target in targets:
        out.append(case(["convert", "to-hf", target, f"{root}/never_hf"], FAILS))
    out += [
        case(["generate"], USAGE), case(["generate", "--workdir", f"{root}/empty_dir", "--beams", "x"], USAGE),
        case(["generate", "--workdir", f"{root}/empty_dir", "--prompt-file", f"{root}/prompts.bin"], USAGE),
        case(["generate", "--workdir", f"{root}/empty_dir", "--temperature", "abc"], USAGE),
        case(["eval"], USAGE), case(["eval", "--workdir", f"{root}/empty_dir", "--split", "nope"], USAGE),
        case(["eval", "--workdir", f"{root}/empty_dir", "--batches", "x"], USAGE),
        case(["bench-generate"], USAGE), case(["bench-generate", "--workdir", f"{root}/empty_dir", "--batch", "x"],
                                              USAGE),
        case(["harness"], USAGE), case(["harness", "--workdir", f"{root}/empty_dir"], USAGE),
        # --quant and its int4 options are checked before the workdir is read
        case(["generate", "--workdir", f"{root}/empty_dir", "--prompt", "x", "--quant", "int5"], USAGE, "--quant"),
        case(["bench-generate", "--workdir", f"{root}/empty_dir", "--quant", ""], USAGE, "--quant"),
        case(["eval", "--workdir", f"{root}/empty_dir", "--quant", "int4,nope"], USAGE, "'nope'"),
        case(["eval", "--workdir", f"{root}/empty_dir", "--quant", "int4", "--quant-group-size", "0"], USAGE,
             "--quant-group-size"),
        case(["eval", "--workdir", f"{root}/empty_dir", "--quant", "int4", "--quant-group-size", "-128"], USAGE,
             "--quant-group-size"),
        case(["generate", "--workdir", f"{root}/empty_dir", "--prompt", "x", "--quant", "int4",
              "--quant-group-size", "33"], USAGE, "--quant-group-size"),
        case(["generate", "--workdir", f"{root}/empty_dir", "--prompt", "x", "--quant", "int4",
              "--quant-group-size", "x"], USAGE),
        case(["bench-generate", "--workdir", f"{root}/empty_dir", "--quant", "int4-gptq", "--calib-sequences", "0"],
             USAGE, "--calib-sequences"),
        case(["eval", "--workdir", f"{root}/empty_dir", "--quant", "int4-gptq", "--gptq-damp", "nan"], USAGE,
             "--gptq-damp"),
        case(["eval", "--workdir", f"{root}/empty_dir", "--quant", "int4-gptq", "--gptq-damp", "0"], USAGE,
             "--gptq-damp"),
        case(["convert"], USAGE), case(["convert", "to-hf"], USAGE), case(["convert", "from-hf"], USAGE),
        case(["convert", "to-hf", f"{root}/empty_dir", f"{root}/x", "--dtype", "int3"], USAGE),
    ]
    for name in HF_CONFIGS:
        out.append(case(["convert", "from-hf", f"{root}/hf/{name}", f"{root}/never_work"], FAILS))
    out += [
        case(["convert", "from-hf", f"{root}/hf/no_config", f"{root}/never_work"], FAILS),
        case(["convert", "from-hf", f"{root}/nothere", f"{root}/never_work"], FAILS),
        case(["convert", "from-hf", f"{root}/a_file", f"{root}/never_work"], FAILS),
        case(["convert", "from-hf", f"{root}/hf/no_weights", "/proc/llmjax/work"], FAILS),
        case(["convert", "from-hf", f"{root}/hf/no_weights", f"{root}/a_file"], FAILS),
    ]
    return out


def _scaling_verbs(root: Path) -> list[Case]:
    out = []
    for name, (_, needle) in SWEEPS.items():
        out.append(case(["sweep", "run", f"{root}/sweeps/{name}", "--dry-run"], USAGE, needle))
    good = str(ROOT / "experiments" / "sweeps" / "grid_example.yaml")
    out += [
        case(["sweep", "run", f"{root}/sweeps/escape.yaml"], USAGE, "plain directory name"),
        case(["sweep", "run", f"{root}/nothere.yaml", "--dry-run"], USAGE),
        case(["sweep", "run", f"{root}/empty_dir", "--dry-run"], USAGE),
        case(["sweep", "run", good, "--dry-run", "--pack", "0"], USAGE),
        case(["sweep", "run", good, "--dry-run", "--pack", "x"], USAGE),
        case(["sweep", "run", good, "--dry-run", "--pack-mode", "nope"], USAGE),
        case(["sweep"], USAGE), case(["sweep", "run"], USAGE), case(["sweep", "nope"], USAGE),
        case(["sweep", "collect"], USAGE), case(["sweep", "collect", f"{root}/nothere"], FAILS),
        case(["sweep", "collect", f"{root}/a_file"], FAILS), case(["sweep", "collect", f"{root}/empty_dir"], FAILS),
        case(["sweep", "collect", f"{root}/empty_dir", "--out", "/proc/llmjax/runs.csv"], FAILS),
    ]
    for name, (_, needle) in CSVS.items():
        if name != "good.csv":
            out.append(case(["fit", "--csv", f"{root}/csv/{name}", "--out", f"{root}/never_fit", "--bootstrap", "0"],
                            USAGE, needle))
    good_csv = f"{root}/csv/good.csv"
    out += [
        case(["fit", "--csv", good_csv, "--out", f"{root}/fit_ok", "--bootstrap", "0"], {0}),
        case(["fit", "--csv", good_csv, "--out", "/proc/llmjax/fit", "--bootstrap", "0"], STORAGE, "/proc/llmjax"),
        case(["fit", "--csv", good_csv, "--out", f"{root}/a_file", "--bootstrap", "0"], FAILS),
        case(["fit", "--csv", f"{root}/nothere.csv", "--out", f"{root}/never_fit"], USAGE),
        case(["fit", "--csv", f"{root}/empty_dir", "--out", f"{root}/never_fit"], USAGE),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--budgets", "x"], USAGE, "--budgets"),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--budgets", "-1"], USAGE),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--budgets", "nan"], USAGE),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--holdout", "nope"], USAGE),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--bootstrap", "-1"], USAGE, "--bootstrap"),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--loss", "nosuch"], USAGE, "nosuch"),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--hparams", "nosuch"], USAGE),
        case(["fit", "--csv", good_csv, "--out", f"{root}/never_fit", "--params", "x"], USAGE),
        case(["fit"], USAGE), case(["fit", "--csv", good_csv], USAGE),
    ]
    for name in FITS:
        if name == "empty_obj.json":  # no fitted law: the IsoFLOP curves alone (valid, and ~14 s of plotting)
            continue
        out.append(case(["plot", "--csv", good_csv, "--fit", f"{root}/fits/{name}", "--out", f"{root}/never_plot"],
                        USAGE, f"--fit {root}/fits/{name}"))
    out += [
        case(["plot", "--csv", good_csv, "--out", f"{root}/never_plot"], USAGE, "--fit"),
        case(["plot", "--csv", good_csv, "--fit", f"{root}/nothere.json", "--out", f"{root}/never_plot"], USAGE),
        case(["plot", "--csv", f"{root}/csv/binary.csv", "--fit", f"{root}/fits/list.json", "--out",
              f"{root}/never_plot"], USAGE),
        case(["plot", "--csv", f"{root}/csv/empty.csv", "--kind", "lr-transfer", "--out", f"{root}/never_plot"],
             USAGE),
        case(["plot", "--csv", good_csv, "--kind", "lr-transfer", "--out", f"{root}/never_plot"], USAGE),
        case(["plot", "--csv", good_csv, "--kind", "nope", "--out", f"{root}/never_plot"], USAGE),
        case(["plot"], USAGE),
    ]
    return out


def _data_verbs(root: Path) -> list[Case]:
    return [
        case(["data"], USAGE), case(["data", "nope"], USAGE), case(["data", "prepare"], USAGE),
        case(["data", "prepare", "/proc/llmjax/out", *TINY], FAILS),
        case(["data", "prepare", f"{root}/a_file", *TINY], FAILS),
        case(["data", "prepare", f"{root}/never_out", "--workers", "0", *TINY], USAGE),
        case(["data", "prepare", f"{root}/never_out", "--workers", "x"], USAGE),
        case(["data", "prepare", f"{root}/never_out", "--runner", "nope"], USAGE),
        case(["data", "prepare", f"{root}/never_out", "--shards", "-1", *TINY], USAGE),
        case(["data", "prepare", f"{root}/never_out", *TINY, f"data.path={root}/nothere"], USAGE, "data.path"),
        case(["data", "prepare", f"{root}/never_out", *TINY, "nosuch.key=1"], USAGE, "nosuch"),
        case(["data", "prepare", f"{root}/never_out", "--config", f"{root}/yaml/list_model.yaml"], USAGE, "model"),
        case(["nosuchverb"], USAGE), case([], USAGE), case(["--nope"], USAGE),
    ]


def _hostile_inputs(root: Path) -> list[Case]:
    """Inputs that would read outside the directory given or allocate without bound (issue 26 points 1-2)."""
    chat_tok = str(ROOT / "experiments" / "data" / "chat_tokenizer")
    sft = ["train", "--check", "--workdir", f"{root}/never", *TINY, "train.objective=sft", f"data.tokenizer={chat_tok}"]
    out = [case(["convert", "from-hf", f"{root}/hf_escape/{name}", f"{root}/never_work"], USAGE, "weight_map")
           for name in ESCAPES]
    out += [case(["convert", "from-hf", f"{root}/hf_huge/{name}", f"{root}/never_work"], USAGE, "config.json")
            for name in HUGE_HF]
    out += [case([*sft, f"data.path={root}/chat.jsonl", f"data.chat_template={root}/templates/{name}.jinja"],
                 USAGE, "chat template") for name in TEMPLATES]
    out += [case([*sft, f"data.path={root}/nested.jsonl"], USAGE, "nested too deeply"),
            case(["config", "show", "--config", f"{root}/yaml/long_int.yaml"], USAGE, "too long")]
    out += [case(["data", "prepare", f"{root}/never_out", *TINY, override], USAGE, needle)
            for override, needle in CURATE_BAD]
    return out


def _reward_verb(root: Path) -> list[Case]:
    """`llmjax reward` (scoring with a reward model): bad arguments and workdirs that are not reward models."""
    out = [case(["reward"], USAGE), case(["reward", "--workdir", f"{root}/empty_dir"], USAGE),
           case(["reward", "--workdir", f"{root}/empty_dir", "--data", f"{root}/chat.jsonl", "--batch", "0"], USAGE,
                "--batch"),
           case(["reward", "--workdir", f"{root}/empty_dir", "--data", f"{root}/chat.jsonl", "--batch", "x"], USAGE),
           case(["reward", "--workdir", f"{root}/empty_dir", "--data", f"{root}/chat.jsonl", "--output",
                 f"{root}/a_file"], USAGE, "--output"),
           case(["reward", "--workdir", f"{root}/nothere", "--data", f"{root}/chat.jsonl"], FAILS)]
    out += [case(["reward", "--workdir", f"{root}/work/{name}", "--data", f"{root}/chat.jsonl"], FAILS)
            for name in WORKDIR_CONFIGS]
    return out


def cases(root: Path) -> list[Case]:
    """Every case, with its files under `root` (call `inputs(root)` first)."""
    return (_config_verbs(root) + _workdir_verbs(root) + _scaling_verbs(root) + _data_verbs(root)
            + _hostile_inputs(root) + _reward_verb(root))
