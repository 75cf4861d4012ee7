"""What the documentation shows works: every ```python block of the README and the guide runs as written.

Per document the blocks run in order, in one namespace (a later block uses an earlier block's names), in a fresh
working directory holding a link to the checkout's ``configs/``, as a user at the root of a clone would run them.
A run that a block opens by path without making it (``flows.load("runs/toy2d_mle")``, the default command's run)
is made first with a tiny config at the same relative path (``RUNS``). A block holding a line
``# doc-test: skip (reason)`` is left out, with the reason. The README's first block (fit, sample, score) runs in the
default ``pytest``; the others, and the guide's, are marked slow (they train flows for seconds each; CI runs them).

Also checked here, without running anything: every link to a heading (``#anchor``, ``file.md#anchor``) between the
README, the guide, the benchmarks and the API page resolves; the README stays within 300 lines and keeps the
commands CI runs; the API page names every top-level public name.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, tiny_overrides

DOCS = ("README.md", "docs/guide.md")
LINKED = ("README.md", "docs/guide.md", "docs/benchmarks.md", "docs/api.md")
README_LINES = 300

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"#\s*doc-test:\s*skip\s*\((.+)\)")
LOADS = re.compile(r"""flows\.load\(\s*["']([^"']+)["']""")
MAKES = re.compile(r"""run_dir\s*=\s*["']([^"']+)["']""")


def _make_toy2d_mle(path: Path) -> None:
    """The default command's run (checkerboard by maximum likelihood), trained for a few steps."""
    import flows

    flows.train(None, overrides=tiny_overrides(path, steps=4))


# runs the documents open by path without making them: relative path -> how to make one quickly
RUNS: dict[str, Callable[[Path], None]] = {"runs/toy2d_mle": _make_toy2d_mle}


@dataclass
class Block:
    doc: str
    line: int  # the line of the opening fence, 1-based
    source: str
    skip: str | None  # the reason of a ``# doc-test: skip (reason)`` marker

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, body) of every fenced block of a Markdown text."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


def blocks(doc: str) -> list[Block]:
    out = []
    for lang, line, body in fenced((ROOT / doc).read_text()):
        if lang == "python":
            skip = SKIP.search(body)
            out.append(Block(doc, line, body, skip.group(1).strip() if skip else None))
    return out


def assigned(source: str) -> set[str]:
    """The names a block binds (assignments, imports, defs, loop targets)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def runs_to_make(doc: str) -> list[str]:
    """The runs a document opens by path (``flows.load("...")``) before any block of it makes them."""
    made: set[str] = set()
    needed: list[str] = []
    for block in blocks(doc):
        for m in sorted([*LOADS.finditer(block.source), *MAKES.finditer(block.source)], key=lambda m: m.start()):
            path = m.group(1)
            if m.re is MAKES:
                made.add(path)
            elif path not in made and path not in needed:
                needed.append(path)
    return needed


@dataclass
class Space:
    """One document's working directory, namespace and the outcome of each block run so far."""

    root: Path
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "__main__"})
    outcome: dict[int, BaseException | None] = field(default_factory=dict)


@pytest.fixture(scope="module")
def spaces() -> dict[str, Space]:
    return {}


