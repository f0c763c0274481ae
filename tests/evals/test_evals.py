"""Downstream evaluation: the log-likelihood scorer against the family's evaluation sums (what
`llmjax eval` computes) on one device and a {data=4, tensor=2} mesh, rolling windows, JSONL
multiple-choice tasks in the training loop, and the lm-eval adapter (`llmjax harness`) against
`llmjax eval`'s computation."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TASK, read_records, run_llmjax, tiny_config, tiny_train_overrides

from llmjax.config import ConfigError, MeshConfig
from llmjax.evals.loglik import LoglikScorer, Request, bucket_length, rolling_requests
from llmjax.evals.tasks import ChoiceTask, Example, evaluate_task, load_task, load_tasks
from llmjax.evals.text import TextModel
from llmjax.models.families import batch_from_dict, build_family
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules, tree_shardings

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the scorer


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config()
    family = build_family(cfg.model)
    model = family.module()
    boxed = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 6.0 if p.ndim > 1 else p, nn.meta.unbox(boxed))  # peaked logits
    return cfg, family, model, boxed, params


@functools.cache
def _reference_fn(family, model):
    def fn(p, arrays):
        batch = batch_from_dict(family.batch_type, arrays)
        return family.eval_sums(model, p, batch)["nll_sum"], family.logits(model, p, batch)[0]

    return jax.jit(fn)


def reference(family, model, params, r: Request, max_len: int) -> tuple[float, bool]:
    """One request alone through the family's `eval_sums` (the computation of `llmjax eval`)."""
    whole = (list(r.context) + list(r.continuation))[-(max_len + 1):]
    n, k = len(whole) - 1, min(len(r.continuation), len(whole) - 1)
    weights = np.zeros((1, n), np.float32)
    weights[0, n - k:] = 1
    batch = {"inputs": jnp.asarray([whole[:-1]]), "targets": jnp.asarray([whole[1:]]),
             "segment_ids": jnp.ones((1, n), jnp.int32), "positions": jnp.arange(n)[None], "weights": weights}
    nll, logits = _reference_fn(family, model)(params, batch)
    greedy = bool(np.all((np.argmax(logits[0], -1) == np.asarray(whole[1:]))[n - k:]))
    return -float(nll), greedy


def requests(vocab: int, max_len: int) -> list[Request]:
    rng = np.random.default_rng(0)
    out = []
    for ctx_len, cont_len in [(1, 1), (3, 5), (10, 2), (30, 30), (64, 4), (90, 7), (5, 70), (2, 0), (17, 1)]:
        out.append(Request(tuple(rng.integers(4, vocab, ctx_len).tolist()), tuple(rng.integers(4, vocab, cont_len)
                                                                                 .tolist())))
    return out


@pytest.mark.parametrize("layout", ["one device", "data=4 tensor=2"])
def test_scorer_equals_the_eval_sums(model_and_params, layout):
    cfg, family, model, boxed, params = model_and_params
    mesh_cfg = MeshConfig(data=1) if layout == "one device" else MeshConfig(data=4, tensor=2)
    devices = jax.devices()[:1] if layout == "one device" else None
    mesh = build_mesh(mesh_cfg, devices)
    rules = make_rules({}, dict(mesh.shape), cfg.model.n_kv_heads)
    sharded = jax.device_put(params, tree_shardings(nn.get_partition_spec(boxed), mesh, rules))
    L = cfg.model.max_seq_len
    reqs = requests(cfg.model.vocab_size, L)
    # a request whose continuation is the model's own greedy choice
    ctx = [5, 9, 13]
    logits = model.apply({"params": params}, jnp.asarray([ctx]))
    reqs.append(Request(tuple(ctx), (int(np.argmax(logits[0, -1])),)))
    scorer = LoglikScorer(family, model, sharded, mesh, rules, L, batch_size=3)
    assert scorer.batch_size == (3 if layout == "one device" else 4)  # rounded up to the data shards
    got = scorer.score(reqs)
    for r, (logprob, greedy) in zip(reqs, got, strict=True):
        if not r.continuation:
            assert (logprob, greedy) == (0.0, True)
            continue
        want, want_greedy = reference(family, model, params, r, L)
        np.testing.assert_allclose(logprob, want, rtol=1e-5, atol=1e-4)
        assert greedy == want_greedy
    assert got[-1][1] is True and any(not g for _, g in got[:-1])


def test_bucket_lengths():
    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket_length(100, 48) == 48


