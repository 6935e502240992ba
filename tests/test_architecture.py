"""The package's layering, read from the source with ``ast`` (module-level and function-level imports alike).

    .venv/bin/pytest tests/test_architecture.py

- the packages depend one way, in the order of ``PACKAGE_ORDER`` (a package imports only packages on an earlier
  line; a back-arrow fails naming the two packages and the imports that tie them); so, among others, no module of
  ``llava/export`` or ``llava/serve`` imports ``llava.train`` (they read runs through ``llava/run_dir.py``), data
  imports neither model nor train, model never imports train;
- an import inside a function carries a one-line reason (a comment on its line or the line above): such imports
  are kept only where they buy start-up time or keep an optional dependency optional;
- module file names are unique in ``llava/`` (a reader who sees ``templates.py`` need not ask which one);
- tests mirror the package: every folder of ``tests/`` holding tests is a package of ``llava/``;
- no import cycle anywhere in ``llava/``: the graph of "module A imports module B" has no cycle, counting imports
  inside functions (a cycle hidden behind a function-level import is still a cycle);
- every module of ``llava/`` is placed in ``docs/architecture.md`` (by its path, or by its file name in the paragraph
  of its package);
- nothing in the repository points at the developers' ``../shared`` or ``/work/shared`` (users do not have it);
- the README stays under ``README_MAX_LINES`` and links every page of ``docs/``; links between pages resolve (file
  and heading);
- every repository file that a docstring, comment or doc cites by path (under llava, tests, scripts, docs,
  playground, zero_configs) exists: in the package, the tests, the scripts, the README and ``docs/``.

The checker is tested on small synthetic packages too, so a checker that finds nothing cannot pass silently.
"""

from __future__ import annotations

import ast
import functools
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


@functools.cache
def repo_graph() -> dict[str, set[str]]:
    """``import_graph`` of this repository's ``llava/``, read once for the tests that check it."""
    return import_graph(REPO)


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
    graph = repo_graph()
    assert len(graph) > 30 and "llava.run_dir" in graph["llava.export.merge"]  # the checker sees the package
    assert "llava.data.validate" in graph["llava.data_check"] and "llava.data.validate" in graph["llava.data.dataset"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_export_and_serve_do_not_import_train():
    graph = repo_graph()
    offenders = {m: sorted(t for t in deps if t == "llava.train" or t.startswith("llava.train."))
                 for m, deps in graph.items() if m.startswith(("llava.export", "llava.serve"))}
    assert any(m.startswith("llava.serve") for m in offenders) and any(m.startswith("llava.export") for m in offenders)
    assert {m: t for m, t in offenders.items() if t} == {}


# The allowed order of llava's packages, lowest first. A package may import the packages on earlier lines, never
# one on its own line (those stay independent) or a later one.
PACKAGE_ORDER = [
    ("llava", "llava.constants", "llava.errors", "llava.megatron"),  # leaves (llava.megatron: a docstring only)
    ("llava.safetensors_io",),                                        # streaming safetensors files, atomic writes
    ("llava.data", "llava.megatron.converter"),                       # records -> tensors; HF <-> Megatron shards
    ("llava.model",),                                                 # builds the model (uses data's anyres geometry)
    ("llava.run_dir", "llava.curves"),                                # the run directory; its curves (both backends)
    ("llava.export", "llava.serve", "llava.megatron.backend"),        # read and write runs; the Megatron backend
    ("llava.train", "llava.data_check"),                              # the recipe and the hf backend; data check
    ("llava.report",),                                                # HTML pages of eval and data check results
    ("llava.demo",),                                                  # the whole pipeline
    ("llava.cli",),                                                   # the `llava` command
]


def package_of(module: str, order: list[tuple[str, ...]] = PACKAGE_ORDER) -> str | None:
    """The unit of the order that holds ``module``; a unit with units under it (``llava``, ``llava.megatron``)
    holds only its ``__init__``."""
    units = [u for line in order for u in line]
    parents = {u for u in units if any(v.startswith(u + ".") for v in units)}
    return next((u for u in units if module == u or (u not in parents and module.startswith(u + "."))), None)


def back_arrows(graph: dict[str, set[str]], order: list[tuple[str, ...]] = PACKAGE_ORDER) -> list[str]:
    """``"A may not import B (B is not below A): a.x imports b.y, ..."`` for every pair of packages against the order,
    plus every module no unit of the order holds."""
    rank = {unit: i for i, line in enumerate(order) for unit in line}
    problems, ties = [], {}
    for module, deps in sorted(graph.items()):
        source = package_of(module, order)
        if source is None:
            problems.append(f"{module} is in no package of PACKAGE_ORDER: add its package there")
            continue
        for dep in sorted(deps):
            target = package_of(dep, order)
            if target is not None and target != source and rank[target] >= rank[source]:
                ties.setdefault((source, target), []).append(f"{module} imports {dep}")
    for (source, target), imports in sorted(ties.items()):
        where = "beside" if rank[source] == rank[target] else "above"
        problems.append(f"{source} may not import {target} ({target} is {where} it in PACKAGE_ORDER): "
                        + ", ".join(imports))
    return problems


def test_package_order_checker_names_the_back_arrow(tmp_path):
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/low/a.py": "import os\n",
                             "pkg/high/__init__.py": "", "pkg/high/b.py": "from pkg.low import a\n",
                             "pkg/side.py": ""})
    order = [("pkg",), ("pkg.low", "pkg.side"), ("pkg.high",)]
    assert back_arrows(import_graph(tmp_path, "pkg"), order) == []
    (tmp_path / "pkg/low/a.py").write_text("def f():\n    from pkg.high.b import thing\n")  # a function-level back-arrow
    (tmp_path / "pkg/side.py").write_text("import pkg.low.a\n")
    (tmp_path / "pkg/new.py").write_text("")
    assert back_arrows(import_graph(tmp_path, "pkg"), order) == [
        "pkg.new is in no package of PACKAGE_ORDER: add its package there",
        "pkg.low may not import pkg.high (pkg.high is above it in PACKAGE_ORDER): pkg.low.a imports pkg.high.b",
        "pkg.side may not import pkg.low (pkg.low is beside it in PACKAGE_ORDER): pkg.side imports pkg.low.a",
    ]


