"""The documentation: its tested shell blocks run, the README stays short, the MkDocs site builds strictly.

Marking a shell block for this test (README.md and docs/*.md). Put an HTML comment on the line right
before the opening fence of a ```bash (or sh, shell) block; it does not show on GitHub or on the site:

    <!-- test -->              the block runs on its own, in a fresh work directory
    <!-- test: NAME -->        the blocks of one page with the same NAME run in document order in one
                               bash session (variables and files carry over), as one test: a tutorial
    <!-- test: slow -->        add `slow` (alone or after NAME) for blocks that take over ~20 s together;
    <!-- test: NAME slow -->   the test is then marked `slow` (left out by `pytest -m "not slow"`)

How a block runs: `bash -e -o pipefail` in a temporary directory (the cwd) that holds a symlink
`experiments` to the repository's `experiments/`, so the documented paths work as written; blocks must
not write under `experiments/` (write to a directory of their own, e.g. `--out refit`). `llmjax` on
PATH is a shim for `python3 -m llmjax.cli` with this checkout first on PYTHONPATH, so the blocks test
this checkout whatever else is installed. The environment is the test session's (conftest.py: 8
virtual CPU devices, the compilation and data caches). The test asserts exit status 0.

Mark only blocks that run in well under a minute on a CPU and need no network, accelerator, cluster
or secrets: config commands, `llmjax train --check`, tiny runs, `--dry-run`s, fits and plots of
committed results.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

_MARK = re.compile(r"^<!--\s*test(?::\s*(?P<words>[\w\- ]*))?\s*-->\s*$")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
_SHELLS = ("bash", "sh", "shell")


@dataclass
class DocTest:
    """One test: a marked block, or the blocks of one page that share a group name."""

    page: str  # path relative to the repository
    name: str
    slow: bool = False
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (line of the fence, code)


def _blocks(path: Path) -> list[tuple[int, list[str], str]]:
    """(line number of the fence, the marker's words, code) of every marked shell block in `path`."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _MARK.match(line.strip())
        if m is None:
            continue
        fence = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None or fence.group("lang") not in _SHELLS:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a test marker must be followed by a ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 2}: unclosed code block")
        found.append((i + 2, (m.group("words") or "").split(), "\n".join(lines[i + 2 : end])))
    return found


def collect() -> list[DocTest]:
    """Every test in README.md and docs/*.md, in document order."""
    tests: list[DocTest] = []
    for path in DOC_FILES:
        page = str(path.relative_to(ROOT))
        groups: dict[str, DocTest] = {}
        for line, words, code in _blocks(path):
            slow = "slow" in words
            names = [w for w in words if w != "slow"]
            if names:
                t = groups.get(names[0])
                if t is None:
                    t = groups[names[0]] = DocTest(page, f"{page}::{names[0]}")
                    tests.append(t)
            else:
                t = DocTest(page, f"{page}:{line}")
                tests.append(t)
            t.slow = t.slow or slow
            t.blocks.append((line, code))
    return tests


def _params() -> list:
    return [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t.slow else []) for t in collect()]


def _environment(tmp: Path) -> dict[str, str]:
    """PATH with an `llmjax` shim for this checkout first; PYTHONPATH with the checkout first."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llmjax"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmjax.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


@pytest.mark.parametrize("doc", _params())
def test_marked_shell_blocks_run(doc: DocTest, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "experiments").symlink_to(ROOT / "experiments", target_is_directory=True)
    script = "\n".join(f"# --- {doc.page}:{line}\n{code}" for line, code in doc.blocks)
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=_environment(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (f"{doc.name} exited with status {r.returncode}\n--- script\n{script}\n"
                               f"--- stdout (end)\n{r.stdout[-3000:]}\n--- stderr (end)\n{r.stderr[-5000:]}")


def test_markers_parse_and_the_quickstart_has_tested_blocks():
    """The quickstart has tested blocks, and a marker never sits on anything but a shell fence."""
    tests = collect()
    assert any(t.page == "docs/quickstart.md" for t in tests)
    assert all(t.blocks for t in tests)


def test_readme_is_short_and_links_the_map_and_the_step():
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES} (details go to docs/)"
    assert "(docs/layout.md)" in text
    assert "(docs/how-a-step-flows.md)" in text
    for cmd in ('pip install -e . && llmjax train', 'python3 -m pip install -e ".[test]" && python3 -m pytest -n 2 -q',
                'python3 -m pytest -m "not slow" -n 2 -q'):
        assert cmd in text, cmd


def test_readme_links_point_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_mkdocs_build_is_strict_clean(tmp_path: Path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (tmp_path / "site" / "how-a-step-flows" / "index.html").is_file()


_MODULE_PATH = re.compile(r"(?<![\w/.])(?:llmjax/)((?:[a-z_]+/)*[a-z_]+\.py)")
_DOTTED = re.compile(r"(?<![\w.])llmjax((?:\.[a-z_]+)+)")


def _named_modules(text: str) -> set[str]:
    """Every `llmjax/...py` path and `llmjax.a.b` dotted name in `text` (dotted names may end in an attribute)."""
    return {f"llmjax/{m}" for m in _MODULE_PATH.findall(text)} | {"llmjax" + m for m in _DOTTED.findall(text)}


# The modules that docs/extending.md's worked examples create (they are examples, not part of the package).
EXAMPLE_MODULES = {"models/families/fim", "kernels/repeat_kv", "train/objectives_smooth"}


def _exists(name: str) -> bool:
    if name == "llmjax.log":  # the run's log file, not a module
        return True
    stem = name.removeprefix("llmjax/").removeprefix("llmjax.").removesuffix(".py").replace(".", "/")
    if any(stem == m or stem.startswith(m + "/") for m in EXAMPLE_MODULES):
        return True
    if name.endswith(".py"):
        return (ROOT / name).is_file()
    parts = name.split(".")
    for i in range(len(parts), 1, -1):  # the longest prefix that is a module or package; the rest an attribute
        base = ROOT.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return i >= len(parts) - 1  # at most one attribute after the module
    return False


@pytest.mark.parametrize("path", DOC_FILES + sorted((ROOT / "experiments" / "results").glob("*/README.md")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_modules_that_exist(path: Path):
    """A module moved or removed must not leave the docs pointing at it."""
    missing = sorted(n for n in _named_modules(path.read_text()) if not _exists(n))
    assert not missing, f"{path.relative_to(ROOT)} names modules that do not exist: {missing}"


def test_the_package_map_lists_every_module_and_no_other():
    """docs/layout.md names each module of llmjax/ (by its path within its folder's table) and nothing that is
    gone: a module added, moved or removed updates the map."""
    text = (ROOT / "docs" / "layout.md").read_text()
    named = {n.removeprefix("llmjax/") for n in re.findall(r"`([\w/]+\.py)`", text)}
    modules = [p.relative_to(ROOT / "llmjax").as_posix() for p in (ROOT / "llmjax").rglob("*.py")]
    gone = sorted(n for n in named if not any(m == n or m.endswith("/" + n) for m in modules))
    assert not gone, f"docs/layout.md names modules that do not exist: {gone}"
    unlisted = sorted(m for m in modules if not m.endswith("__init__.py")
                      and not any(m == n or m.endswith("/" + n) for n in named))
    assert not unlisted, f"docs/layout.md does not list: {unlisted}"
