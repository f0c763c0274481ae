"""The markers the quick run depends on (pyproject's [tool.pytest.ini_options] markers): every test that needs
torch / transformers / peft carries `hf`, and every test that starts processes through launch/local.sh or
jax.distributed carries `multiprocess` (conftest makes both slow, so `-m "not slow"` leaves them out).

Read from the sources with `ast`, without importing them: a test needs a marker when its own body, a function
of its module (or of tests/helpers.py, data_helpers.py, test_cli.py) that it calls, or a fixture it requests
does the thing, transitively; a module that imports torch or transformers at its top needs `hf` on every test,
which its `pytestmark` gives."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HF_MODULES = {"torch", "transformers", "peft"}
SHARED = ("helpers", "data_helpers", "test_cli")  # tests/*.py that test modules import by name


@dataclass
class Module:
    path: Path
    tree: ast.Module
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    fixtures: set[str] = field(default_factory=set)
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (shared module, name)
    scripts: dict[str, str] = field(default_factory=dict)  # module constants naming a launch/ script -> script
    marks: set[str] = field(default_factory=set)  # the module's pytestmark
    hf_at_top: bool = False


def _mark_names(node: ast.AST) -> set[str]:
    """{'slow', ...} of `pytest.mark.slow`, `[pytest.mark.hf, pytest.mark.slow]` or a decorator list entry."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
            names.add(sub.attr)
    return names - {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings"}


def _imports_hf(node: ast.AST) -> bool:
    """An `import torch`, `from transformers import ...` or `pytest.importorskip("peft")` under `node`."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] in HF_MODULES for a in sub.names):
            return True
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in HF_MODULES:
            return True
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "importorskip"
                and sub.args and isinstance(sub.args[0], ast.Constant) and sub.args[0].value in HF_MODULES):
            return True
    return False


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(d) for d in fn.decorator_list)


def parse(path: Path) -> Module:
    tree = ast.parse(path.read_text(), str(path))
    mod = Module(path, tree)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            mod.functions[node.name] = node
            if _is_fixture(node):
                mod.fixtures.add(node.name)
        elif isinstance(node, ast.ImportFrom) and node.module in SHARED:
            for a in node.names:
                mod.imported[a.asname or a.name] = (node.module, a.name)
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            text = ast.unparse(node.value)
            if "pytestmark" in targets:
                mod.marks |= _mark_names(node.value)
            elif "launch" in text and any(s in text for s in (".sh", ".sbatch")):
                for t in targets:
                    mod.scripts[t] = "local.sh" if re.search(r"['/]local\.sh'", text) else text
            if _imports_hf(node):  # torch = pytest.importorskip("torch")
                mod.hf_at_top = True
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and _imports_hf(node):
            mod.hf_at_top = True
    return mod


def _is_local_sh(node: ast.AST, mod: Module) -> bool:
    if isinstance(node, ast.Name):
        return mod.scripts.get(node.id) == "local.sh"
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and Path(node.value).name == "local.sh"


def _own_needs(fn: ast.FunctionDef, mod: Module) -> set[str]:
    """The markers that `fn`'s own body calls for."""
    needs = set()
    if _imports_hf(fn):
        needs.add("hf")
    for sub in ast.walk(fn):
        # A command line that starts with local.sh: [LOCAL, "2", "4", "--", ...] (not a list of scripts to lint).
        if isinstance(sub, ast.List) and sub.elts and _is_local_sh(sub.elts[0], mod):
            others = sub.elts[1:]
            if not others or not all(isinstance(e, ast.Name) and e.id in mod.scripts for e in others):
                needs.add("multiprocess")
        if isinstance(sub, ast.Attribute) and ast.unparse(sub).startswith("jax.distributed"):
            needs.add("multiprocess")
    return needs


class Checker:
    def __init__(self, root: Path):
        self.root = root
        self.shared = {name: parse(root / f"{name}.py") for name in SHARED if (root / f"{name}.py").is_file()}
        conftests = [parse(p) for p in sorted(root.rglob("conftest.py"))]
        self.conftest_fixtures = {(c.path.parent, name): c for c in conftests for name in c.fixtures}
        self._memo: dict[tuple[Path, str], set[str]] = {}

    def _fixture(self, name: str, mod: Module) -> tuple[Module, ast.FunctionDef] | None:
        if name in mod.fixtures:
            return mod, mod.functions[name]
        for directory in (mod.path.parent, *mod.path.parent.parents):
            conftest = self.conftest_fixtures.get((directory, name))
            if conftest is not None:
                return conftest, conftest.functions[name]
            if directory == self.root:
                break
        return None

    def needs(self, fn: ast.FunctionDef, mod: Module, seen: frozenset = frozenset()) -> set[str]:
        """The markers that `fn` calls for, through the functions it calls and the fixtures it requests."""
        key = (mod.path, fn.name)
        if key in self._memo:
            return self._memo[key]
        if key in seen:
            return set()
        seen = seen | {key}
        needs = _own_needs(fn, mod)
        if mod.hf_at_top:
            needs.add("hf")
        requested = {a.arg for a in fn.args.args}
        for sub in ast.walk(fn):
            if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "getfixturevalue"
                    and sub.args and isinstance(sub.args[0], ast.Constant)):
                requested.add(sub.args[0].value)
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "getfixturevalue":
                # request.getfixturevalue(request.param): any fixture named in the fixture's params
                decorator = " ".join(ast.unparse(d) for d in fn.decorator_list)
                requested |= {name for name in mod.fixtures if repr(name) in decorator or f'"{name}"' in decorator}
        for name in requested:
            found = self._fixture(name, mod)
            if found is not None and found[1] is not fn:
                needs |= self.needs(found[1], found[0], seen)
        called = {sub.id for sub in ast.walk(fn) if isinstance(sub, ast.Name)}
        for name in called:
            if name in mod.functions and name not in mod.fixtures and mod.functions[name] is not fn:
                needs |= self.needs(mod.functions[name], mod, seen)
            elif name in mod.imported and mod.imported[name][0] in self.shared:
                shared = self.shared[mod.imported[name][0]]
                target = shared.functions.get(mod.imported[name][1])
                if target is not None:
                    needs |= self.needs(target, shared, seen)
        self._memo[key] = needs
        return needs

    def problems(self) -> list[str]:
        out = []
        for path in sorted(self.root.rglob("test_*.py")):
            mod = parse(path)
            for name, fn in mod.functions.items():
                if not name.startswith("test_") or name in mod.fixtures:
                    continue
                has = mod.marks | set().union(*(_mark_names(d) for d in fn.decorator_list))
                for missing in sorted(self.needs(fn, mod) - has):
                    out.append(f"{path.relative_to(self.root)}::{name} is not marked {missing}")
        return out


