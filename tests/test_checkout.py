"""The checkout's own tooling gives the same answer wherever the repository lives.

The repository root *is* the ``shopreel`` package, so tools that guess a project's first-party
package from its layout guess from the checkout folder's name instead: a clone named ``shopreel``
(``git clone``'s default) once sorted imports differently from one named otherwise. These tests copy
the working tree (tracked and untracked, not ignored) into folders of both kinds and lint each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return found


def _copy_working_tree(destination: Path) -> None:
    """Copy the files git would commit (tracked, plus untracked that .gitignore does not exclude)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing tells the repository's files from build output")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a deleted-but-tracked file is listed too
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.parametrize("folder", ["shopreel", "checkout"])
def test_lint_passes_whatever_the_clone_folder_is_called(tmp_path: Path, folder: str) -> None:
    clone = tmp_path / folder
    _copy_working_tree(clone)
    result = subprocess.run(
        [_ruff(), "check", "--no-cache", "."], cwd=clone, capture_output=True, text=True
    )
    assert result.returncode == 0, f"ruff in a clone named {folder!r}:\n{result.stdout}{result.stderr}"


def test_readme_and_package_need_nothing_outside_the_repository() -> None:
    """A user's clone has no sibling folders: the README must not send them to one."""
    readme = (ROOT / "README.md").read_text()
    outside = re.findall(r"(?:^|[\s(`'\"])(\.\./\S*)", readme, flags=re.MULTILINE)
    assert not outside, f"README points outside the repository: {outside}"
    assert (ROOT / "docs" / "architecture.md").is_file()