def test_rolling_windows_predict_every_token_once_with_full_context():
    ids = list(range(10, 20))
    windows = rolling_requests(ids, prefix_id=3, max_len=4)
    assert [w.continuation for w in windows] == [(10, 11, 12, 13), (14, 15, 16, 17), (18, 19)]
    assert [w.context for w in windows] == [(3,), (13,), (15, 16, 17)]  # the last window sees 4 inputs
    for w in windows:
        assert len(w.context) + len(w.continuation) - 1 <= 4
    assert rolling_requests([], 3, 4) == []


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    ids = list(range(100, 137))
    for max_len in (4, 8, 37, 64):
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(ids, 3, max_len, 1)]
        assert [(tuple(c), tuple(t)) for c, t in theirs] == [(w.context, w.continuation)
                                                            for w in rolling_requests(ids, 3, max_len)]


class CharTokenizer:
    """One id per character (ids 4 + ord % 120); EOS = 3."""

    eos_id = 3

    def encode(self, texts):
        return [[4 + ord(c) % 120 for c in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids if i >= 4)


def test_text_model_pairs_and_rolling(model_and_params):
    cfg, family, model, _, params = model_and_params
    mesh = build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = make_rules({}, dict(mesh.shape))
    L = cfg.model.max_seq_len
    text = TextModel(LoglikScorer(family, model, params, mesh, rules, L), CharTokenizer())
    tok = CharTokenizer()
    (r,) = text.encode_pairs([("hello ", "world")])
    assert r == Request(tuple(tok.encode(["hello"])[0]), tuple(tok.encode([" world"])[0]))  # space moves over
    (r,) = text.encode_pairs([("", "abc")])
    assert r.context == (3,)
    long_text = "def f(x):\n    return x * 2\n" * 6  # 162 characters: three windows of 64
    (rolling,) = text.loglikelihood_rolling([long_text])
    ids = tok.encode([long_text])[0]
    want = sum(reference(family, model, params, w, L)[0] for w in rolling_requests(ids, 3, L))
    np.testing.assert_allclose(rolling, want, rtol=1e-5)
    short = "x = 1\n"
    ids = tok.encode([short])[0]
    whole = Request((3,), tuple(ids))
    np.testing.assert_allclose(text.loglikelihood_rolling([short])[0], reference(family, model, params, whole, L)[0],
                               rtol=1e-5)


def test_text_model_starts_contexts_with_the_document_start(model_and_params):
    """A tokenizer whose documents start with BOS (Llama's, Mistral's): every scored context and every rolling
    text starts with it, as the training documents did; an empty context is BOS alone."""
    from llmjax.data.tokenizers.tokenizer import document_start

    cfg, family, model, _, params = model_and_params
    mesh = build_mesh(MeshConfig(data=1), jax.devices()[:1])
    L = cfg.model.max_seq_len
    tok = CharTokenizer()
    tok.bos_id, tok.add_bos = 2, True
    assert document_start(tok, None) == [2] and document_start(tok, False) == []
    text = TextModel(LoglikScorer(family, model, params, mesh, make_rules({}, dict(mesh.shape)), L), tok,
                     start=document_start(tok, None))
    (r,) = text.encode_pairs([("hello ", "world")])
    assert r == Request((2, *tok.encode(["hello"])[0]), tuple(tok.encode([" world"])[0]))
    (r,) = text.encode_pairs([("", "abc")])
    assert r.context == (2,)
    ids = tok.encode(["x = 1\n"])[0]
    np.testing.assert_allclose(text.loglikelihood_rolling(["x = 1\n"])[0],
                               reference(family, model, params, Request((2,), tuple(ids)), L)[0], rtol=1e-5)


# ----------------------------------------------------------------------------- JSONL tasks


def test_committed_task_loads():
    task = load_task(TASK)
    assert task.name == "python_mc" and len(task.examples) == 60
    assert sorted({ex.label for ex in task.examples}) == [0, 1, 2, 3]
    assert all(len(ex.choices) == 4 and len(set(ex.choices)) == 4 for ex in task.examples)
    assert len(load_task(TASK, limit=5).examples) == 5


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "holds no example"),
    (b'{"context": "a", "choices": ["b", "c"], "label": 0}\nnot json\n', "bad.jsonl:2: invalid JSON"),
    (b'{"context": "a", "choices": ["b", "c"], "label": 2}\n', "label must be an index"),
    (b'{"context": "a", "choices": ["b"], "label": 0}\n', "at least 2 non-empty strings"),
    (b'{"context": 1, "choices": ["b", "c"], "label": 0}\n', "context must be a string"),
    (b'{"choices": ["b", "c"]}\n', "missing context, label"),
    (b'[1, 2]\n', "expected a JSON object"),
    (b'\xff\xfe{"context"\n', "not UTF-8"),
])
def test_task_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_task(path)


