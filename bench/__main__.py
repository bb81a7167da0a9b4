"""``python -m bench``: the side-by-side benchmark suite (see bench/cli.py)."""

from bench.cli import main

raise SystemExit(main())
