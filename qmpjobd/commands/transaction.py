"""The ``transaction`` command, and the action registry other commands plug into.

QEMU 7.2's algorithm (job-lifecycle.md section 8); what 8.1 changed is listed after:

1. ``grouped`` completion mode makes one JobTxn shared by every job the actions create.
2. All nodes are drained once (drain artefacts: running jobs show ``paused, running``).
3. Actions prepare in order; the first failure stops the loop. In 7.2 the grouped-mode
   check runs inside each non-backup action's own prepare, so earlier actions may
   already have created jobs.
4. On success every action commits in order (backup jobs start); on failure the
   prepared actions are rolled back newest first (a created job goes
   ``aborting, concluded, null``).
5. Every action's clean step runs in order (ends its drained section).

QEMU 8.1 moved qmp_transaction onto util/transactions.c (first seen here in 10.0):

* ``TXN_NEWEST_FIRST``: tran_add() puts each action at the head of a list that
  commit, abort and clean all walk, so the last action commits (its job starts)
  first and its clean step (drain end) runs first. Abort was newest first already.
* ``TXN_GROUPED_CHECKED_FIRST``: grouped mode is checked for every action before the
  drain and before any action runs (so no job is created), and only the backup
  actions pass; the text says "transaction property" in lower case.

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
from qmpjobd.versions import Behaviour

INDIVIDUAL = "individual"

# The behaviour table of this layer (see the module docstring). QEMU commits
# 8187f63c9c and c85f34cf89, 2023-05-10, between 8.0 and 8.1.
TXN_NEWEST_FIRST = Behaviour(
    "transaction actions commit and clean up newest first", since="8.1")
TXN_GROUPED_CHECKED_FIRST = Behaviour(
    "grouped completion mode is checked for all actions before any runs", since="8.1")


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
    # QEMU lets the action join a grouped transaction (the backup actions).
    supports_grouped: bool
    # 7.2 checked the completion mode in the action's own prepare (abort did not).
    checks_mode_itself: bool = True


ACTIONS: dict[str, ActionSpec] = {}


def register_action(kind: str, prepare: PrepareFn, *, supports_grouped: bool = False,
                    checks_mode_itself: bool = True) -> None:
    """Make ``kind`` usable in ``transaction`` (and by ``run_transaction``)."""
    if kind in ACTIONS:
        raise RuntimeError(f"transaction action {kind} registered twice")
    ACTIONS[kind] = ActionSpec(prepare, supports_grouped, checks_mode_itself)


def check_completion_mode(actx: ActionContext) -> None:
    """7.2's per-action refusal of grouped mode (note the capital T)."""
    if actx.completion_mode != INDIVIDUAL:
        raise QMPError(f"Action '{actx.kind}' does not support Transaction property "
                       f"completion-mode = {actx.completion_mode}")


def check_completion_modes_first(kinds: list[str], mode: str) -> None:
    """8.1's refusal of grouped mode, for every action before any runs."""
    if mode == INDIVIDUAL:
        return
    for kind in kinds:
        spec = ACTIONS.get(kind)
        if spec is None or not spec.supports_grouped:
            raise QMPError(f"Action '{kind}' does not support transaction property "
                           f"completion-mode = {mode}")


def _prepare(actx: ActionContext, data: dict, action: TxnAction,
             mode_checked: bool) -> None:
    spec = ACTIONS.get(actx.kind)
    if not mode_checked and (spec is None or (not spec.supports_grouped
                                              and spec.checks_mode_itself)):
        check_completion_mode(actx)
    if spec is None:
        raise QMPError(f"Action '{actx.kind}' is not supported by qmpjobd")
    spec.prepare(actx, data, action)


def run_transaction(ctx: Context, actions: list[tuple[str, dict]],
                    properties: dict | None = None) -> dict:
    """Prepare every action, then commit all or roll back all; clean up either way."""
    mode = (properties or {}).get("completion-mode", INDIVIDUAL)
    daemon = ctx.daemon
    # The graph's personality is the daemon's (tests may hand in a bare graph).
    personality = daemon.graph.personality
    checked_first = personality.has(TXN_GROUPED_CHECKED_FIRST)
    if checked_first:
        check_completion_modes_first([kind for kind, _data in actions], mode)
    job_txn = JobTxn() if mode != INDIVIDUAL else None
    # QEMU drains every node before any action (bdrv_drain_all).
    daemon.graph.graph_changes("drain-all")
    prepared: list[TxnAction] = []
    failure: QMPError | None = None
    for kind, data in actions:
        action = TxnAction(kind, data)
        prepared.append(action)
        try:
            _prepare(ActionContext(ctx, kind, mode, job_txn), data, action, checked_first)
        except QMPError as err:
            failure = err
            break
    # The order commit and clean walk the actions in; abort is newest first always.
    walk = list(reversed(prepared)) if personality.has(TXN_NEWEST_FIRST) else prepared
    if failure is None:
        for action in walk:
            action.commit()
    else:
        for action in reversed(prepared):
            action.abort()
    for action in walk:
        action.clean()
    if failure is not None:
        raise failure
    return {}


def _prepare_abort(actx: ActionContext, data: dict, action: TxnAction) -> None:
    raise QMPError("Transaction aborted using Abort action")


# The abort action does not check the completion mode in 7.2; from 8.1 on the
# up-front check refuses it in a grouped transaction like any non-backup action.
register_action("abort", _prepare_abort, checks_mode_itself=False)


@command("transaction")
def transaction(ctx: Context, args: dict) -> dict:
    actions = [(item["type"], item.get("data", {})) for item in args["actions"]]
    return run_transaction(ctx, actions, args.get("properties"))