def test_duplicate_task_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "python_mc.jsonl").write_bytes(TASK.read_bytes())
    with pytest.raises(ConfigError, match="two tasks are named 'python_mc'"):
        load_tasks([str(TASK), str(tmp_path / "a" / "python_mc.jsonl")])


class FixedScores:
    """A TextModel stand-in: log-likelihood = -len(continuation) (or table values)."""

    def __init__(self, table):
        self.table = table

    def loglikelihood(self, pairs):
        return [(self.table[c], False) for _, c in pairs]


def test_accuracy_and_length_normalised_accuracy():
    task = ChoiceTask("t", "t.jsonl", (Example("q", ("a", "bbbb"), 1), Example("q", ("cc", "d"), 0)))
    # example 1: bbbb has the lower total but the higher per-character score; example 2: cc wins both ways
    got = evaluate_task(FixedScores({"a": -1.0, "bbbb": -2.0, "cc": -0.5, "d": -3.0}), task)
    assert got == {"acc": 0.5, "acc_norm": 1.0, "logprob": -1.25, "n": 2.0}


# ----------------------------------------------------------------------------- in the training loop


@pytest.mark.slow
def test_tasks_are_scored_at_every_evaluation(eval_run):
    workdir, _, r = eval_run
    records = read_records(workdir, "tasks")
    assert sorted(records) == [0, 5, 10]
    for rec in records.values():
        assert rec["python_mc/n"] == 12 and 0 <= rec["python_mc/acc"] <= 1 and 0 <= rec["python_mc/acc_norm"] <= 1
    assert "step 10: python_mc acc" in r.stderr


