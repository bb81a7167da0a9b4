"""Every scenario in scenarios/ must give byte-identical transcripts on
qemu-storage-daemon 7.2 and on qmpjobd, played in the same test run."""

from __future__ import annotations

import difflib

import pytest

from tests.conformance.runner import Player, Scenario, scenario_paths


@pytest.mark.parametrize("path", scenario_paths(), ids=lambda p: p.stem)
def test_scenario_matches_qemu(path):
    scenario = Scenario.load(path)
    expected = Player(scenario, "qsd").play()
    player = Player(scenario, "qmpjobd")
    try:
        actual = player.play()
    except Exception as exc:
        pytest.fail(f"{path.name}: {exc!r}\nqmpjobd stderr:\n{player.stderr}\ntranscript so far:\n"
                    + "\n".join(player.transcript[-10:]))
    if expected != actual:
        diff = "\n".join(difflib.unified_diff(expected, actual, "qemu-storage-daemon", "qmpjobd", lineterm=""))
        pytest.fail(f"transcripts differ for {path.name}:\n{diff}\nqmpjobd stderr:\n{player.stderr}")
