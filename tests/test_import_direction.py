"""Import direction: `ldm.utils` and `ldm.data` are below `ldm.models` and never import it (not even
inside a function), so models can use them without import cycles."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

LOWER_PACKAGES = ("ldm/utils", "ldm/data")
FORBIDDEN = "ldm.models"


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source` (a module of `package`), nested
    ones included; `from ldm import models` counts as `ldm.models`; relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def forbidden_imports(source: str, package: str, where: str) -> list[str]:
    return [
        f"{where}:{line} imports {name}"
        for line, name in imported_modules(source, package)
        if name == FORBIDDEN or name.startswith(FORBIDDEN + ".")
    ]


def test_utils_and_data_do_not_import_models():
    files = sorted(p for pkg in LOWER_PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 10  # the walk found the packages
    bad = []
    for path in files:
        relative = path.relative_to(ROOT)
        package = ".".join(relative.parts[:-1])
        bad += forbidden_imports(path.read_text(), package, str(relative))
    assert bad == []


@pytest.mark.parametrize(
    "source",
    [
        "from ldm.models.loading import load_checkpoint\n",
        "def f():\n    import ldm.models.latent_diffusion as ld\n",
        "from ldm import models\n",
        "from ..models import loading\n",
    ],
)
def test_the_check_sees_every_spelling(source):
    assert forbidden_imports(source, "ldm.utils", "probe.py"), source
    assert not forbidden_imports(source.replace("models", "diffusion"), "ldm.utils", "probe.py")
