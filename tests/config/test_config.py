"""Tests of the typed config: YAML defaults, dotted overrides, type checks, cross-field validation."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from helpers import full_mesh_shape

from llmjax.config import (
    DEFAULT_CONFIG,
    FAMILIES,
    Config,
    ConfigError,
    family_spec,
    from_dict,
    load_config,
    mesh_axis_names,
    save_config,
    to_dict,
    validate,
    validate_config,
    validate_mesh,
)
from llmjax.parallel.mesh import mesh_shape

N_DEVICES = 8

# A small valid configuration on 8 devices (data=-1 -> 8); each test changes what it needs.
BASE = [
    "model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8", "train.steps=10",
    "optim.warmup_steps=1",
]


def cfg_with(*overrides: str) -> Config:
    return load_config(None, BASE + list(overrides))


def raises(*keys: str):
    """pytest.raises(ConfigError) whose message names every key in `keys` (literally)."""
    return pytest.raises(ConfigError, match="(?s)" + "".join(f"(?=.*{re.escape(k)})" for k in keys))


# ----------------------------------------------------------------------------- loading


def test_defaults_come_from_default_yaml():
    cfg = load_config()
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert isinstance(cfg, Config)
    for section, values in raw.items():
        if not isinstance(values, dict):
            assert getattr(cfg, section) == values
            continue
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    # keys the file leaves out keep the dataclass defaults
    assert cfg.model.head_dim == 0 and cfg.model.norm_eps == 1e-5 and cfg.optim.grad_accum_steps == 1
    assert load_config(DEFAULT_CONFIG) == cfg
    assert validate(cfg, N_DEVICES) == {"pipeline": 1, "data": 8, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}


def test_mesh_axis_names():
    assert mesh_axis_names() == ("pipeline", "data", "fsdp", "expert", "context", "tensor")


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("model.d_model=128", lambda c: c.model.d_model, 128),
        ("seed=7", lambda c: c.seed, 7),
        ("optim.lr=0.5", lambda c: c.optim.lr, 0.5),
        ("optim.lr=3e-4", lambda c: c.optim.lr, 3e-4),  # YAML 1.1 reads this as a string
        ("optim.lr=3.0e-4", lambda c: c.optim.lr, 3e-4),
        ("optim.lr=1", lambda c: c.optim.lr, 1.0),  # int -> float
        ("train.steps=1e3", lambda c: c.train.steps, 1000),  # integral float -> int
        ("model.norm_eps=1e-6", lambda c: c.model.norm_eps, 1e-6),
        ("train.progress=false", lambda c: c.train.progress, False),
        ("model.tie_embeddings=true", lambda c: c.model.tie_embeddings, True),
        ("data.path=null", lambda c: c.data.path, None),
        ("data.path=/some/where", lambda c: c.data.path, "/some/where"),
        ("data.extensions=[.py, .txt]", lambda c: c.data.extensions, [".py", ".txt"]),
        ("data.extensions=[]", lambda c: c.data.extensions, []),
        ("mesh.rules.embed=null", lambda c: c.mesh.rules, {"embed": None}),
        ("mesh.rules.vocab=[tensor, fsdp]", lambda c: c.mesh.rules, {"vocab": ["tensor", "fsdp"]}),
        ("mesh.rules={embed: null, mlp: tensor}", lambda c: c.mesh.rules, {"embed": None, "mlp": "tensor"}),
        ("sample.prompt=hello world", lambda c: c.sample.prompt, "hello world"),
    ],
)
def test_override_values(override, get, expected):
    cfg = cfg_with(override)
    value = get(cfg)
    assert value == expected and type(value) is type(expected)
    validate(cfg, N_DEVICES)


def test_later_override_wins_and_file_is_untouched(tmp_path):
    path = tmp_path / "exp.yaml"
    # n_kv_heads with n_heads: a loaded config is validated (n_heads=2 with the default 4 kv heads is not)
    path.write_text("model:\n  d_model: 32\n  n_heads: 2\n  n_kv_heads: 2\noptim:\n  lr: 1.0e-3\n")
    before = path.read_text()
    cfg = load_config(path, ["model.d_model=48", "model.d_model=96"])
    assert cfg.model.d_model == 96 and cfg.model.n_heads == 2 and cfg.optim.lr == 1e-3
    assert cfg.model.n_layers == 4  # not in the file: dataclass default
    assert path.read_text() == before


def test_empty_yaml_file_gives_dataclass_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_save_load_round_trip(tmp_path):
    cfg = cfg_with("optim.lr=3e-4", "mesh.rules.embed=null", "mesh.rules.vocab=[tensor]", "data.path=/x/y",
                   "data.extensions=[.txt]", "train.progress=false", "model.norm=layernorm")
    cfg.sample.prompt = "def f(x):\n\t# a: b, 'q' \"dq\" é\n"  # needs quoting in YAML
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg


def test_model_config_is_hashable():
    cfg = load_config()
    assert hash(cfg.model) == hash(dataclasses.replace(cfg.model))


# ----------------------------------------------------------------------------- key and type errors


@pytest.mark.parametrize(
    "override, key",
    [
        ("foo=1", "'foo'"),
        ("model.foo=1", "'model.foo'"),
        ("model.dmodel=64", "'model.dmodel'"),
        ("optim.learning_rate=0.1", "'optim.learning_rate'"),
        ("modle.d_model=64", "'modle'"),
    ],
)
def test_unknown_key(override, key):
    with raises("unknown config key", key):
        cfg_with(override)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 64\n  n_head: 4\n")
    with raises("'model.n_head'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.d_model=abc", "model.d_model"),  # string for int
        ("model.d_model=1.5", "model.d_model"),  # non-integral float for int
        ("model.d_model=true", "model.d_model"),  # bool for int
        ("model.d_model=[64]", "model.d_model"),  # list for int
        ("optim.lr=fast", "optim.lr"),  # string for float
        ("optim.lr=nan", "optim.lr"),  # non-finite float
        ("optim.lr=.inf", "optim.lr"),
        ("train.progress=1.5", "train.progress"),  # float for bool
        ("train.progress=1", "train.progress"),  # int for bool
        ("train.progress=maybe", "train.progress"),  # string for bool
        ("optim.name=[adamw]", "optim.name"),  # list for str
        ("optim.name=1", "optim.name"),  # int for str
        ("data.path=[a, b]", "data.path"),  # list for str | None
        ("data.extensions=.py", "data.extensions"),  # str for list
        ("data.extensions=[1]", "data.extensions[0]"),  # wrong item type
        ("mesh.rules=[embed]", "mesh.rules"),  # list for mapping
        ("model=3", "model"),  # scalar for a section
        ("seed.x=1", "seed"),  # section under a scalar
        ("model.d_model=", "model.d_model"),  # empty value
    ],
)
def test_wrong_type(override, key):
    with raises(key):
        cfg_with(override)


@pytest.mark.parametrize("item", ["model.d_model", "=3", "model.d_model=[1,"])
def test_malformed_override(item):
    with raises(item):
        cfg_with(item)


def test_missing_and_invalid_yaml_files(tmp_path):
    with raises("missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [64\n")
    with raises("bad.yaml", "invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with raises("scalar.yaml", "mapping"):
        load_config(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with raises("binary.yaml"):
        load_config(binary)


def test_an_integer_too_long_to_convert_is_a_usage_error(tmp_path):
    """A 5,000-digit integer (over Python's int-string limit: a ValueError before) names the file and line."""
    digits = "9" * 5000
    big = tmp_path / "big.yaml"
    big.write_text(f"model:\n  d_model: 64\n  n_layers: {digits}\n")
    with raises("big.yaml", "an integer of 5,000 digits is too long (at most 4,300) (line 3, column 13)"):
        load_config(big)
    with raises("model.n_layers=", "an integer of 5,000 digits"):
        cfg_with(f"model.n_layers={digits}")
    assert cfg_with(f"model.n_layers={'0' * 4000}3").model.n_layers == 3  # long but convertible: as before


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["model.n_heads=4", "model.n_kv_heads=3"], ["model.n_heads=4", "model.n_kv_heads=3"]),
        (["model.d_model=60", "model.n_heads=8", "model.n_kv_heads=8"], ["model.d_model", "model.n_heads"]),
        (["mesh.data=1", "mesh.tensor=8"], ["model.n_heads=4", "mesh.tensor=8"]),
        (["mesh.data=2", "mesh.tensor=4", "model.d_ff=130"], ["model.d_ff=130", "mesh.tensor=4"]),
        (["mesh.data=3"], ["mesh", "data=3", "8 devices"]),
        (["mesh.data=2", "mesh.fsdp=2"], ["mesh", "4 devices", "8 devices"]),
        (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh.data", "mesh.fsdp"]),
        (["mesh.data=-1", "mesh.tensor=3"], ["mesh.data=-1", "8"]),
        (["mesh.fsdp=0"], ["mesh.fsdp"]),
        (["mesh.tensor=-2"], ["mesh.tensor"]),
        (["train.batch_size=4"], ["train.batch_size=4", "mesh.data", "mesh.fsdp"]),
        (["mesh.data=2", "mesh.fsdp=4", "train.batch_size=12"], ["train.batch_size=12", "mesh.data", "mesh.fsdp"]),
        (["train.batch_size=16", "optim.grad_accum_steps=3"], ["train.batch_size=16", "optim.grad_accum_steps=3"]),
        # divisible by grad_accum but the micro-batch (8 / 2 = 4) is not divisible by data x fsdp = 8
        (["optim.grad_accum_steps=2"], ["train.batch_size=8", "mesh.data", "mesh.fsdp"]),
        (["data.seq_len=128"], ["data.seq_len=128", "model.max_seq_len=64"]),
        (["optim.name=adam"], ["optim.name", "'adam'"]),
        (["optim.schedule=step"], ["optim.schedule", "'step'"]),
        (["model.norm=batchnorm"], ["model.norm", "'batchnorm'"]),
        (["model.position=alibi"], ["model.position", "'alibi'"]),
        (["model.mlp=mish"], ["model.mlp", "'mish'"]),
        (["model.compute_dtype=fp8"], ["model.compute_dtype", "'fp8'"]),
        (["model.remat=some"], ["model.remat", "'some'"]),
        (["model.attention=flash"], ["model.attention", "'flash'"]),
        (["data.tokenizer_type=wordpiece"], ["data.tokenizer_type", "'wordpiece'"]),
        (["mesh.rules.embeddings=null"], ["mesh.rules.embeddings"]),
        (["mesh.rules.embed=model"], ["mesh.rules.embed", "'model'"]),
        (["mesh.rules.vocab=[tensor, model]"], ["mesh.rules.vocab", "model"]),
        (["mesh.rules.vocab=3"], ["mesh.rules.vocab"]),
        (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1"]),
        (["model.head_dim=5"], ["model.position=rope", "model.head_dim", "5"]),
        (["model.d_model=12", "model.n_heads=4", "model.n_kv_heads=4"], ["model.position=rope", "3"]),
        (["model.head_dim=-1"], ["model.head_dim"]),
        (["model.d_model=0"], ["model.d_model"]),
        (["optim.lr=0"], ["optim.lr"]),
        (["optim.grad_accum_steps=0"], ["optim.grad_accum_steps"]),
        (["train.steps=0"], ["train.steps"]),
        (["train.batch_size=0"], ["train.batch_size"]),
        (["data.seq_len=0"], ["data.seq_len"]),
        (["data.validation_fraction=1.0"], ["data.validation_fraction"]),
        (["data.path=/x", "data.tfds_name=y"], ["data.path", "data.tfds_name"]),
        (["optim.decay_fraction=1.5"], ["optim.decay_fraction"]),
        (["optim.min_lr_ratio=-0.1"], ["optim.min_lr_ratio"]),
        (["eval.batches=-1"], ["eval.batches"]),
        (["checkpoint.every_steps=-1"], ["checkpoint.every_steps"]),
        (["checkpoint.keep=0"], ["checkpoint.keep"]),
        (["sample.temperature=-1"], ["sample.temperature"]),
        (["mesh.expert=2"], ["mesh.expert=2", "model.moe.num_experts"]),
        (["mesh.expert=4", "model.moe.num_experts=6"], ["model.moe.num_experts=6", "mesh.expert=4"]),
        (["mesh.expert=8", "model.moe.num_experts=8", "train.batch_size=4"],
         ["train.batch_size=4", "mesh.expert"]),
        (["pipeline.microbatches=0"], ["pipeline.microbatches"]),
        (["mesh.expert=2", "model.moe.num_experts=4", "mesh.rules={expert: null}"], ["mesh.rules.expert"]),
        (["mesh.expert=2", "model.moe.num_experts=4", "mesh.rules={act_batch: [data]}"], ["mesh.rules.act_batch"]),
        (["train.stop_after=11"], ["train.stop_after=11", "train.steps=10"]),
        (["pipeline.repeats=2"], ["pipeline.repeats", "mesh.pipeline"]),
        (["model.family=encoder", "train.objective=dpo"], ["train.objective=dpo", "model.family=encoder"]),
        (["model.family=encoder_decoder", "mesh.pipeline=2", "mesh.data=4"], ["mesh.pipeline=2", "encoder_decoder"]),
    ],
)
def test_validate_errors_name_the_keys(overrides, keys):
    with raises(*keys):  # the rules of the config alone fail while loading, those of the mesh in validate
        validate(cfg_with(*overrides), N_DEVICES)


