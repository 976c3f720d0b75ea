"""The package's shape: imports only go down the layers (so there is no cycle), no file is over 450 lines, and no
block of six lines is written twice. Read from the source (every import, also the ones inside functions), so a lazy
import cannot hide a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robust_enc"

# Lowest first: a module may import from its own layer or a lower one, never from a higher one. The data flow:
# data -> model -> regularizers -> checkpoint -> train / attack / gbr -> results -> report, under one runtime.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("robust_enc", "robust_enc.errors", "robust_enc.io", "robust_enc.registry", "robust_enc.config")),
    ("runtime", ("robust_enc.runtime",)),  # device, process group, sharding, seeding, logging and progress
    ("data", ("robust_enc.preprocessing", "robust_enc.images", "robust_enc.imagenet", "robust_enc.cache",
              "robust_enc.data")),
    ("models", ("robust_enc.models", "robust_enc.user_models")),
    ("regularizers", ("robust_enc.regularizers",)),  # the architecture changes a regularizer makes
    ("records", ("robust_enc.results", "robust_enc.checkpoint", "robust_enc.model_sources")),
    ("measures", ("robust_enc.gbr",)),
    ("stages", ("robust_enc.train", "robust_enc.attacks")),
    ("report", ("robust_enc.reports",)),
    ("pipeline", ("robust_enc.reproduce",)),
    ("cli", ("robust_enc.cli",)),
]
MAX_LINES = 450
WINDOW = 6  # lines that must not appear twice, in the same order


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


MODULES = {module_name(p): p for p in source_files()}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module`` (the package itself only names itself)."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "robust_enc" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def imports_of(path: Path) -> set[str]:
    """The package's modules ``path`` imports: ``from pkg import name`` counts as pkg.name when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in MODULES:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found - {module_name(path)}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}
# The one import allowed to go up: the package root re-exports the public API (robust_enc.benchmark) through a PEP 562
# __getattr__, run on first attribute access, after every module has loaded, so it adds no import-time cycle.
GRAPH["robust_enc"] -= {"robust_enc.attacks", "robust_enc.attacks.evaluation"}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_from_a_higher_layer():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in GRAPH.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checks themselves, on a made-up graph: a mutant that always passes would fail here."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer_of("robust_enc.cli.train") > layer_of("robust_enc.train.loop") > layer_of("robust_enc.models")
    assert layer_of("robust_enc.runtime.device") < layer_of("robust_enc.data")


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_over_the_line_limit(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concept"


def _is_trivial(line: str) -> bool:
    """Lines that repeat by nature: comments, imports, lone brackets, bare keywords, docstring quotes."""
    return (line.startswith(("#", "import ", "from ")) or not line.strip("()[]{},:;.\"' ")
            or line in ("else:", "try:", "finally:", "return", "pass", "...", "continue", "break", "raise"))


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, the line with white space folded) of every line that is not blank or trivial."""
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = " ".join(raw.split())
        if line and not _is_trivial(line):
            out.append((number, line))
    return out


def repeated_blocks(files: list[Path], window: int = WINDOW) -> list[str]:
    """Every run of ``window`` code lines found at two or more places, as "a.py:10 ~ b.py:40"."""
    places: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in files:
        lines = code_lines(path)
        for i in range(len(lines) - window + 1):
            block = tuple(text for _, text in lines[i:i + window])
            places[block].append(f"{path.name}:{lines[i][0]}")
    return [" ~ ".join(where) for where in places.values() if len(where) > 1]


def test_no_block_of_six_lines_repeats():
    repeats = repeated_blocks(source_files())
    assert not repeats, "repeated blocks:\n" + "\n".join(repeats)


def test_the_repeat_check_finds_a_copied_block(tmp_path):
    block = "\n".join(f"value_{i} = compute({i}, scale=2)" for i in range(6))
    (tmp_path / "a.py").write_text(f"{block}\n")
    (tmp_path / "b.py").write_text(f"# a comment\n\n{block.replace(' = ', '   =   ')}\n")
    (tmp_path / "c.py").write_text("\n".join(f"other_{i} = compute({i})" for i in range(6)) + "\n")
    assert repeated_blocks(sorted(tmp_path.glob("*.py"))) == ["a.py:1 ~ b.py:3"]
