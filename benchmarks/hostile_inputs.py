"""Peak memory of llmjax refusing hostile inputs (issue 26): each case runs `llmjax ...` under `/usr/bin/time -v`
and prints its exit status, maximum resident set size and the one line it printed.

    python benchmarks/hostile_inputs.py [--only NAME ...] [--json OUT]

Needs GNU time (`apt-get install time`). Builds its inputs in a temporary directory: a tiny Hugging Face
Llama directory written by `hf.save` (vocabulary 8192 like the default config, with the committed chat
tokenizer), a workdir imported from it, hostile shard indexes, links, config.json sizes, chat templates,
JSON-lines files and YAML configs. Every case must exit 2, print one line and no traceback, and stay far
under 1 GB (the acceptance bound); the script exits 1 if one does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT_TOKENIZER = ROOT / "experiments" / "data" / "chat_tokenizer"
SFT_CONFIG = ROOT / "experiments" / "configs" / "sft_small.yaml"
BOUND_KB = 1024 * 1024  # 1 GiB
TEMPLATES = {
    "template_repeat": "{{ 'a' * 4000000000 }}",
    "template_nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "template_range_1e9": "{% for i in range(10**9) %}{% endfor %}",
    "template_include": "{% include 'other.jinja' %}",
    "template_import": "{% import 'other.jinja' as o %}",
}


def make_hf_dir(d: Path) -> None:
    """A 1-layer Llama (vocab 8192, d_model 32) with the chat tokenizer's files, as `hf.save` writes it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llmjax.config import load_config
    from llmjax.interop import hf
    from llmjax.models.transformer import Transformer

    cfg = load_config(None, ["model.vocab_size=8192", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                             "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=128", "data.seq_len=32"]).model
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    hf.save(cfg, params, d)
    for f in CHAT_TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)


def variant(src: Path, dst: Path, config: dict | None = None, index: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**data, **config}))
    if index is not None:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return dst


def cases(tmp: Path) -> dict[str, list[str]]:
    """name -> llmjax arguments, with every input built under `tmp`."""
    hf_dir = tmp / "hf"
    make_hf_dir(hf_dir)
    out: dict[str, list[str]] = {}
    secret = tmp / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copy(hf_dir / "model.safetensors", secret)
    for name, entry in (("weight_map_dotdot", "../../outside/secret.safetensors"), ("weight_map_absolute", str(secret)),
                        ("weight_map_etc_passwd", "/etc/passwd"), ("weight_map_proc_environ", "/proc/self/environ")):
        d = variant(hf_dir, tmp / "dl" / name / "model", index={"model.embed_tokens.weight": entry})
        out[name] = ["convert", "from-hf", str(d), str(tmp / "work" / name)]
    d = variant(hf_dir, tmp / "link_weights")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(secret)
    out["link_safetensors_outside"] = ["convert", "from-hf", str(d), str(tmp / "work" / "link_weights")]
    d = variant(hf_dir, tmp / "link_tokenizer")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to("/etc/passwd")
    out["link_tokenizer_etc_passwd"] = ["convert", "from-hf", str(d), str(tmp / "work" / "link_tok")]
    sizes = {"layers_1e7": {"num_hidden_layers": 10_000_000}, "hidden_1e6": {"hidden_size": 1_000_000},
             "vocab_1e12": {"vocab_size": 10**12},
             "experts_1e6": {"model_type": "mixtral", "num_local_experts": 1_000_000, "num_experts_per_tok": 2}}
    for name, change in sizes.items():
        d = variant(hf_dir, tmp / name, config=change)
        out[f"config_json_{name}"] = ["convert", "from-hf", str(d), str(tmp / "work" / name), "data.seq_len=32"]

    sft = ["train", "--check", "--workdir", str(tmp / "sft_run"), "--config", str(SFT_CONFIG), "train.progress=false"]
    for name, source in TEMPLATES.items():
        path = tmp / f"{name}.jinja"
        path.write_text(source)
        out[f"sft_check_{name}"] = [*sft, f"data.chat_template={path}"]
    nested = tmp / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    out["sft_check_jsonl_nested_100k"] = [*sft, f"data.path={nested}"]
    big = tmp / "big_int.yaml"
    big.write_text(f"seed: {'9' * 5000}\n")
    out["yaml_5000_digit_int"] = ["train", "--check", "--config", str(big), "--workdir", str(tmp / "yaml_run")]

    work = tmp / "imported"  # a workdir for the generate cases
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "convert", "from-hf", str(hf_dir), str(work),
                        "data.seq_len=32"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"import failed: {r.stderr}")
    gen = ["generate", "--workdir", str(work), "--prompt", "hello"]
    out["generate_beams_100000"] = [*gen, "--beams", "100000"]
    out["generate_prompts_200000_max_new_1e12"] = ["generate", "--workdir", str(work), "--prompt-file",
                                                   str(_prompts(tmp, 200_000)), "--max-new-tokens", str(10**12)]
    import yaml

    for name in TEMPLATES:
        w = tmp / f"chat_{name}"
        shutil.copytree(work, w)
        cfg = yaml.safe_load((w / "config.yaml").read_text())
        cfg["data"]["chat_template"] = str(tmp / f"{name}.jinja")
        (w / "config.yaml").write_text(yaml.safe_dump(cfg))
        out[f"generate_chat_{name}"] = ["generate", "--workdir", str(w), "--chat", "--prompt", "hi"]
    return out


def _prompts(tmp: Path, n: int) -> Path:
    path = tmp / "prompts.txt"
    path.write_text("hello there\n" * n)
    return path


def measure(args: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "llmjax.cli", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr)
    ours = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("\t")
            and not line.startswith("Command exited") and not line.startswith("llmjax: restored step")]
    return {"exit": r.returncode, "peak_rss_kb": int(rss.group(1)) if rss else -1, "wall": wall.group(1) if wall
            else "?", "lines": ours, "traceback": "Traceback" in r.stderr}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs GNU time: apt-get install time")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results, bad = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            res = measure(argv)
            results[name] = res
            ok = res["exit"] == 2 and len(res["lines"]) == 1 and not res["traceback"] and \
                0 < res["peak_rss_kb"] < BOUND_KB
            bad += [] if ok else [name]
            line = res["lines"][0] if res["lines"] else ""
            line = line.replace(tmp, "$TMP")
            res["lines"] = [x.replace(tmp, "$TMP") for x in res["lines"]]
            print(f"{name:42s} exit {res['exit']}  peak {res['peak_rss_kb'] / 1024:7.1f} MiB  {res['wall']:>8s}  "
                  f"{'ok ' if ok else 'BAD'}  {line[:400]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if bad:
        print(f"not refused as required: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
