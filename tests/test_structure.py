"""Structure that keeps the code right, read from the source (ast, nothing imported): no import cycles, no
module reaching into another's private helpers, and each shared definition in one place."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("freud_pipeline", "dash_app")
SCANNED = (*PACKAGES, "benchmarks")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the scanned directories."""
    found = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"), filename=str(modules()[name]))


def _type_checking_nodes(module: ast.Module) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (never run, so no import cycle)."""
    skipped = set()
    for node in ast.walk(module):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports(name: str) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import in the module, at top level or inside functions
    (a lazy import still closes a cycle when its function runs)."""
    module, out = tree(name), []
    skipped = _type_checking_nodes(module)
    package = name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(module):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out += [(node.lineno, target, alias.name) for alias in node.names]
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges module -> module it imports (and the packages that import runs first), within PACKAGES."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known if m.startswith(PACKAGES)}
    for name in graph:
        for _, target, imported in imports(name):
            if not target or not target.startswith(PACKAGES):
                continue
            full = f"{target}.{imported}" if imported and f"{target}.{imported}" in known else target
            parts = full.split(".")
            for depth in range(1, len(parts) + 1):
                dep = ".".join(parts[:depth])
                if dep in known and dep != name and not name.startswith(dep + "."):
                    graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_library_or_the_app():
    graph = import_graph()
    assert {"dash_app.data", "dash_app.figures", "dash_app.pages.edit", "freud_pipeline.features.query"} <= set(graph)
    assert cycles(graph) == []


def private_imports() -> list[str]:
    """`from a.b import _helper` (or `import a._b`, `b._helper`) of a module of ours by a module outside it. A
    package-private module (`pkg/_common.py`) may be imported by the modules of its own package."""
    known, problems = modules(), []
    for name, path in known.items():
        where = f"{path.relative_to(ROOT)}"
        aliases: dict[str, str] = {}
        for line, target, imported in imports(name):
            if not target or not target.startswith(PACKAGES):
                continue
            dotted = f"{target}.{imported}" if imported else target
            parts = dotted.split(".")
            for i, part in enumerate(parts):
                if _private(part) and not name.startswith(".".join(parts[:i]) + "."):
                    problems.append(f"{where}:{line} imports {dotted}")
                    break
            if imported and dotted in known:
                aliases[imported] = dotted
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name.startswith(PACKAGES)})
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                    and node.value.id in aliases and aliases[node.value.id] != name):
                problems.append(f"{where}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return problems


def test_no_module_imports_another_modules_private_helpers():
    assert private_imports() == []


def definitions(names: set[str]) -> dict[str, list[str]]:
    """Where each of `names` is defined at module level (def, class or assignment) across SCANNED."""
    where: dict[str, list[str]] = {n: [] for n in names}
    for name in modules():
        for node in tree(name).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            else:
                continue
            for d in set(defined) & names:
                where[d].append(name)
    return where


SHARED = {
    # Whisper's time grid
    "SAMPLE_RATE": "freud_pipeline.frames", "HOP_LENGTH": "freud_pipeline.frames",
    "MEL_FRAME_SECONDS": "freud_pipeline.frames", "SAMPLES_PER_FRAME": "freud_pipeline.frames",
    "FRAME_SECONDS": "freud_pipeline.frames",
    # WER and its text normalisation
    "word_error_rate": "freud_pipeline.audio.text", "normalise_transcript": "freud_pipeline.audio.text",
    # devices
    "resolve_device": "freud_pipeline.devices",
    # MLflow UI links
    "mlflow_ui_url": "freud_pipeline.features.runs", "run_url": "freud_pipeline.features.runs",
    "experiment_url": "freud_pipeline.features.runs", "model_version_url": "freud_pipeline.features.runs",
    # app URLs and upload decoding shared by pages
    "edit_href": "dash_app.data", "search_href": "dash_app.data", "decode_upload": "dash_app.data",
}


def test_each_shared_definition_exists_once():
    assert definitions(set(SHARED)) == {name: [module] for name, module in SHARED.items()}


@pytest.mark.parametrize("call, home", [
    ("jiwer.", "freud_pipeline.audio.text"),  # WER only through word_error_rate
    ("torch.cuda.is_available", "freud_pipeline.devices"),  # device choice only through resolve_device
])
def test_shared_rules_are_not_reimplemented(call, home):
    allowed = {home, "freud_pipeline.sae.resume"} if call.startswith("torch.cuda") else {home}  # resume: CUDA RNG
    users = sorted(name for name in modules() if name not in allowed
                   and any(ast.unparse(n).startswith(call) for n in ast.walk(tree(name))
                           if isinstance(n, (ast.Attribute, ast.Call))))
    assert users == []


def _time_literal(node: ast.AST) -> bool:
    numbers = [side.value for side in (getattr(node, "left", None), getattr(node, "right", None))
               if isinstance(side, ast.Constant) and type(side.value) in (int, float)]
    return isinstance(node, ast.BinOp) and any(n in (0.02, 0.01, 16000) for n in numbers)


def test_time_is_not_computed_with_literal_frame_or_sample_rate():
    """Arithmetic with 0.02 s, 0.01 s or 16 kHz uses freud_pipeline.frames, not a number of its own."""
    found = sorted(f"{modules()[name].relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}"
                   for name in modules() if name != "freud_pipeline.frames"
                   for node in ast.walk(tree(name)) if _time_literal(node))
    assert found == []


REFERENCE = re.compile(r"(?<![\w/.])(?:docs|scripts|deploy|benchmarks|configs|tests)/[\w./-]*\w"
                       r"\.(?:md|py|yaml|yml|sh|txt|json|toml)\b")
UPSTREAM = "(ksadov/freud)"  # a config's note naming the file it was ported from in the original repository


def _text_files() -> list[Path]:
    tops = (*SCANNED, "docs", "configs", "scripts", "deploy", "tests")
    found = [p for top in tops for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".yml", ".sh")]
    return [p for p in [*found, ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"] if p.is_file()]


def test_referenced_repository_files_exist():
    """Docs, docstrings, help texts and configs name only files that are in the repository."""
    missing = sorted({f"{path.relative_to(ROOT)}: {ref}" for path in _text_files()
                      for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if UPSTREAM not in line for ref in REFERENCE.findall(line) if not (ROOT / ref).exists()})
    assert missing == []


def test_one_device_rule_for_whisper_and_sae_training():
    import torch

    from freud_pipeline.devices import resolve_device
    from freud_pipeline.errors import DeviceUnavailableError

    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailableError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceUnavailableError, match="'cuda' requested but CUDA is not available"):
            resolve_device("cuda")
