"""The GLib hash-table replay that decides which unexpected key QEMU names."""
from qmpjobd.qapi.ghash import GHashSet, first_unexpected, g_str_hash, qdict_order, tdb_hash


def test_observed_choices():
    # observed on qemu-storage-daemon 7.2
    assert first_unexpected(["a", "b", "c"], []) == "b"
    assert first_unexpected(["x", "y"], []) == "y"
    assert first_unexpected(["driver", "x", "y"], ["driver"]) == "y"
    assert first_unexpected(["driver", "node-name", "x", "y", "z", "w"], ["driver", "node-name"]) == "z"
    assert first_unexpected(["node-name", "b", "zz", "a"], ["node-name"]) == "zz"


def test_qdict_bucket_order_matches_reply_key_order():
    # QEMU writes {"return", "id"} and {"id", "error"}: same hash model
    assert qdict_order(["id", "return"]) == ["return", "id"]
    assert qdict_order(["error", "id"]) == ["id", "error"]
    assert tdb_hash("return") == 401 and tdb_hash("id") == 486


def test_g_str_hash_is_djb2_on_signed_chars():
    assert g_str_hash("") == 5381
    assert g_str_hash("a") == 5381 * 33 + 97
    assert g_str_hash("\u00e9") == ((5381 * 33 + (0xC3 - 256)) * 33 + (0xA9 - 256)) & 0xFFFFFFFF


def test_table_grows_and_shrinks_but_keeps_every_key():
    table = GHashSet()
    keys = [f"k{i}" for i in range(100)]
    for k in keys:
        table.add(k)
    assert table.size > 8
    for k in keys[:-1]:
        table.remove(k)
    assert table.first() == keys[-1]
    assert table.size == 8
