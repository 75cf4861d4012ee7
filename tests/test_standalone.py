"""A user's clone has no ../shared: nothing a user reads or runs may need it."""

import re

from helpers import ROOT

SHARED = re.compile(r"\.\./shared|\bshared/(data|BENCHMARKS|MACHINE|DESIGN)|parent\s*/\s*\"shared")


def test_readme_configs_docs_and_the_package_never_cite_shared():
    files = [ROOT / "README.md", ROOT / ".ci/run", *ROOT.glob("configs/*.yaml"), *ROOT.glob("docs/*.md")]
    files += [*ROOT.glob("flows/**/*.py"), ROOT / "train.py", ROOT / "sample.py", ROOT / "evaluate.py"]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if SHARED.search(line)
    ]
    assert not hits, "cites ../shared: " + ", ".join(hits)


def test_benchmarks_use_shared_only_as_an_optional_location():
    """A benchmark may look in ../shared/data when it is there, but must take --data FOLDER and run without it."""
    for path in ROOT.glob("bench/*.py"):
        text = path.read_text()
        if "shared/data" in text or '"shared"' in text:
            assert "--data" in text, f"{path.name} reads ../shared/data but takes no --data FOLDER"
            assert "is_dir()" in text, f"{path.name} does not check that ../shared/data exists"
