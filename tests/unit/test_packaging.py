"""The wheel: what `pip install .` puts on a machine works outside the checkout.

The migrations live in the repo's top-level `sql/` and ship as `maga_tasks.sql`; an
installed `maga db upgrade` must find them without the source tree. The fresh venv gets
the wheel without dependencies and borrows them from the project venv through a path
entry (not its `.pth` files, so the editable install of the checkout stays out of it).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "-w", str(out), str(REPO),
        ],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("maga_tasks-*.whl")
    return built


def test_wheel_carries_every_subpackage_recipes_and_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(REPO)) for p in (REPO / "maga_tasks").rglob("*.py")}
    assert sources <= names, f"not in the wheel: {sorted(sources - names)}"
    migrations = {f"maga_tasks/sql/{p.name}" for p in (REPO / "sql").glob("*.sql")}
    assert migrations and migrations <= names
    assert {"maga_tasks/recipes/default.yaml", "maga_tasks/recipes/tiny.yaml"} <= names


def test_installed_wheel_upgrades_a_new_database_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "fresh-venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    )
    site = Path(purelib.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # Outside the checkout means without a PYTHONPATH that points into it, too (with one,
    # pip finds the checkout's package "already installed" and installs nothing).
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300, env=env,
    )
    where = subprocess.check_output(
        [str(python), "-c", "import maga_tasks; print(maga_tasks.__file__)"], cwd=tmp_path, text=True, env=env
    )
    assert where.startswith(str(site)), where

    database = tmp_path / "new.sqlite"
    done = subprocess.run(
        [str(env_dir / "bin" / "maga"), "db", "upgrade", "--registry", str(database)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    rows = sqlite3.connect(database).execute("SELECT version FROM schema_version ORDER BY version")
    versions = [row[0] for row in rows]
    assert versions == sorted({int(p.name[:4]) for p in (REPO / "sql").glob("*.sql")})  # one file per dialect
