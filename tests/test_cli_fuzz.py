"""A corpus of bad inputs for every `llmjax` verb (tests/cli_cases.py): each exits 2 (usage) or 3 (storage), or 0
where valid, with one `llmjax: error:` line naming what is wrong and no traceback, and writes nothing where it
was refused. In-process `llmjax.cli.main` calls (no interpreter start per case)."""

from __future__ import annotations

import time

import pytest
from cli_cases import cases, inputs

from llmjax import cli

pytestmark = pytest.mark.slow  # ~350 in-process commands


def _run(capsys, argv: tuple[str, ...]) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.err


def test_every_verb_refuses_bad_input_in_one_line(capsys, tmp_path):
    root = tmp_path / "fuzz"
    inputs(root)
    corpus = cases(root)
    verbs = {c.verb for c in corpus}
    assert {v for verb in cli.VERBS for v in verb.names} <= verbs, "a verb without cases"
    assert len(corpus) >= 300, len(corpus)
    failures, t0 = [], time.time()
    for c in corpus:
        code, err = _run(capsys, c.argv)
        problems = []
        if code not in c.codes:
            problems.append(f"exit {code}, expected {sorted(c.codes)}")
        if "Traceback" in err:
            problems.append("a traceback")
        errors = sum(line.startswith("llmjax: error:") for line in err.splitlines())
        if code != 0 and errors != 1 and "usage:" not in err:
            problems.append(f"{errors} error lines")
        if code == 0 and errors:
            problems.append("an error line with exit 0")
        if c.needle is not None and code != 0 and c.needle not in err:
            problems.append(f"{c.needle!r} not named")
        if problems:
            failures.append(f"{c.id}: {'; '.join(problems)}\n    {err.strip()[-400:]}")
    written = sorted(str(p) for p in root.glob("never*"))
    assert not failures, f"{len(failures)} of {len(corpus)} cases:\n" + "\n".join(failures)
    assert not written, written
    print(f"{len(corpus)} cases in {time.time() - t0:.0f}s")