def test_architecture_doc_shows_the_package_order():
    doc = (REPO / "docs/architecture.md").read_text()
    block = doc[doc.index("## Package order"):].split("```")[1].strip("\n").splitlines()
    shown = [tuple(re.findall(r"llava[\w.]*", line.split("  ")[0])) for line in block]
    namespaces = {"llava", "llava.megatron"}  # hold only their __init__
    assert shown == [tuple(u for u in line if u not in namespaces) for line in PACKAGE_ORDER]


def test_packages_depend_one_way():
    graph = repo_graph()
    assert "llava.data.samplers" in graph["llava.train.trainer"]  # the checker sees the package
    assert back_arrows(graph) == []


def function_level_imports(path: Path) -> list[tuple[int, bool]]:
    """``(line, has_reason)`` for each import inside a function: a comment on the import's first line, or on the line
    above it (one comment may head a run of consecutive imports)."""
    lines = path.read_text().splitlines()
    found = []
    for func in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body_imports = [n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in sorted(body_imports, key=lambda n: n.lineno):
            first = node.lineno - 1
            above = first - 1
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):  # a run of imports
                above -= 1
            reason = "#" in lines[first] or (above >= 0 and lines[above].strip().startswith("#"))
            found.append((node.lineno, reason))
    return sorted(set(found))


def test_function_level_imports_give_their_reason(tmp_path):
    write_package(tmp_path, {"pkg/a.py": "def f():\n    import json\n\n\ndef g():\n    # optional: the [x] extra\n"
                                         "    import x\n    from y import z\n\n\ndef h():\n    import w  # startup\n"})
    assert function_level_imports(tmp_path / "pkg/a.py") == [(2, False), (7, True), (8, True), (12, True)]
    missing = [f"{p.relative_to(REPO)}:{line}" for p in sorted((REPO / "llava").rglob("*.py"))
               for line, reason in function_level_imports(p) if not reason]
    assert missing == [], "say in one comment why these imports are inside a function (or move them to the top)"


def test_test_folders_mirror_the_packages():
    """A test of a module of ``llava.model`` lives under ``tests/model/``: every folder of tests is a package of llava."""
    folders = {p.parent.relative_to(REPO / "tests") for p in (REPO / "tests").rglob("test_*.py")} - {Path(".")}
    assert Path("megatron/backend") in folders  # the pattern sees nested folders
    assert sorted(str(f) for f in folders if not (REPO / "llava" / f / "__init__.py").is_file()) == []


def test_module_names_are_unique():
    names: dict[str, list[str]] = {}
    for path in sorted((REPO / "llava").rglob("*.py")):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {n: where for n, where in names.items() if len(where) > 1} == {}


CITED = re.compile(r"(?<![\w/.])((?:llava|tests|scripts|docs|playground|zero_configs)/[\w/-]+(?:\.[\w]+)+)")
# paths that name files of other projects on purpose (the README's table of original-LLaVA equivalents; the
# --deepspeed path LLaVA-NeXT's scripts pass, kept verbatim in tests/train/test_llava_next_scripts.py; LLaVA-NeXT's DPO
# recipe, whose flags tests/train/test_dpo_scripts.py runs)
NOT_OURS = {"llava/train/train_mem.py", "scripts/zero3.json", "scripts/train/dpo_ov7b.sh"}


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


README_MAX_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]*?\.md)?(?:#([\w-]+))?\)")  # [text](page.md#anchor), [text](#anchor)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -> ``-``."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if line.startswith("#")}


def test_readme_is_short_and_maps_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, "move detail into a docs/ page and link it from the README"
    linked = {target for target, _ in LINK.findall(readme)}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert len(pages) >= 7 and pages - linked == set(), "link every docs/ page from the README's map"


def test_links_between_pages_resolve():
    assert heading_anchors("## Two commands (on a `fresh` machine)\n### 1.6, too") == {
        "two-commands-on-a-fresh-machine", "16-too"}
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, anchor in LINK.findall(page.read_text()):
            if not target and not anchor:
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in heading_anchors(path.read_text()):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == []


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