@pytest.mark.slow
def test_bad_task_file_exits_2_before_compiling(eval_run, tmp_path):
    _, corpus, _ = eval_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    for value, message in ((bad, "bad.jsonl:1: choices must be"), (tmp_path / "nope.jsonl", "not found")):
        r = run_llmjax("train", "--workdir", tmp_path / "w", *tiny_train_overrides(corpus), f"eval.tasks=[{value}]")
        assert r.returncode == 2 and message in r.stderr and "compiled" not in r.stderr and "Traceback" not in r.stderr
    r = run_llmjax("train", "--workdir", tmp_path / "w", *tiny_train_overrides(corpus), f"eval.tasks=[{TASK}]",
               "eval.every_steps=0")
    assert r.returncode == 2 and "eval.every_steps > 0" in r.stderr
    r = run_llmjax("train", "--workdir", tmp_path / "w", *tiny_train_overrides(corpus), f"eval.tasks=[{TASK}]",
                   "model.family=encoder")
    assert r.returncode == 2 and "eval.tasks: model.family=encoder is not a next-token model" in r.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").glob("checkpoints/*"))


# ----------------------------------------------------------------------------- the lm-eval adapter


@pytest.fixture(scope="module")
def harness_lm(eval_run):
    pytest.importorskip("lm_eval")
    from llmjax.evals.harness import lm_class, text_model

    workdir, _, _ = eval_run
    text, loaded = text_model(workdir, batch_size=4)
    return lm_class()(text), text, loaded


def instances(kind: str, args_list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def eval_nll(loaded, ids_in: list[int], ids_target: list[int], scored: int) -> float:
    """`llmjax eval`'s computation (`train.evaluation.evaluate`) on one row: NLL of the last `scored` targets."""
    from llmjax.train.evaluation import evaluate

    n = len(ids_in)
    weights = np.zeros((1, n), np.float32)
    weights[0, n - scored:] = 1
    batch = {"inputs": np.asarray([ids_in], np.int32), "targets": np.asarray([ids_target], np.int32),
             "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None],
             "weights": weights}
    sums = evaluate(loaded.family, loaded.eval_step(loaded.params), [batch]).sums
    nll, weight = sums["nll_sum"], sums["weight_sum"]
    assert weight == scored
    return nll


@pytest.mark.slow
def test_harness_loglikelihoods_equal_llmjax_eval(harness_lm):
    lm, text, loaded = harness_lm
    tok, eos = text.tokenizer, text.eos_id
    pairs = [("def main(", "argv):"), ("import os\n", "import sys\n"), ("", "class A:"), ("x = ", "1")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    assert len(got) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        if context:  # the context's own tokens, then what follows them in the pair's tokens
            ctx = tok.encode([context.rstrip()])[0]  # trailing whitespace goes with the continuation
            seq = ctx + tok.encode([context + continuation])[0][len(ctx):]
        else:
            ctx, seq = [eos], [eos] + tok.encode([continuation])[0]
        k = len(seq) - len(ctx)
        np.testing.assert_allclose(logprob, -eval_nll(loaded, seq[:-1], seq[1:], k), rtol=1e-5)
        assert isinstance(greedy, bool)
    docs = ["def fibonacci(n):\n    return n\n", "import os\nprint(os.getcwd())\n"]
    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, value in zip(docs, rolling, strict=True):
        ids = [eos] + tok.encode([doc])[0]
        assert len(ids) <= loaded.cfg.model.max_seq_len + 1
        np.testing.assert_allclose(value, -eval_nll(loaded, ids[:-1], ids[1:], len(ids) - 1), rtol=1e-5)


@pytest.mark.slow
def test_harness_generate_until_matches_the_engine(harness_lm):
    from llmjax.infer.sampling import SamplingParams

    lm, text, loaded = harness_lm
    reqs = [("def main(", {"until": ["\n"], "max_gen_toks": 12}), ("import ", {"max_gen_toks": 6}),
            ("x = ", {"until": "\n", "do_sample": False, "max_gen_toks": 8})]
    got = lm.generate_until(instances("generate_until", reqs))
    assert all(isinstance(g, str) and "\n" not in g for g in (got[0], got[2]))
    engine, tok = loaded.engine(), text.tokenizer
    for (context, kwargs), out in zip(reqs, got, strict=True):
        until = kwargs.get("until", [])
        sp = SamplingParams(max_new_tokens=kwargs["max_gen_toks"], stop=(until,) if isinstance(until, str)
                            else tuple(until))
        (want,) = engine.generate([tok.encode([context])[0]], sp, tok.eos_id, tok)
        assert out == want.text


@pytest.mark.slow
def test_harness_cli_matches_the_in_loop_task(eval_run, tmp_path):
    pytest.importorskip("lm_eval")
    workdir, _, _ = eval_run
    out = tmp_path / "results.json"
    r = run_llmjax("harness", "--workdir", workdir, "--tasks", "python_mc", "--include-path",
               ROOT / "experiments" / "harness", "--limit", 12, "--output", out,
               env={"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["step"] == 10 and "python_mc" in r.stdout
    theirs = result["results"]["python_mc"]
    ours = read_records(workdir, "tasks")[10]
    assert theirs["acc,none"] == ours["python_mc/acc"] and theirs["acc_norm,none"] == ours["python_mc/acc_norm"]


@pytest.mark.slow
def test_harness_usage_errors(eval_run, tmp_path, monkeypatch):
    workdir, _, _ = eval_run
    code = ("import sys; sys.modules['lm_eval'] = None; from llmjax.cli import main; "
            f"sys.exit(main(['harness', '--workdir', {str(workdir)!r}, '--tasks', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'llmjax[eval]'" in r.stderr and "Traceback" not in r.stderr
    pytest.importorskip("lm_eval")
    for args, message in ((["--tasks", ","], "at least one task"), (["--tasks", "x", "--limit", "0"], "--limit"),
                          (["--tasks", "x", "--include-path", tmp_path / "none"], "is not a directory")):
        r = run_llmjax("harness", "--workdir", workdir, *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr

    from llmjax.evals import harness

    class Manager:  # the task index, without reading lm-eval's ~15k built-in task files
        def __init__(self, include_path=None, include_defaults=True):
            self.names = ["python_mc"] + (["hellaswag"] if include_defaults else [])

        def match_tasks(self, names):
            return [n for n in names if n in self.names]

    monkeypatch.setattr("lm_eval.tasks.TaskManager", Manager)
    assert harness.task_manager(["python_mc"], str(ROOT)).names == ["python_mc"]  # local tasks only: fast path
    assert harness.task_manager(["hellaswag"], str(ROOT)).names == ["python_mc", "hellaswag"]
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        harness.task_manager(["python_mc", "nope"], None)
