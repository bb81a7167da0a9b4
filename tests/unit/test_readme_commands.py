"""The README's commands table is generated from the real daemons' captured
query-commands and qmpjobd's own per personality; this keeps it true."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_commands_table_is_current():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "commands_table.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