def test_hf_and_multiprocess_tests_carry_their_markers():
    problems = Checker(TESTS).problems()
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_is_not_marked(tmp_path):
    """The checker itself: unmarked tests of each kind are found, marked ones and look-alikes are not."""
    (tmp_path / "helpers.py").write_text("def shared_torch():\n    import torch\n    return torch\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef hf_model():\n    from transformers import AutoModel\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test_top.py").write_text(
        'import pytest\ntorch = pytest.importorskip("torch")\n\ndef test_a():\n    pass\n')
    (tmp_path / "sub" / "test_top_marked.py").write_text(
        'import pytest\ntorch = pytest.importorskip("torch")\npytestmark = [pytest.mark.hf, pytest.mark.slow]\n\n'
        "def test_a():\n    pass\n")
    (tmp_path / "sub" / "test_mixed.py").write_text('''
import subprocess
import pytest
from helpers import shared_torch

LOCAL = "launch/local.sh"
TPU = "launch/tpu_pod.sh"


def two(cmd):
    return subprocess.run([LOCAL, "2", "4", "--", *cmd])


@pytest.fixture(scope="module")
def run():
    return two(["true"])


def test_via_fixture(run):
    pass


@pytest.mark.multiprocess
def test_marked(run):
    pass


def test_distributed():
    import jax
    jax.distributed.initialize()


def test_via_conftest_fixture(hf_model):
    pass


def test_via_helper():
    shared_torch()


def test_in_body():
    transformers = pytest.importorskip("transformers")


def test_lints_the_scripts():
    subprocess.run(["shellcheck", *[LOCAL, TPU]])


def test_plain():
    assert True
''')
    assert sorted(Checker(tmp_path).problems()) == [
        "sub/test_mixed.py::test_distributed is not marked multiprocess",
        "sub/test_mixed.py::test_in_body is not marked hf",
        "sub/test_mixed.py::test_via_conftest_fixture is not marked hf",
        "sub/test_mixed.py::test_via_fixture is not marked multiprocess",
        "sub/test_mixed.py::test_via_helper is not marked hf",
        "sub/test_top.py::test_a is not marked hf",
    ]
