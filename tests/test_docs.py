"""Every code block of the README and the docs is a tested program's text, or a command a test checks.

* Python blocks in the docs site are ``--8<--`` snippets of examples/, and the
  README's (which GitHub shows as is) are word for word sections of
  examples/readme.py, named by an ``<!-- snippet: FILE:SECTION -->`` line above
  the block; the example files are run by tests.
* Shell blocks are checked command by command: extras exist, ``batchkit bench``
  options parse, scripts and files exist, endpoints are served.
* Other blocks (``text``, or none) are diagrams and program output.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

import batchkit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages of the site's guide; design.md, torch.md and scheduling.md are design notes.
GUIDE = ["index.md", "getting-started.md", "concepts.md", "tuning.md", "sync.md", "integrations.md", "observability.md"]
GUIDE += ["streaming.md", "faq.md", "reference.md", "changelog.md"]
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$')
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
README_SNIPPET = re.compile(r"^<!-- snippet: ([^:\s]+):([\w-]+) -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
TESTS_THAT_RUN_EXAMPLES = ["test_examples.py", "test_fastapi.py", "test_ray.py", "test_streaming_app.py"]
TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def section(path: str, name: str) -> str:
    """The lines between ``# --8<-- [start:name]`` and ``[end:name]``, dedented (as pymdownx.snippets does)."""
    source = (ROOT / path).read_text()
    match = re.search(rf"^[ \t]*# --8<-- \[start:{name}\]\n(.*?)^[ \t]*# --8<-- \[end:{name}\]", source, re.M | re.S)
    assert match, f"{path} has no section {name!r}"
    return textwrap.dedent(match.group(1))


def snippets() -> list[tuple[str, str, str | None]]:
    found = []
    for page in PAGES:
        for block in blocks((DOCS / page).read_text(), "python"):
            for line in block.strip().splitlines():
                match = SNIPPET.match(line.strip())
                assert match, f"{page}: a python example that is not an --8<-- snippet of examples/: {line!r}"
                found.append((page, match.group(1), match.group(2)))
    return found


def examples_run_by_tests() -> str:
    return "".join((ROOT / "tests" / name).read_text() for name in TESTS_THAT_RUN_EXAMPLES)


def test_every_python_example_in_the_docs_is_a_snippet_of_a_tested_example() -> None:
    tested = examples_run_by_tests()
    included = snippets()
    assert len(included) >= 8
    for page, path, name in included:
        assert path.startswith("examples/"), (page, path)
        assert Path(path).stem in tested, f"{page} shows {path}, which no test runs"
        if name is not None:
            section(path, name)


def test_every_python_block_in_the_readme_is_a_section_of_a_tested_example() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = README_SNIPPET.findall(readme)
    assert len(shown) == len(blocks(readme, "python")), "a README python block without a snippet line above it"
    assert shown
    for path, name, body in shown:
        assert Path(path).stem in examples_run_by_tests(), f"README shows {path}, which no test runs"
        assert body == section(path, name), f"README block {path}:{name} differs from the file"


def commands(text: str) -> list[list[str]]:
    """The commands of the shell blocks in ``text``: continuations joined, comments dropped, split at &&."""
    found = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append(words[:end])
                words = words[end + 1 :]
    return found


def check_pip(words: list[str], extras: set[str]) -> None:
    assert words[:2] == ["pip", "install"], words
    args = [w for w in words[2:] if w not in ("-e", "--quiet", "-q")]
    if "--index-url" in args:  # the CPU build of torch, from PyTorch's own index, and nothing else
        assert args == [TORCH_PIN, "--index-url", CPU_INDEX], words
        return
    for arg in args:
        if arg == TORCH_PIN:
            continue
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
        assert match, f"installs something other than this repository: {words}"  # no release is published yet
        assert set((match.group(1) or "").split(",")) - {""} <= extras, words


def check_command(words: list[str], extras: set[str], tested: str) -> None:
    from batchkit.bench.__main__ import make_plan

    program, *args = words
    if program in ("python", "python3") and args[:2] == ["-m", "pip"]:
        check_pip(["pip", *args[2:]], extras)
    elif program == "pip":
        check_pip(words, extras)
    elif program == "batchkit" or (program in ("python", "python3") and args[:2] == ["-m", "batchkit.bench"]):
        options = args[1:] if program == "batchkit" else args[2:]
        assert program != "batchkit" or args[:1] == ["bench"], words
        if "--help" in options:
            with pytest.raises(SystemExit) as exited:
                make_plan(options)
            assert exited.value.code == 0
        else:
            make_plan(options)  # an argparse error would exit
    elif program.startswith("./scripts/"):
        assert (ROOT / program).is_file(), words
    elif program in ("python", "python3") and args and args[0].endswith(".py"):
        assert (ROOT / args[0]).is_file(), words
        if args[0].startswith("examples/"):
            assert Path(args[0]).stem in tested, f"{args[0]} is run by no test"
    elif program in ("pytest", "python", "python3"):
        paths = [a for a in args if a.endswith(".py")]
        assert program == "pytest" or args[:2] == ["-m", "pytest"], words
        assert paths, words
        assert all((ROOT / p).is_file() for p in paths), words
    elif program == "curl":
        (url,) = [a for a in args if a.startswith("localhost:")]
        route = url.split("/", 1)[1].split("?")[0]
        served = [(ROOT / "examples" / app).read_text() for app in ("fastapi_app.py", "streaming_app.py")]
        assert any(f'("/{route}"' in source for source in served), words
    elif program == "uvicorn":
        app_dir = args[args.index("--app-dir") + 1]
        (target,) = [a for a in args if ":" in a]
        module, factory = target.split(":")
        assert f"def {factory}(" in (ROOT / app_dir / f"{module}.py").read_text(), words
    else:
        raise AssertionError(f"no check for this command: {words}")


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{page}" for page in PAGES)])
def test_every_shell_command_is_checked(page: str) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    table = pyproject.split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", table, re.MULTILINE))
    assert {"torch", "bench", "prometheus"} <= extras
    tested = examples_run_by_tests()
    for words in commands((ROOT / page).read_text()):
        check_command(words, extras, tested)


def test_blocks_have_a_known_language() -> None:
    for page in ["README.md", *(f"docs/{page}" for page in PAGES)]:
        for language, _ in FENCE.findall((ROOT / page).read_text()):
            assert language in ("python", "bash", "text", ""), (page, language)
            if page == "README.md" or page.removeprefix("docs/") in GUIDE:
                assert language != "", f"{page}: a block without a language (use text for output)"


def test_site_config_and_pages() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "strict: true" in config
    for page in GUIDE:
        assert f" {page}" in config, f"{page} is not in the nav"
    assert "::: batchkit\n" in (DOCS / "reference.md").read_text()  # the API reference follows batchkit.__all__
    assert batchkit.__all__


def test_docs_script_builds_strictly() -> None:
    assert "mkdocs build --strict" in (ROOT / "scripts" / "docs").read_text()
