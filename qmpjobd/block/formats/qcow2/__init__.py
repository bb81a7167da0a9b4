"""qcow2, qmpjobd's own implementation (no QEMU code): header, tables, allocation,
creation. See image.py for the crash-safety rules and create.py for creation."""
