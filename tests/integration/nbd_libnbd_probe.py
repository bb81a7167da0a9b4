"""Run by the system python3 (the libnbd module ``nbd`` is a Debian package the
project venv does not see): connects to an NBD URI and prints, as JSON, what
libnbd saw of the protocol corners the tests compare between daemons.

Usage: python3 nbd_libnbd_probe.py URI [writable]
"""

import json
import sys

import nbd


def attempt(results, name, fn):
    try:
        value = fn()
        results[name] = value if isinstance(value, (int, str, list, bool, type(None))) else repr(value)
    except nbd.Error as exc:
        results[name] = ["error", exc.string, exc.errno]


def main():
    uri = sys.argv[1]
    writable = len(sys.argv) > 2
    results = {}
    handle = nbd.NBD()
    for context in ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:none"):
        handle.add_meta_context(context)
    handle.connect_uri(uri)
    for what in ("get_size", "is_read_only", "can_multi_conn", "can_flush", "can_fua",
                 "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache",
                 "is_rotational", "get_structured_replies_negotiated", "get_protocol"):
        attempt(results, what, getattr(handle, what))
    for context in ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:none"):
        attempt(results, "meta " + context, lambda c=context: handle.can_meta_context(c))
    for size in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM):
        attempt(results, f"block size {size}", lambda s=size: handle.get_block_size(s))
    seen = []

    def status(context, offset, entries, err):
        seen.append([context, offset, list(entries)])
        return 0

    attempt(results, "block_status", lambda: handle.block_status(handle.get_size(), 0, status))
    results["extents"] = seen
    seen_one = []

    def status_one(context, offset, entries, err):
        seen_one.append([context, offset, list(entries)])
        return 0

    attempt(results, "block_status req_one", lambda: handle.block_status(
        handle.get_size(), 0, status_one, nbd.CMD_FLAG_REQ_ONE))
    results["extents req_one"] = seen_one
    chunks = []

    def chunk(subbuf, offset, kind, err):
        chunks.append([offset, kind, len(subbuf), sorted(set(bytes(subbuf)))[:3]])
        return 0

    attempt(results, "pread_structured", lambda: handle.pread_structured(262144, 0, chunk))
    results["chunks"] = chunks
    chunks_df = []
    attempt(results, "pread_structured df", lambda: handle.pread_structured(
        131072, 0, lambda b, o, k, e: chunks_df.append([o, k, len(b)]) or 0, nbd.CMD_FLAG_DF))
    results["chunks df"] = chunks_df
    attempt(results, "pread past end", lambda: handle.pread(512, handle.get_size()))
    attempt(results, "pread fua", lambda: len(handle.pread(4096, 0, nbd.CMD_FLAG_FUA)))
    if writable:
        attempt(results, "pwrite", lambda: handle.pwrite(b"x" * 4096, 1048576))
        attempt(results, "pwrite fua", lambda: handle.pwrite(b"y" * 4096, 1052672, nbd.CMD_FLAG_FUA))
        attempt(results, "zero fast", lambda: handle.zero(65536, 2097152, nbd.CMD_FLAG_FAST_ZERO))
        attempt(results, "zero no_hole", lambda: handle.zero(65536, 2162688, nbd.CMD_FLAG_NO_HOLE))
        attempt(results, "trim", lambda: handle.trim(65536, 3145728))
        attempt(results, "trim fua", lambda: handle.trim(65536, 3211264, nbd.CMD_FLAG_FUA))
        attempt(results, "read back", lambda: sorted(set(handle.pread(8192, 1048576))))
    attempt(results, "flush", handle.flush)
    attempt(results, "cache", lambda: handle.cache(65536, 0))
    handle.shutdown()
    print(json.dumps(results, sort_keys=True))


main()
