"""The job modules load in idle loop turns after start-up, one module per turn."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from qmpjobd.block.jobs import JOB_MODULES, WarmUp
from tests.support.daemons import REPO


def make_modules(tmp_path, names: list[str]) -> None:
    for name in names:
        (tmp_path / f"{name}.py").write_text("import sys\nsys.imported_in_order.append(__name__)\n")


async def test_one_module_per_loop_turn_after_the_delay(tmp_path, monkeypatch) -> None:
    names = ["warm_a", "warm_b", "warm_c"]
    make_modules(tmp_path, names)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "imported_in_order", [], raising=False)
    loop = asyncio.get_running_loop()
    late = WarmUp(loop, tuple(names)).start(delay_s=10)
    await asyncio.sleep(0)
    assert sys.imported_in_order == []          # not before the delay
    late.cancel()
    warm = WarmUp(loop, tuple(names)).start(delay_s=0)
    per_turn = []
    while not warm.done:
        before = len(sys.imported_in_order)
        await asyncio.sleep(0)
        per_turn.append(len(sys.imported_in_order) - before)
    assert sys.imported_in_order == names
    assert max(per_turn) == 1 and sum(per_turn) == 3
    for name in names:
        monkeypatch.delitem(sys.modules, name)


async def test_a_cancelled_warm_up_imports_nothing_more(tmp_path, monkeypatch) -> None:
    make_modules(tmp_path, ["warm_x", "warm_y"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "imported_in_order", [], raising=False)
    warm = WarmUp(asyncio.get_running_loop(), ("warm_x", "warm_y")).start(delay_s=0.01)
    warm.cancel()
    await asyncio.sleep(0.05)
    assert sys.imported_in_order == [] and not warm.done


def test_an_embedded_daemon_has_the_job_modules_soon_after_start() -> None:
    """In a fresh interpreter: none of them at start, all of them a moment later,
    and the job drivers they pull in (mirror, stream) too."""
    script = textwrap.dedent(f"""
        import asyncio, sys
        from qmpjobd.testing import Daemon
        WANTED = {list(JOB_MODULES) + ["qmpjobd.block.jobs.mirror", "qmpjobd.block.jobs.stream"]!r}
        async def main():
            async with Daemon() as daemon:
                at_start = [m for m in WANTED if m in sys.modules]
                client = await daemon.client()
                await client.execute("query-jobs")
                for _ in range(200):
                    if all(m in sys.modules for m in WANTED):
                        break
                    await asyncio.sleep(0.01)
                print(at_start, [m for m in WANTED if m not in sys.modules])
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[] []"