def space_for(doc: str, spaces: dict[str, Space], factory: pytest.TempPathFactory) -> Space:
    if doc not in spaces:
        root = factory.mktemp(Path(doc).stem)
        (root / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
        for path in runs_to_make(doc):
            RUNS[path](root / path)
        spaces[doc] = Space(root)
    return spaces[doc]


def execute(block: Block, space: Space) -> None:
    padded = "\n" * block.line + block.source  # tracebacks name the document's own line numbers
    exec(compile(padded, block.doc, "exec"), space.namespace)


def run_through(doc: str, index: int, space: Space) -> None:
    """Run the blocks of ``doc`` before ``index`` that have not run yet (a block selected alone needs them)."""
    for i, block in enumerate(blocks(doc)[:index]):
        if i not in space.outcome and block.skip is None:
            try:
                execute(block, space)
                space.outcome[i] = None
            except Exception as e:  # reported by that block's own test
                space.outcome[i] = e


def params(doc: str, marks: tuple = (), fast: int = 0) -> list:
    """One case per block; the first ``fast`` blocks unmarked, the rest with ``marks``."""
    return [pytest.param(doc, i, id=b.id, marks=marks if i >= fast else ()) for i, b in enumerate(blocks(doc))]


def check_block(doc: str, index: int, spaces: dict[str, Space], factory: pytest.TempPathFactory, monkeypatch) -> None:
    block = blocks(doc)[index]
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    space = space_for(doc, spaces, factory)
    monkeypatch.chdir(space.root)
    run_through(doc, index, space)
    try:
        execute(block, space)
    except NameError as e:  # a name an earlier block should have made: that block's failure, reported there
        failed = [
            (i, b)
            for i, b in enumerate(blocks(doc)[:index])
            if space.outcome.get(i) is not None and e.name in assigned(b.source)
        ]
        space.outcome[index] = e
        if failed:
            i, earlier = failed[-1]
            pytest.skip(f"needs {e.name!r} from {earlier.id}, which failed: {space.outcome[i]!r}")
        raise
    except Exception as e:
        space.outcome[index] = e
        raise
    space.outcome[index] = None


@pytest.mark.parametrize(("doc", "index"), params("README.md", (pytest.mark.slow,), fast=1))
def test_every_readme_example_runs(doc, index, spaces, tmp_path_factory, monkeypatch):
    check_block(doc, index, spaces, tmp_path_factory, monkeypatch)


@pytest.mark.parametrize(("doc", "index"), params("docs/guide.md", (pytest.mark.slow,)))
def test_every_guide_example_runs(doc, index, spaces, tmp_path_factory, monkeypatch):
    check_block(doc, index, spaces, tmp_path_factory, monkeypatch)


# ------------------------------------------------------------------ checks without running anything
def test_every_run_a_document_opens_by_path_is_made_by_it_or_here():
    for doc in DOCS:
        missing = [path for path in runs_to_make(doc) if path not in RUNS]
        assert not missing, f"{doc} opens {missing} without making them: make them in an earlier block or add to RUNS"


def test_skip_markers_give_a_reason():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for line in text.splitlines():
            if "doc-test:" in line:
                assert SKIP.search(line), f"{doc}: a doc-test marker without '# doc-test: skip (reason)': {line!r}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``\\w``, '-' and spaces kept), spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """The text outside fenced blocks (a '# comment' in a bash block is no heading)."""
    return FENCE.sub("", text)


def anchors(doc: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose((ROOT / doc).read_text()), re.M):
        base = slug(m.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_every_link_to_a_heading_resolves():
    bad = []
    for doc in LINKED:
        here = (ROOT / doc).parent
        for m in re.finditer(r"\]\(([^)\s]*)#([^)\s]+)\)", prose((ROOT / doc).read_text())):
            target, anchor = m.group(1), m.group(2)
            path = (here / target).resolve() if target else (ROOT / doc).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.is_file():
                bad.append(f"{doc}: {target}#{anchor} (no such file)")
            elif path.suffix == ".md" and anchor not in anchors(rel):
                bad.append(f"{doc}: {target or doc}#{anchor} (no such heading)")
    assert not bad, "links to missing headings:\n" + "\n".join(bad)


def test_every_relative_link_points_at_a_file():
    bad = []
    for doc in LINKED:
        here = (ROOT / doc).parent
        for m in re.finditer(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", prose((ROOT / doc).read_text())):
            target = m.group(1)
            if "://" not in target and not (here / target).exists():
                bad.append(f"{doc}: {target}")
    assert not bad, "links to missing files: " + ", ".join(bad)


def test_the_readme_is_short_and_keeps_the_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {README_LINES})"
    )
    shell = "\n".join(body for lang, _, body in fenced(text) if lang == "bash")
    for command in ('pip install -e ".[dev]"', "accelerate launch train.py", "pytest"):
        assert re.search(rf"^{re.escape(command)}(\s|$)", shell, re.M), f"README's bash blocks lack {command!r}"


def test_the_api_page_names_every_public_name():
    import flows

    text = (ROOT / "docs/api.md").read_text()
    missing = [name for name in flows.__all__ if f"flows.{name}" not in text]
    assert not missing, f"docs/api.md does not list {missing}"
    top = text[text.index("## Top level") : text.index("\n## ", text.index("## Top level"))]
    documented = set(re.findall(r"`flows\.(\w+)", top))
    unknown = [name for name in sorted(documented) if not hasattr(flows, name)]
    assert not unknown, f"docs/api.md lists top-level names flows does not have: {unknown}"
