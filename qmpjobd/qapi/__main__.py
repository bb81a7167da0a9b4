"""``python -m qmpjobd.qapi --json-schema FILE``: write the derived JSON Schema."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..versions import KNOWN_VERSIONS
from . import SCHEMA_DEFAULT_VERSION, Schema


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmpjobd.qapi",
                                 description="Tools for the qmpjobd QAPI schema.")
    ap.add_argument("--schema-dir", type=Path, default=None,
                    help="directory holding qapi-schema.json (default: the bundled one)")
    ap.add_argument("--qemu-version", choices=KNOWN_VERSIONS, default=SCHEMA_DEFAULT_VERSION,
                    help="the QEMU version whose view of the schema to write "
                         f"(default {SCHEMA_DEFAULT_VERSION})")
    ap.add_argument("--json-schema", metavar="FILE",
                    help="write the JSON Schema of all command arguments ('-' = stdout)")
    ap.add_argument("--introspect", metavar="FILE",
                    help="write the query-qmp-schema value ('-' = stdout)")
    args = ap.parse_args(argv)
    schema = Schema.load(args.schema_dir, version=args.qemu_version)
    for target, value in ((args.json_schema, schema.json_schema),
                          (args.introspect, schema.introspect)):
        if target is None:
            continue
        text = json.dumps(value(), indent=2) + "\n"
        if target == "-":
            sys.stdout.write(text)
        else:
            Path(target).write_text(text, encoding="utf-8")
    if args.json_schema is None and args.introspect is None:
        ap.print_usage(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
