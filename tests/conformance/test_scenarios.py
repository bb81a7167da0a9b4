"""Every scenario in scenarios/ must give byte-identical transcripts on
qemu-storage-daemon of each QEMU version in CONFORMANCE_VERSIONS and on qmpjobd
as that version, played in the same test run. Each real daemon is its own
expectation: there are no per-version expected transcripts."""

from __future__ import annotations

import difflib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conformance.runner import Player, Scenario, scenario_paths
from tests.support.oracles import CONFORMANCE_VERSIONS


@pytest.mark.parametrize("path", scenario_paths(), ids=lambda p: p.stem)
@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_scenario_matches_qemu(version, path):
    scenario = Scenario.load(path)
    player = Player(scenario, "qmpjobd", version)
    # The two daemons play at the same time: each has its own directory and
    # sockets, and most of a scenario's time is settle/wait silence, not CPU.
    with ThreadPoolExecutor(max_workers=1) as pool:
        oracle = pool.submit(Player(scenario, "qsd", version).play)
        try:
            actual = player.play()
        except Exception as exc:
            pytest.fail(f"{path.name} ({version}): {exc!r}\nqmpjobd stderr:\n{player.stderr}\n"
                        "transcript so far:\n" + "\n".join(player.transcript[-10:]))
        expected = oracle.result()
    if expected != actual:
        diff = "\n".join(difflib.unified_diff(expected, actual, f"qemu-storage-daemon {version}",
                                              "qmpjobd", lineterm=""))
        pytest.fail(f"transcripts differ for {path.name} ({version}):\n{diff}\n"
                    f"qmpjobd stderr:\n{player.stderr}")
