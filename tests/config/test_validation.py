"""Bad input at the command line: every value the issue lists exits 2 naming its key, before anything is built;
`config show`, `--version` and `train --check`; and a fuzz test of overrides and malformed YAML files.

The checks run `llmjax.cli.main` in-process (fast: no interpreter start per case); conftest gives 8 CPU devices.
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
from pathlib import Path
from typing import Literal

import pytest

from llmjax import cli
from llmjax.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from llmjax.config.fields import doc_of

# A tiny valid run on the 8 virtual devices (mesh.data=-1 -> 8, batch 8).
TINY = [
    "model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "model.compute_dtype=float32", "data.seq_len=32",
    "train.batch_size=8", "train.steps=4", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_steps=1", "eval.every_steps=0", "eval.batches=1", "sample.max_new_tokens=0",
    "data.validation_fraction=0.2",
]


def run_main(capsys, *args: str) -> tuple[int, str]:
    """`llmjax ARGS` in this process: (exit status, stderr). argparse's SystemExit counts as its status."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    return code, capsys.readouterr().err


def check(capsys, tmp_path: Path, *overrides: str, config: str | None = None) -> tuple[int, str]:
    extra = ["--config", config] if config else []
    return run_main(capsys, "train", "--check", "--workdir", str(tmp_path / "run"), *extra, *TINY, *overrides)


# ----------------------------------------------------------------------------- the list


@pytest.mark.parametrize("override, needles", [
    ("seed=99999999999999999999999", ["seed=99999999999999999999999", "2^31 - 1"]),
    ("seed=-1", ["seed=-1"]),
    ("model.vocab_size=1000000000000", ["model.vocab_size=1000000000000"]),
    ("model.vocab_size=100000000", ["model.vocab_size=100000000", "parameters", "GiB"]),  # fits int32, not RAM
    ("train.steps=1e30", ["train.steps="]),
    ("optim.b2=5", ["optim.b2=5", "[0, 1)"]),
    ("optim.b1=1", ["optim.b1=1"]),
    ("optim.weight_decay=-1", ["optim.weight_decay=-1"]),
    ("model.init_std=-1", ["model.init_std=-1"]),
    ("model.rope_theta=0", ["model.rope_theta=0"]),
    ("model.norm_eps=-1", ["model.norm_eps=-1"]),
    ("optim.eps=0", ["optim.eps=0"]),
    ("data.document_bytes=10", ["data.document_bytes=10", "[64, "]),
    ("data.path=", ["data.path", "empty"]),
    ("data.tokenizer=", ["data.tokenizer", "empty"]),
    ("data.text_key=''", ["data.text_key", "empty"]),
    ("data.extensions=['.py', '']", ["data.extensions[1]", "empty"]),
    ("train.batch_size=3000000000", ["train.batch_size"]),
    ("data.validation_fraction=1", ["data.validation_fraction"]),
    ("model.moe.router_jitter=1", ["model.moe.router_jitter"]),
    ("optim.lr=.nan", ["optim.lr"]),
])
def test_bad_values_exit_2_naming_the_key(capsys, tmp_path, override, needles):
    code, err = check(capsys, tmp_path, override)
    assert code == 2, err
    assert "Traceback" not in err and "llmjax: error:" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "run").exists()  # refused before the workdir was created


def test_absurd_depth_is_refused_at_once(capsys, tmp_path):
    """Building 1e8 layers would hang: the parameter estimate refuses it before any model is built."""
    t0 = time.perf_counter()
    code, err = check(capsys, tmp_path, "model.n_layers=100000000")
    assert code == 2 and "model.n_layers=100000000" in err and "estimated from the config" in err, err
    assert time.perf_counter() - t0 < 60


def test_empty_workdir_is_refused(capsys, tmp_path):
    code, err = run_main(capsys, "train", "--check", "--workdir", "", *TINY)
    assert code == 2 and "--workdir" in err, err


