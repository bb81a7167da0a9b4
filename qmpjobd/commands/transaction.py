"""The ``transaction`` command, and the action registry other commands plug into.

QEMU 7.2's algorithm (job-lifecycle.md section 8):

1. ``grouped`` completion mode makes one JobTxn shared by every job the actions create.
2. All nodes are drained once (drain artefacts: running jobs show ``paused, running``).
3. Actions prepare in order; the first failure stops the loop. In 7.2 the grouped-mode
   check runs inside each non-backup action's own prepare, so earlier actions may
   already have created jobs.
4. On success every action commits in order (backup jobs start); on failure the
   prepared actions are rolled back newest first (a created job goes
   ``aborting, concluded, null``).
5. Every action's clean step runs in order (ends its drained section).

An action is registered with ``register_action(kind, prepare_fn, supports_grouped=...)``.
``prepare_fn(actx, data, action)`` does the checks and the reversible work, raising
QMPError on failure, and registers what to do next on ``action``:
``action.on_commit(fn)``, ``action.on_abort(fn)``, ``action.on_clean(fn)``. Clean steps
registered before a failure still run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError
from qmpjobd.job.txn import JobTxn

INDIVIDUAL = "individual"


@dataclass
class ActionContext:
    """What a prepare function may use besides its own arguments."""

    ctx: Context
    kind: str
    completion_mode: str
    # The shared JobTxn in grouped mode; None means "each job gets its own".
    job_txn: JobTxn | None

    @property
    def daemon(self) -> Any:
        return self.ctx.daemon


@dataclass
class TxnAction:
    """One action of a running transaction: the steps its prepare registered."""

    kind: str
    data: dict
    commit_steps: list[Callable[[], None]] = field(default_factory=list)
    abort_steps: list[Callable[[], None]] = field(default_factory=list)
    clean_steps: list[Callable[[], None]] = field(default_factory=list)

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.commit_steps.append(fn)

    def on_abort(self, fn: Callable[[], None]) -> None:
        self.abort_steps.append(fn)

    def on_clean(self, fn: Callable[[], None]) -> None:
        self.clean_steps.append(fn)

    def commit(self) -> None:
        for step in self.commit_steps:
            step()

    def abort(self) -> None:
        for step in reversed(self.abort_steps):
            step()

    def clean(self) -> None:
        for step in self.clean_steps:
            step()


PrepareFn = Callable[[ActionContext, dict, TxnAction], None]


@dataclass
class ActionSpec:
    prepare: PrepareFn
    supports_grouped: bool


ACTIONS: dict[str, ActionSpec] = {}


def register_action(kind: str, prepare: PrepareFn, *, supports_grouped: bool = False) -> None:
    """Make ``kind`` usable in ``transaction`` (and by ``run_transaction``)."""
    if kind in ACTIONS:
        raise RuntimeError(f"transaction action {kind} registered twice")
    ACTIONS[kind] = ActionSpec(prepare, supports_grouped)


def check_completion_mode(actx: ActionContext) -> None:
    """7.2's per-action refusal of grouped mode (note the capital T)."""
    if actx.completion_mode != INDIVIDUAL:
        raise QMPError(f"Action '{actx.kind}' does not support Transaction property "
                       f"completion-mode = {actx.completion_mode}")


def _prepare(actx: ActionContext, data: dict, action: TxnAction) -> None:
    spec = ACTIONS.get(actx.kind)
    if spec is None or not spec.supports_grouped:
        check_completion_mode(actx)
    if spec is None:
        raise QMPError(f"Action '{actx.kind}' is not supported by qmpjobd")
    spec.prepare(actx, data, action)


def run_transaction(ctx: Context, actions: list[tuple[str, dict]],
                    properties: dict | None = None) -> dict:
    """Prepare every action, then commit all or roll back all; clean up either way."""
    mode = (properties or {}).get("completion-mode", INDIVIDUAL)
    job_txn = JobTxn() if mode != INDIVIDUAL else None
    daemon = ctx.daemon
    if daemon.options.drain_artefacts:
        # QEMU drains every node before any action (bdrv_drain_all).
        daemon.graph.drained_begin()
        daemon.graph.drained_end()
    prepared: list[TxnAction] = []
    failure: QMPError | None = None
    for kind, data in actions:
        action = TxnAction(kind, data)
        prepared.append(action)
        try:
            _prepare(ActionContext(ctx, kind, mode, job_txn), data, action)
        except QMPError as err:
            failure = err
            break
    if failure is None:
        for action in prepared:
            action.commit()
    else:
        for action in reversed(prepared):
            action.abort()
    for action in prepared:
        action.clean()
    if failure is not None:
        raise failure
    return {}


def _prepare_abort(actx: ActionContext, data: dict, action: TxnAction) -> None:
    raise QMPError("Transaction aborted using Abort action")


# The abort action does not check the completion mode in 7.2.
register_action("abort", _prepare_abort, supports_grouped=True)


@command("transaction")
def transaction(ctx: Context, args: dict) -> dict:
    actions = [(item["type"], item.get("data", {})) for item in args["actions"]]
    return run_transaction(ctx, actions, args.get("properties"))
