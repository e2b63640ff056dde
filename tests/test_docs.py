"""The README and docs/ link to files that exist, the README's set-up is what CI runs, and the code's
layout rules hold (imports flow envs -> worldmodel -> agent without cycles; no sys.path edits)."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(doc: Path) -> None:
    targets = [m.group(1) for m in LINK.finditer(doc.read_text())]
    assert targets or doc.name != "README.md", "the README links to nothing"
    missing = []
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            missing.append(target)
    assert not missing, f"{doc.name} links to files that are not in the repository: {missing}"


def _heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    to ``-``, a repeated heading suffixed ``-1``, ``-2``, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_sections_resolve(doc: Path) -> None:
    missing = []
    for target in (m.group(1) for m in LINK.finditer(doc.read_text())):
        path, _, anchor = target.partition("#")
        if not anchor or re.match(r"[a-z]+://", target):
            continue
        page = doc.parent / path if path else doc
        if page.suffix == ".md" and page.exists() and anchor not in _heading_anchors(page):  # a missing file: above
            missing.append(target)
    assert not missing, f"{doc.name} links to sections that do not exist: {missing}"


def test_heading_anchors_follow_github() -> None:
    doc = ROOT / "README.md"
    assert "set-up-and-run-fresh-machine-python--311" in _heading_anchors(doc)
    assert "what-does-not-work-yet" in _heading_anchors(doc)


def test_readme_is_two_screens() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def _steps(command: str) -> list[list[str]]:
    """A shell line's ``&&``-joined commands, each as words, pip's ``-q`` dropped."""
    return [[w for w in shlex.split(part) if w != "-q"] for part in command.split("&&")]


def test_readme_setup_commands_are_what_ci_runs() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    setup = [b.strip() for b in blocks if b.strip().startswith("python3 -m venv")]
    assert len(setup) == 2, "the README has one install-and-train and one install-and-test command"
    train, test = (_steps(c) for c in setup)
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    ci_steps = [
        [w for w in shlex.split(ln) if w != "-q"]
        for ln in ci
        if ln and not ln.startswith(("#", "set ", "cd ", "rc=", "if ", "exit", "fi"))
    ]
    assert test == ci_steps, f"README test command {test} differs from .ci/run {ci_steps}"
    assert train[:-1] == test[:-1], "both set-up commands install the same way"
    assert train[-1][:2] == ["wm-agent", "train"]


def _imports(path: Path) -> set[str]:
    """Top-level package modules imported anywhere in ``path`` (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_flow_one_way_without_cycles() -> None:
    layer = {"envs": 0, "worldmodel": 1, "agent": 2}
    graph: dict[str, set[str]] = {}
    for package in layer:
        for path in (ROOT / package).glob("*.py"):
            module = f"{package}.{path.stem}"
            deps = {m for m in _imports(path) if m.split(".")[0] in layer}
            for dep in deps:
                assert layer[dep.split(".")[0]] <= layer[package], f"{module} imports {dep} against the flow"
            graph[module] = {d for d in deps if d != package and d != module}
    # Depth-first search for a cycle among the project's modules.
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in graph.get(module, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep in graph and not state.get(dep):
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])


def test_scripts_do_not_edit_sys_path() -> None:
    for path in (ROOT / "scripts").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path; run it as python -m scripts.NAME"
