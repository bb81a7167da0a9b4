"""Control commands: capabilities negotiation, version, introspection, quit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpjobd.commands import HANDLERS, Context, command

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.daemon import Daemon
    from qmpjobd.job.job import Job


def version_info(daemon: "Daemon") -> dict:
    """The VersionInfo value shared by the greeting and query-version: the release
    the daemon impersonates (micro 0) and a `package` naming qmpjobd and that
    personality. Clients such as qmp-shell read the three numbers from the greeting."""
    return daemon.personality.version_info()


@command("qmp_capabilities")
def qmp_capabilities(ctx: Context, args: dict) -> dict:
    ctx.session.negotiate(args.get("enable", []))
    return {}


@command("query-version")
def query_version(ctx: Context, args: dict) -> dict:
    return version_info(ctx.daemon)


@command("query-commands")
def query_commands(ctx: Context, args: dict) -> list:
    # QEMU lists commands in reverse registration order.
    names = [n for n in ctx.daemon.schema.command_names_registration_order() if n in HANDLERS]
    return [{"name": name} for name in reversed(names)]


@command("query-qmp-schema")
def query_qmp_schema(ctx: Context, args: dict) -> list:
    return ctx.daemon.schema.introspect(commands=HANDLERS)


@command("quit")
def quit_(ctx: Context, args: dict) -> dict:
    # As in qemu-storage-daemon, every job is cancelled before the reply goes out:
    # their events come first. The server then closes every connection and exits.
    begin_shutdown(ctx.daemon)
    ctx.daemon.quit_requested = True
    return {}


def begin_shutdown(daemon: "Daemon") -> bool:
    """What qemu-storage-daemon does once its main loop ends (quit, SIGTERM, SIGINT,
    SIGHUP): delete every export, drain every node, then force-cancel every job,
    newest first.

    Idempotent. Runs as far as it can without waiting for I/O; the server awaits
    the rest (``JobManager.finish_shutdown``). Returns True once no job is left.
    """
    graph, jobs = daemon.graph, daemon.jobs
    from qmpjobd.nbd.exports import close_exports  # only here: keeps start-up lean

    close_exports(daemon)
    if daemon.faults is not None:
        # Test controls: no hold may keep a job from stopping.
        daemon.faults.release_all()
    return jobs.begin_shutdown(quiesce_all=graph.drained_begin,
                               quiesced=lambda: _all_quiesced(graph, jobs.jobs))


def _all_quiesced(graph: "BlockGraph", jobs: "list[Job]") -> bool:
    """bdrv_drain_all_begin's poll condition: no request in flight on any node, and
    every job stopped where it cannot issue one.

    The second half is stricter than the graph's own drain test on purpose: a job
    waiting for its thread-pool copies is not ``busy`` in qmpjobd, while in QEMU
    those copies keep the drain waiting until the job reaches its pause point. At
    exit that decides whether a job shows ``paused``/``running`` before
    ``aborting``, as it does on qemu-storage-daemon.
    """
    if any(node.in_flight or any(job.drained_poll() for job in node.job_users)
           for node in graph.nodes.values()):
        return False
    return all(job.paused or job.is_completed or job.deferred or not job.started
               or job.is_cancelled for job in jobs)

