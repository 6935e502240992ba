"""The package's layering, read from the source with ``ast`` (module-level and function-level imports alike).

    .venv/bin/pytest tests/test_architecture.py

- no module of ``llava/export`` or ``llava/serve`` imports ``llava.train`` (they read runs through
  ``llava/run_dir.py``);
- no import cycle anywhere in ``llava/``: the graph of "module A imports module B" has no cycle, counting imports
  inside functions (a cycle hidden behind a function-level import is still a cycle);
- every module of ``llava/`` is placed in ``docs/architecture.md`` (by its path, or by its file name in the paragraph
  of its package);
- nothing in the repository points at the developers' ``../shared`` or ``/work/shared`` (users do not have it);
- every repository file that a docstring, comment or doc cites by path (under llava, tests, scripts, docs,
  playground, zero_configs) exists: in the package, the tests, the scripts, the README and ``docs/``.

The checker is tested on small synthetic packages too, so a checker that finds nothing cannot pass silently.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "llava") -> dict[str, set[str]]:
    """``{module: {imported modules of the package}}`` for every ``.py`` under ``root/package``.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``; relative imports are
    resolved; imports anywhere in the file count (module level, functions, ``if TYPE_CHECKING``)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import llava.x.y` names a module; climb to one we have
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == package and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_finds_function_level_and_relative_cycles(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg.b import thing\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "def g():\n    import pkg.a\n",
        "pkg/d.py": "from pkg import a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (tmp_path / "pkg/c.py").write_text("import os.path\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_no_import_cycle_in_llava():
    graph = import_graph(REPO)
    assert len(graph) > 30 and "llava.run_dir" in graph["llava.export.merge"]  # the checker sees the package
    assert "llava.data.validate" in graph["llava.data.check"] and "llava.data.validate" in graph["llava.data.dataset"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_export_and_serve_do_not_import_train():
    graph = import_graph(REPO)
    offenders = {m: sorted(t for t in deps if t == "llava.train" or t.startswith("llava.train."))
                 for m, deps in graph.items() if m.startswith(("llava.export", "llava.serve"))}
    assert any(m.startswith("llava.serve") for m in offenders) and any(m.startswith("llava.export") for m in offenders)
    assert {m: t for m, t in offenders.items() if t} == {}


CITED = re.compile(r"(?<![\w/.])((?:llava|tests|scripts|docs|playground|zero_configs)/[\w/-]+(?:\.[\w]+)+)")
# paths that name files of other projects on purpose (the README's table of original-LLaVA equivalents; the
# --deepspeed path LLaVA-NeXT's scripts pass, kept verbatim in tests/train/test_llava_next_scripts.py)
NOT_OURS = {"llava/train/train_mem.py", "scripts/zero3.json"}


def test_every_cited_file_exists():
    sources = [*REPO.glob("llava/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("scripts/*"),
               *REPO.glob("playground/*.py"), *REPO.glob("docs/*.md"), REPO / "README.md"]
    cited: dict[str, list[str]] = {}
    for path in sorted(p for p in sources if p.is_file()):
        for rel in CITED.findall(path.read_text(errors="replace")):
            cited.setdefault(rel.rstrip("."), []).append(str(path.relative_to(REPO)))
    assert {"llava/run_dir.py", "docs/architecture.md", "zero_configs/zero2.json"} <= set(cited)  # the pattern works
    missing = {rel: where for rel, where in cited.items() if not (REPO / rel).exists() and rel not in NOT_OURS}
    assert missing == {}, f"files cited but not in the repository: {missing}"


def unplaced_modules(root: Path, doc: str, package: str = "llava") -> list[str]:
    """Modules of ``root/package`` the architecture doc does not name: by path (``llava/run_dir.py``,
    ``train/train.py``), or by file name within the paragraph that opens with its subpackage (``**`llava/pkg`**``)."""
    paragraphs = doc.split("\n\n")
    missing = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root / package).as_posix()
        sub = rel.rpartition("/")[0]
        if path.name == "__init__.py" or f"{package}/{rel}" in doc or (sub and rel in doc):
            continue
        if sub and any(f"**`{package}/{sub}`**" in p and f"`{path.name}`" in p for p in paragraphs):
            continue
        missing.append(rel)
    return missing


def test_every_module_is_placed_in_the_architecture_doc(tmp_path):
    doc = (REPO / "docs/architecture.md").read_text()
    assert unplaced_modules(REPO, doc) == [], "place these modules in docs/architecture.md"
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "", "pkg/data/b.py": "", "pkg/data/c.py": "",
                             "pkg/train/d.py": "", "pkg/train/e.py": ""})
    toy = "**`pkg/a.py`** is a.\n\n**`pkg/data`** has `b.py`.\n\n**`pkg/train`** has `c.py`; see `train/d.py`."
    assert unplaced_modules(tmp_path, toy, "pkg") == ["data/c.py", "train/e.py"]  # c: named in another paragraph


def test_nothing_points_at_the_developers_shared_folder():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared\b|/work/shared\b")
    hits = [f for f in files if (REPO / f).is_file() and pattern.search((REPO / f).read_text(errors="replace"))
            and f != "tests/test_architecture.py"]
    assert hits == [], f"these files point at a folder users do not have: {hits}"
