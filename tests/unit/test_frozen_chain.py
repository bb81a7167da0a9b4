"""Frozen backing links (QEMU's bdrv_freeze_backing_chain): while frozen, every
link change through the graph is refused with QEMU's texts; unfreezing frees it."""

from __future__ import annotations

import pytest

from qmpjobd.block.graph import (BlockGraph, chain_links, check_link_unfrozen,
                                 freeze_chain, unfreeze_links)
from qmpjobd.errors import QMPError
from qmpjobd.job.manager import JobManager


@pytest.fixture
def chain() -> tuple[BlockGraph, list]:
    """base <- mid <- top, linked through set_backing (null-co nodes)."""
    graph = BlockGraph(jobs=JobManager(lambda name, data: None, clock=None))
    nodes = [graph.add({"driver": "null-co", "node-name": name, "size": 4096})
             for name in ("base", "mid", "top", "other")]
    for node in nodes:
        # null-co has no COW child of its own; these stand in for qcow2 nodes.
        node.backing_node = lambda node=node: node.children.get("backing")
    base, mid, top, _ = nodes
    BlockGraph.set_backing(mid, base)
    BlockGraph.set_backing(top, mid)
    return graph, nodes


def error_of(fn, *args) -> str:
    with pytest.raises(QMPError) as info:
        fn(*args)
    return info.value.desc


def test_chain_links_stop_at_the_given_node(chain) -> None:
    _, (base, mid, top, _) = chain
    assert chain_links(top, mid) == [(top, "backing")]
    assert chain_links(top, base) == [(top, "backing"), (mid, "backing")]
    assert chain_links(top, None) == [(top, "backing"), (mid, "backing")]


def test_frozen_link_refuses_set_backing_with_qemus_text(chain) -> None:
    _, (base, mid, top, other) = chain
    links = freeze_chain(top, mid)
    assert error_of(BlockGraph.set_backing, top, other) == \
        "Cannot change frozen 'backing' link from 'top' to 'mid'"
    assert error_of(BlockGraph.set_backing, top, None) == \
        "Cannot change frozen 'backing' link from 'top' to 'mid'"
    assert top.children["backing"] is mid
    # Setting the link to what it is changes nothing and is allowed; the link
    # below the frozen part stays free.
    BlockGraph.set_backing(top, mid)
    BlockGraph.set_backing(mid, other)
    unfreeze_links(links)
    BlockGraph.set_backing(top, other)
    assert top.children["backing"] is other


def test_frozen_link_refuses_relink(chain) -> None:
    graph, (base, mid, top, other) = chain
    links = freeze_chain(top, base)
    assert error_of(graph.relink_child, mid, base, other) == \
        "Cannot change 'backing' link to 'base'"
    assert mid.children["backing"] is base and mid in base.parent_nodes
    unfreeze_links(links)
    graph.relink_child(mid, base, other)
    assert mid.children["backing"] is other


def test_freezing_a_frozen_link_again_is_refused(chain) -> None:
    _, (base, mid, top, _) = chain
    freeze_chain(mid, base)
    assert error_of(freeze_chain, top, base) == \
        "Cannot change 'backing' link from 'mid' to 'base'"
    # The refused freeze froze nothing: top's link is still free.
    check_link_unfrozen(top, "backing")


def test_two_freezes_of_one_link_need_two_unfreezes(chain) -> None:
    _, (base, mid, top, _) = chain
    first = freeze_chain(top, mid)
    unfreeze_links(first)
    first, second = freeze_chain(top, mid), None
    # A second job cannot freeze it while the first holds it ...
    with pytest.raises(QMPError):
        second = freeze_chain(top, mid)
    assert second is None
    unfreeze_links(first)
    # ... and once released nothing is left frozen.
    check_link_unfrozen(top, "backing")
