"""The docs site's code examples are the tested programs in examples/, included by snippet."""

from __future__ import annotations

import re
from pathlib import Path

import batchkit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages of the site's guide; design.md, torch.md and scheduling.md are design notes.
GUIDE = ["index.md", "getting-started.md", "concepts.md", "tuning.md", "sync.md", "integrations.md", "observability.md"]
GUIDE += ["faq.md", "reference.md", "changelog.md"]
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$')
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
TESTS_THAT_RUN_EXAMPLES = ["test_examples.py", "test_fastapi.py"]


def snippets() -> list[tuple[str, str, str | None]]:
    found = []
    for page in GUIDE:
        for block in FENCE.findall((DOCS / page).read_text()):
            for line in block.strip().splitlines():
                match = SNIPPET.match(line.strip())
                assert match, f"{page}: a python example that is not an --8<-- snippet of examples/: {line!r}"
                found.append((page, match.group(1), match.group(2)))
    return found


def test_every_python_example_in_the_guide_is_a_snippet_of_a_tested_example() -> None:
    tested = "".join((ROOT / "tests" / name).read_text() for name in TESTS_THAT_RUN_EXAMPLES)
    included = snippets()
    assert len(included) >= 8
    for page, path, section in included:
        assert path.startswith("examples/"), (page, path)
        source = (ROOT / path).read_text()
        assert Path(path).name in tested, f"{page} shows {path}, which no test runs"
        if section is not None:
            assert f"# --8<-- [start:{section}]" in source, (page, path, section)
            assert f"# --8<-- [end:{section}]" in source, (page, path, section)


def test_site_config_and_pages() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "strict: true" in config
    for page in GUIDE:
        assert f" {page}" in config, f"{page} is not in the nav"
    assert "::: batchkit\n" in (DOCS / "reference.md").read_text()  # the API reference follows batchkit.__all__
    assert batchkit.__all__


def test_docs_script_builds_strictly() -> None:
    assert "mkdocs build --strict" in (ROOT / "scripts" / "docs").read_text()
