"""The package's shape stays as documented: every import at module level (the edges between modules are
visible at the top of each file), and the README's module map names exactly the modules there are."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import llava_convert

PACKAGE = Path(llava_convert.__file__).parent
README = PACKAGE.parent / "README.md"

# The CLI imports the library inside its commands so that `llava-convert --help` answers at once.
LAZY_MODULES = {"cli.py", "cli_check.py", "cli_push.py"}


def _modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}


def _comments(source: str) -> dict[int, str]:
    return {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }


def imports_inside_functions(source: str) -> list[int]:
    """The line of each import statement inside a function (or method) that carries no `# lazy: why` comment."""
    comments = _comments(source)
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                if not any("lazy:" in comments.get(n, "") for n in lines):
                    found.append(node.lineno)
    return sorted(set(found))


def test_no_imports_inside_functions():
    found = [
        f"{rel}:{line}"
        for rel in sorted(_modules() - LAZY_MODULES)
        for line in imports_inside_functions((PACKAGE / rel).read_text())
    ]
    assert not found, f"imports inside functions (move them to the top, or add `# lazy: why`): {found}"


def test_the_scan_finds_imports_in_methods_and_honours_lazy_comments():
    source = (
        "import json\n\n"
        "class A:\n"
        "    def f(self):\n"
        "        from os import (\n"
        "            path,\n"
        "        )\n"
        "        return path\n\n"
        "def g():\n"
        "    import bitsandbytes  # noqa: F401 - lazy: optional dependency\n"
        "    def h():\n"
        "        import shlex\n"
        "    s = '# lazy: in a string, not a comment'; import re\n"
    )
    assert imports_inside_functions(source) == [5, 13, 14]


def _module_map() -> set[str]:
    """The paths the README's "How it works" module map names: `name.py` entries, under `pkg/` by indent."""
    text = README.read_text()
    section = text[text.index("## How it works") :]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```\nllava_convert/\n(.*?)```", section, re.S)
    assert block, "README: no module map (a code block starting with `llava_convert/`) under How it works"
    named: set[str] = set()
    packages: list[tuple[int, str]] = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        token = line.split()[0]
        if not re.fullmatch(r"\w+/|\w+\.py", token):
            continue  # a description continued on the next line
        while packages and packages[-1][0] >= indent:
            packages.pop()
        path = "".join(p for _, p in packages) + token
        if token.endswith("/"):
            packages.append((indent, token))
        else:
            named.add(path)
    return named


def test_readme_module_map_names_every_module():
    named, actual = _module_map(), _modules()
    assert not actual - named, f"modules missing from the README's module map: {sorted(actual - named)}"
    assert not named - actual, f"the README's module map names modules that do not exist: {sorted(named - actual)}"
