"""The stubs match the native module, and typed code using the package type-checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples" / "python"


def python_module(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` in an empty directory (no stray config, a private mypy cache)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True)


def test_stubs_match_the_native_module(tmp_path: Path) -> None:
    stubtest = python_module(tmp_path, "mypy.stubtest", "kici_agent")
    assert stubtest.returncode == 0, stubtest.stdout + stubtest.stderr


def test_the_example_and_the_tests_type_check_strictly(tmp_path: Path) -> None:
    mypy = python_module(tmp_path, "mypy", "--strict", str(EXAMPLES), str(HERE))
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr


def test_the_package_is_marked_typed() -> None:
    import kici_agent

    assert (Path(kici_agent.__file__).parent / "py.typed").exists()
    assert (Path(kici_agent.__file__).parent / "_native.pyi").exists()