def test_duplicate_yaml_keys_are_refused(capsys, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n")
    code, err = run_main(capsys, "train", "--check", "--config", str(path), "--workdir", str(tmp_path / "r"))
    assert code == 2 and "duplicate key 'd_model'" in err and "line 2" in err and str(path) in err, err
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        _load_text(tmp_path, "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key"):  # inline mappings in overrides too
        load_config(None, ["mesh.rules={embed: null, embed: [fsdp]}"])


def _load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return load_config(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    cfg = _load_text(tmp_path, "mesh:\n  rules:\n    <<: {embed: null}\n    vocab: null\n")
    assert cfg.mesh.rules == {"embed": None, "vocab": None}


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(capsys, tmp_path, corpus):
    code, err = check(capsys, tmp_path, f"data.path={corpus}", "optim.warmup_steps=100")
    assert code == 0, err
    assert "optim.warmup_steps=100 is longer than train.steps=4" in err and "check passed" in err
    assert not (tmp_path / "run").exists()  # --check writes nothing
    from llmjax.train.optim import current_lr

    cfg = load_config(None, TINY + ["optim.warmup_steps=100", "optim.schedule=constant", "optim.lr=1.0"])
    assert current_lr(cfg.optim, 4, 2) == pytest.approx(0.5) and current_lr(cfg.optim, 4, 4) == 1.0


# ----------------------------------------------------------------------------- config show, --version


def _leaves(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{prefix}{f.name}", f
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_key_has_a_description():
    missing = [key for key, f in _leaves(Config()) if not doc_of(f).strip()]
    assert not missing, missing


def test_config_show_lists_every_key_and_round_trips(capsys, tmp_path):
    code = cli.main(["config", "show", "model.d_model=96", "optim.lr=0.01"])
    out = capsys.readouterr().out
    assert code == 0
    for key, f in _leaves(Config()):
        name = key.rsplit(".", 1)[-1]
        assert f"{name}:" in out and doc_of(f) in out, key
    assert "d_model: 96  # model width" in out and "(default 256)" in out
    assert "norm: rmsnorm  # normalisation layer [rmsnorm | layernorm]" in out
    assert "b2: 0.95  # second-moment decay (adamw, lion) [in [0, 1)]" in out
    saved = tmp_path / "shown.yaml"
    saved.write_text(out)
    assert load_config(saved) == load_config(None, ["model.d_model=96", "optim.lr=0.01"])


def test_config_show_reports_bad_values(capsys):
    code, err = run_main(capsys, "config", "show", "optim.b2=2")
    assert code == 2 and "optim.b2=2" in err


def test_version_output(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("llmjax ") and "jax" in out and "Python" in out


def test_check_compiles_and_writes_nothing(capsys, tmp_path, corpus):
    code, err = check(capsys, tmp_path, f"data.path={corpus}")
    assert code == 0, err
    assert "compiled the train and eval steps" in err and "check passed" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- fuzz

_INT_VALUES = ["-1", "0", "1", "2", "3", "8", "2147483648", "99999999999999999999", "1e30", "1.5", "abc", "null",
               "", "[1]", "{a: 1}", "true", "-0", "0x10", "1_000"]
_FLOAT_VALUES = ["-1", "0", "0.5", "1", "1e-9", "1e38", ".nan", ".inf", "-.inf", "1e400", "x", "null", "", "[]",
                 "2", "1e-300"]
_STR_VALUES = ["", " ", "x", "/nonexistent/path", "null", "5", "[a", "{a: b}", "'quoted'", "\x00", "\u00e9\u00e9"]
_BOOL_VALUES = ["true", "false", "1", "yes", "null", "", "maybe"]
_BROKEN = ["=", "model.", "model..d_model=1", "a=b=c", "model.d_model=[", "model.d_model={", "model.d_model=: x",
           "model=5", "model.moe=3", "=3", "model.d_model=&a", "model.d_model=*a", "model.d_model=!!python/none x",
           "mesh.rules=[x]", "mesh.rules.embed=[1, 2]", "nosuch.key=1", "seed.x=1", "model.n_heads"]
# keys whose values would start network or multi-process actions rather than be validated
_SKIP = {"distributed.coordinator", "distributed.num_processes", "distributed.process_id", "data.cache_dir",
         "data.tfds_data_dir", "data.path", "data.tokenizer", "distributed.initialization_timeout"}


def _keys() -> list[tuple[str, typing.Any]]:
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif f"{prefix}{f.name}" not in _SKIP:
                out.append((f"{prefix}{f.name}", tp))

    walk(Config, "")
    return out


def _random_value(rng: random.Random, tp) -> str:
    if typing.get_origin(tp) is Literal:
        pool = [str(a) for a in typing.get_args(tp)] + ["nope", "", "null", "1"]
    elif tp is bool:
        pool = _BOOL_VALUES
    elif tp is int or int in typing.get_args(tp):
        pool = _INT_VALUES
    elif tp is float:
        pool = _FLOAT_VALUES
    else:
        pool = _STR_VALUES + _INT_VALUES[:4]
    return rng.choice(pool)


def _random_overrides(rng: random.Random, keys) -> list[str]:
    if rng.random() < 0.15:
        return [rng.choice(_BROKEN)]
    return [f"{key}={_random_value(rng, tp)}" for key, tp in rng.sample(keys, rng.randint(1, 3))]


def _mutate_yaml(rng: random.Random, text: str) -> bytes:
    """A default.yaml broken in one of several ways."""
    lines = text.splitlines()
    kind = rng.randrange(9)
    if kind == 0:  # a line duplicated (a duplicate key)
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == 1:  # random characters inserted
        pos = rng.randrange(len(text))
        text = text[:pos] + "".join(rng.choice(":-[]{}\t&*!|>'\"#%@`,?") for _ in range(rng.randint(1, 4))) + text[pos:]
        return text.encode()
    elif kind == 2:  # truncated
        return text[: rng.randrange(len(text))].encode()
    elif kind == 3:  # random bytes, not UTF-8
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    elif kind == 4:  # deep nesting
        depth = rng.choice([50, 2000])
        return ("model: " + "[" * depth + "]" * depth + "\n").encode()
    elif kind == 5:  # a key indented wrongly
        i = rng.randrange(len(lines))
        lines[i] = " " * rng.randint(1, 3) + lines[i]
    elif kind == 6:  # a value replaced by something of another type
        i = rng.randrange(len(lines))
        if ":" in lines[i]:
            lines[i] = lines[i].split(":")[0] + ": " + rng.choice(["[1, 2]", "{a: 1}", "~", "''", "!!binary aGk=",
                                                                    "2001-01-01", "&x 1", "*nope"])
    elif kind == 7:  # a python tag (refused by the safe loader)
        lines.append("seed: !!python/object/apply:os.system ['true']")
    else:  # a top level that is not a mapping
        return rng.choice([b"- a\n- b\n", b"42\n", b"'text'\n", b"\xef\xbb\xbfseed: 1\n", b"\n\n", b"..."])
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.slow
def test_fuzz_train_check_exits_0_or_2(capsys, tmp_path, corpus):
    """>= 200 random override sets and malformed YAML files: every one ends in exit 0 or 2, never a traceback
    (an internal error would exit 1 with its traceback in the log)."""
    rng = random.Random(17)
    keys = _keys()
    base_text = Path(DEFAULT_CONFIG).read_text()
    outcomes = {0: 0, 2: 0}
    for case in range(210):
        config = None
        if case % 3 == 2:
            path = tmp_path / f"fuzz{case}.yaml"
            path.write_bytes(_mutate_yaml(rng, base_text))
            config, overrides = str(path), []
        else:
            overrides = _random_overrides(rng, keys)
        code, err = run_main(capsys, "train", "--check", "--workdir", str(tmp_path / "run"),
                             *(["--config", config] if config else []), *TINY, f"data.path={corpus}", *overrides)
        detail = f"case {case}: {overrides or Path(config).read_bytes()[:300]!r}\n{err}"
        assert code in (0, 2), detail
        assert "Traceback" not in err, detail
        if code == 2:  # one line says what is wrong (argparse prints its usage instead)
            assert sum(line.startswith("llmjax: error:") for line in err.splitlines()) == 1 or "usage:" in err, detail
        outcomes[code] += 1
    assert outcomes[0] >= 10 and outcomes[2] >= 100, outcomes  # both kinds were exercised
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- other verbs' file inputs


def test_prompt_file_that_is_not_text(capsys, tmp_path):
    path = tmp_path / "prompts.bin"
    path.write_bytes(bytes(range(256)) * 4)
    code, err = run_main(capsys, "generate", "--workdir", str(tmp_path), "--prompt-file", str(path))
    assert code == 2 and f"--prompt-file: {path} is not UTF-8 text" in err and "Traceback" not in err, err


_CSV = "name,params,tokens,loss\na,1e5,2e6,3.1\nb,2e5,4e6,2.9\nc,4e5,8e6,2.8\n"


@pytest.mark.parametrize("content, needle", [
    (_CSV.replace("b,2e5,4e6,2.9", "b,2e5,4e6,2.9,extra,more"), "row 3 has 6 fields, the header 4"),
    (_CSV.encode().replace(b"name", b"n\xffme"), "not UTF-8 text"),
    (_CSV.replace("1e5", "1e308"), "overflows"),
    (_CSV.replace("2e6", "inf"), "positive and finite"),
])
def test_fit_on_a_malformed_csv(capsys, tmp_path, content, needle):
    path = tmp_path / "runs.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_main(capsys, "fit", "--csv", str(path), "--out", str(tmp_path / "fit"), "--bootstrap", "0")
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "fit" / "fit.json").exists()


def test_sweep_spec_with_duplicate_keys(capsys, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: s\nname: t\ngrid: {tokens: [1e6]}\n")
    code, err = run_main(capsys, "sweep", "run", str(path), "--dry-run")
    assert code == 2 and "duplicate key 'name'" in err, err


def test_preparing_a_local_corpus_does_not_claim_a_download(capsys, tmp_path, corpus):
    code = cli.main(["train", "--check", "--workdir", str(tmp_path / "run"), *TINY, f"data.path={corpus}",
                     f"data.cache_dir={tmp_path / 'fresh-cache'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Downloading" not in captured.out + captured.err
    assert "downloaded and prepared" not in captured.out + captured.err
