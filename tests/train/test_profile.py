"""`train.profile_steps`: a jax.profiler trace of the chosen steps lands in the workdir."""

from __future__ import annotations

import pytest
from helpers import tiny_train_overrides

from llmjax.config import load_config
from llmjax.train.loop import train


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path, capsys, corpus):
    cfg = load_config(None, [*tiny_train_overrides(corpus), "train.steps=5", "train.profile_steps=[2,4]",
                             "eval.every_steps=0", "sample.max_new_tokens=0", "checkpoint.every_steps=0"])
    assert train(cfg, tmp_path / "run") == 0
    runs = list((tmp_path / "run" / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1  # one trace, of steps 2 and 3
    names = [f.name for f in runs[0].iterdir()]
    assert any(n.endswith(".xplane.pb") for n in names) and "perfetto_trace.json.gz" in names
    assert "profile of steps 2..3 written to" in capsys.readouterr().err
