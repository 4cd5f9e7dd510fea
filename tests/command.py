"""Running the real ``moot`` command from tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The installed console script, next to the interpreter running the tests.
MOOT = str(Path(sys.executable).parent / "moot")
#: The repository root: tests run commands from here, so ``tests.*`` modules import.
ROOT = Path(__file__).resolve().parent.parent


def moot(
    db: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``moot --db DB ARGS...`` to completion, output captured."""
    return subprocess.run(
        [MOOT, "--db", str(db), *args],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
