"""The package's rooms import one way (docs/architecture.md): a module may import its own room and rooms below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "arrcoc"

#: Each room's rank: a module may import from rooms of a lower rank, and from its own room.
RANKS = {
    "errors": 0,
    "config": 0.5,
    "outputs": 0.5,
    "cli_help": 0.5,
    "runtime": 1,
    "stages": 1.5,
    "frontend": 1.8,
    "pipeline": 2,
    "reducers": 2,
    "integrations": 3,
    "datasets": 3,
    "hf": 3.5,
    "world": 4,
    "tools": 5,
    "cli": 6,
    "__main__": 7,
}


def _room(parts: tuple[str, ...]) -> str:
    """``("stages", "head")`` -> ``"stages"``; ``("pipeline",)`` -> ``"pipeline"``."""
    return parts[0]


def _imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, target module parts under arrcoc)`` of every import of arrcoc's own modules in ``path``."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    package = module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = (*base, *node.module.split(".")) if node.module else base
                names = [(*target, a.name) for a in node.names] if not node.module else [target]
            elif node.module and node.module.split(".")[0] == "arrcoc":
                names = [tuple(node.module.split(".")[1:])]
            else:
                continue
            found += [(node.lineno, n) for n in names if n]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, tuple(a.name.split(".")[1:]))
                for a in node.names
                if a.name.split(".")[0] == "arrcoc" and len(a.name.split(".")) > 1
            ]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_room_has_a_rank() -> None:
    rooms = {_room(p.relative_to(PACKAGE).with_suffix("").parts) for p in MODULES}
    assert rooms <= set(RANKS), f"rooms without a rank in docs/architecture.md's rule: {sorted(rooms - set(RANKS))}"


def _violations(room: str, imports: list[tuple[int, tuple[str, ...]]]) -> list[str]:
    """Imports of ``room``'s module that reach a room of the same or a higher rank."""
    wrong = []
    for line, target in imports:
        other = _room(target)
        if other != room and RANKS.get(other, 99) >= RANKS[room]:
            wrong.append(f"line {line}: {room} imports {'.'.join(target)} ({other}, rank {RANKS.get(other)})")
    return wrong


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    room = _room(path.relative_to(PACKAGE).with_suffix("").parts)
    wrong = _violations(room, _imports(path))
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_upward_and_sideways_imports() -> None:
    assert _violations("stages", [(3, ("pipeline",))]) == ["line 3: stages imports pipeline (pipeline, rank 2)"]
    assert _violations("pipeline", [(1, ("reducers", "registry"))])  # same rank, another room
    assert _violations("tools", [(9, ("cli",))])
    assert not _violations("cli", [(1, ("tools", "bench"))])
    assert not _violations("stages", [(1, ("stages", "regions")), (2, ("errors",))])
