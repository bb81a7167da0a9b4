"""Every scenario in scenarios/ must give byte-identical transcripts on
qemu-storage-daemon of each QEMU version in CONFORMANCE_VERSIONS and on qmpjobd
as that version, played in the same test run. Each real daemon is its own
expectation: there are no per-version expected transcripts."""

from __future__ import annotations

import difflib

import pytest

from tests.conformance.runner import Player, Scenario, scenario_paths
from tests.support.oracles import CONFORMANCE_VERSIONS


@pytest.mark.parametrize("path", scenario_paths(), ids=lambda p: p.stem)
@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_scenario_matches_qemu(version, path):
    scenario = Scenario.load(path)
    expected = Player(scenario, "qsd", version).play()
    player = Player(scenario, "qmpjobd", version)
    try:
        actual = player.play()
    except Exception as exc:
        pytest.fail(f"{path.name} ({version}): {exc!r}\nqmpjobd stderr:\n{player.stderr}\n"
                    "transcript so far:\n" + "\n".join(player.transcript[-10:]))
    if expected != actual:
        diff = "\n".join(difflib.unified_diff(expected, actual, f"qemu-storage-daemon {version}",
                                              "qmpjobd", lineterm=""))
        pytest.fail(f"transcripts differ for {path.name} ({version}):\n{diff}\n"
                    f"qmpjobd stderr:\n{player.stderr}")