def test_cross_field_rules_run_at_load():
    """`load_config` runs the rules of the config alone; `check=False` leaves them to a later `validate` (a config
    completed in code); the rules that need the device count wait for `validate_mesh`."""
    with raises("model.n_heads=4", "model.n_kv_heads=3"):
        cfg_with("model.n_kv_heads=3")
    part = load_config(None, BASE + ["model.n_kv_heads=3"], check=False)
    with raises("model.n_heads=4", "model.n_kv_heads=3"):
        validate_config(part)
    with raises("model.n_heads=4", "model.n_kv_heads=3"):
        validate(part, N_DEVICES)
    fixed = dataclasses.replace(part, model=dataclasses.replace(part.model, n_kv_heads=2))
    validate_config(fixed)
    on_four = cfg_with("mesh.data=4")  # loads: how many devices there are is not known yet
    with raises("mesh", "data=4", "8 devices"):
        validate_mesh(on_four, N_DEVICES)
    assert validate_mesh(on_four, 4)["data"] == 4


def test_family_specs_declare_each_family_once():
    """One FamilySpec per family: its config class (whose `family` default is its name), its code, its flags;
    the config reads them through `ModelConfig.spec`."""
    assert set(FAMILIES) == {"decoder", "encoder", "encoder_decoder"}
    for name, spec in FAMILIES.items():
        assert spec.name == name and family_spec(name) is spec
        assert spec.config_class().family == name and spec.config_class().spec is spec
        assert spec.implementation.startswith("llmjax.models.families.") and ":" in spec.implementation
        assert set(spec.packings) <= {"concat", "best_fit"} and spec.packings
    decoder = family_spec("decoder")
    assert decoder.causal_lm and decoder.decoding and decoder.hf_export and decoder.pipeline
    assert not family_spec("encoder").decoding and not family_spec("encoder_decoder").pipeline
    assert cfg_with().model.causal_lm and not cfg_with("model.family=encoder").model.causal_lm
    with raises("model.family", "'rnn'"):
        family_spec("rnn")


