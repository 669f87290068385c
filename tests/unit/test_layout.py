"""The package layout: one installed package, `segs`, whose stages the tree shows.

`cli/` and `schema/` stay top-level folders of the repository but install as ``segs.cli`` and
``segs.schema`` (pyproject.toml, ``package-dir``); a package listed there by hand is easy to
forget when a stage folder is added, so this checks the list against the tree.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed_in_pyproject() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "segs").rglob("__init__.py")}
    assert found | {"segs.cli", "segs.schema"} == _listed()


def test_cli_and_schema_install_inside_segs_not_at_top_level(tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, sys\n"
        "print(u.find_spec('cli') is None, u.find_spec('schema') is None)\n"
        "print(u.find_spec('segs.cli.main').origin)\n"
        "from importlib import resources\n"
        "print(sum(f.name.endswith('.sql') for f in resources.files('segs.schema').iterdir()))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[0] == "True True"
    assert Path(out[1]) == ROOT / "cli" / "main.py"
    assert int(out[2]) == len(list((ROOT / "schema").glob("*.sql")))


def test_unit_tests_mirror_the_package() -> None:
    stages = {p.name for p in (ROOT / "segs").iterdir() if (p / "__init__.py").exists()}
    unit = {p.name for p in (ROOT / "tests" / "unit").iterdir()
            if p.is_dir() and (p / "__init__.py").exists()}
    assert unit - {"cli", "deploy"} <= stages
