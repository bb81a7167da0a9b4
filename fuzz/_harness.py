"""What the fuzzers share: running under atheris (coverage-guided, libFuzzer flags) or,
without it, replaying files given on the command line (to reproduce a crash)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class Bug(AssertionError):
    """A property the code under test must keep was broken: a crash for the fuzzer."""


def run(one_input: Callable[[bytes], None], instrumented: Callable[[], None]) -> None:
    """Fuzz ``one_input`` with atheris, importing qmpjobd under its instrumentation via
    ``instrumented()``; without atheris, replay the files named in ``sys.argv``."""
    try:
        import atheris
    except ImportError:
        instrumented()
        files = [a for a in sys.argv[1:] if not a.startswith("-")]
        if not files:
            sys.exit("atheris is not installed (pip install -e '.[fuzz]'); "
                     "without it, name input files to replay")
        for name in files:
            paths = sorted(Path(name).iterdir()) if Path(name).is_dir() else [Path(name)]
            for path in paths:
                one_input(path.read_bytes())
        print(f"replayed {len(files)} input(s): no failure")
        return
    with atheris.instrument_imports(include=["qmpjobd"]):
        instrumented()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