def test_choices_are_checked_in_code_built_configs():
    cfg = cfg_with()
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm="batchnorm"))
    with raises("model.norm", "'batchnorm'"):
        validate(bad, N_DEVICES)



@pytest.mark.parametrize(
    "overrides, shape",
    [
        ([], full_mesh_shape(data=8, fsdp=1, tensor=1)),
        (["mesh.tensor=2"], full_mesh_shape(data=4, fsdp=1, tensor=2)),
        (["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"], full_mesh_shape(data=2, fsdp=2, tensor=2)),
        (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1"], full_mesh_shape(data=1, fsdp=1, tensor=8)),
        (["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"], full_mesh_shape(data=2, fsdp=4, tensor=1)),
        (["mesh.expert=4", "model.moe.num_experts=8"], full_mesh_shape(data=2, expert=4)),
        (["mesh.expert=2", "mesh.tensor=2", "model.moe.num_experts=4"], full_mesh_shape(data=2, expert=2, tensor=2)),
    ],
)
def test_resolved_mesh(overrides, shape):
    cfg = cfg_with("model.n_heads=8", "model.n_kv_heads=8", *overrides)
    assert validate(cfg, N_DEVICES) == shape
    assert mesh_shape(cfg.mesh, N_DEVICES) == shape
    assert list(shape) == list(mesh_axis_names())


def test_validate_does_not_modify_config():
    cfg = cfg_with("mesh.tensor=2")
    before = to_dict(cfg)
    validate(cfg, N_DEVICES)
    assert to_dict(cfg) == before and cfg.mesh.data == -1


def test_valid_variants_pass():
    for overrides in (
        ["model.position=learned", "model.head_dim=5"],  # odd head_dim is fine without RoPE
        ["model.n_kv_heads=1", "mesh.tensor=2"],  # MQA: kv heads replicated over tensor
        ["train.batch_size=16", "optim.grad_accum_steps=2"],
        ["optim.warmup_steps=10", "optim.name=lion", "optim.schedule=wsd"],
        ["mesh.rules.embed=null", "mesh.rules.act_batch=[data, fsdp]", "mesh.rules.vocab=tensor"],
        ["data.seq_len=64"],  # == max_seq_len
    ):
        validate(cfg_with(*overrides), N_DEVICES)


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    shape = validate(cfg, 8)
    assert math.prod(shape.values()) == 8


@pytest.mark.slow
def test_presets_ship_in_the_wheel(tmp_path):
    """`llmjax train` with no --config must find default.yaml when installed from a wheel (package data)."""
    import subprocess
    import sys
    import zipfile

    from llmjax.config import PRESETS_DIR

    root = Path(__file__).resolve().parents[2]
    assert DEFAULT_CONFIG.parent == PRESETS_DIR and PRESETS_DIR.parent.name == "llmjax"
    assert (root / "experiments" / "configs" / "default.yaml").resolve() == DEFAULT_CONFIG.resolve()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("llmjax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llmjax/configs/default.yaml" in names
    shipped = {Path(n).name for n in names if n.startswith("llmjax/configs/")}
    assert {p.name for p in PRESETS_DIR.glob("*.yaml")} <= shipped
