"""Failure policy: what the prolog does when it cannot stage an image (``slurm.failure_policy``).

A user's typo or an unreachable registry must never drain a node, so the prolog always exits 0.
What happens to the job depends on the policy:

* ``record`` (default): the job runs; the error goes to the log, the job's admin comment
  (``hpcsif-error REF: MESSAGE``) and the node's job record, from which the job's own
  ``hpcsif exec REF`` prints it at once instead of trying again;
* ``hold``: as ``record``, and the job is requeued and held (``scontrol requeuehold``), so it
  waits, with the reason visible, until the user or an admin fixes and releases it;
* ``requeue``: as ``record``, and the job is requeued to try again (a transient registry
  outage may be over by then); after :data:`REQUEUE_LIMIT` requeues it is held instead, so a
  lasting error does not requeue it for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpcsif.config import get_config
from hpcsif.errors import ConfigError, HpcsifError
from hpcsif.slurm.jobrecord import AdminComment, ImageOutcome

if TYPE_CHECKING:
    from hpcsif.slurm.client import SlurmClient

log = logging.getLogger(__name__)

POLICIES = ("record", "hold", "requeue")
#: requeues of a job by the ``requeue`` policy before it holds the job instead
REQUEUE_LIMIT = 3


def failure_policy() -> str:
    """The configured policy (``slurm.failure_policy``), validated."""
    policy = str(get_config().get("slurm.failure_policy") or "record").lower()
    if policy not in POLICIES:
        raise ConfigError(f"slurm.failure_policy={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def apply_failure_policy(
    job_id: str, failed: Sequence[ImageOutcome], client: SlurmClient, *, run: int = 0
) -> str:
    """Record ``failed`` on the job (as errors of its restart ``run``) and act per the policy;
    returns the policy applied.

    Problems while recording (Slurm unreachable …) are logged, not raised: the prolog's
    exit status must not depend on them.
    """
    try:
        policy = failure_policy()
    except ConfigError as exc:
        log.error("%s; using 'record'", exc)
        policy = "record"
    for outcome in failed:
        log.error("job %s: cannot stage %s: %s", job_id, outcome.ref, outcome.error)
    try:
        comment = AdminComment.parse(client.job_info(job_id)["admin_comment"])
        for outcome in failed:
            comment.errors[outcome.ref] = outcome.error or "unknown error"
            comment.error_runs[outcome.ref] = run
        client.set_admin_comment(job_id, comment.format())
    except (HpcsifError, OSError) as exc:
        log.error("job %s: cannot record the staging error on the job: %s", job_id, exc)
    if policy == "record":
        return policy
    if policy == "requeue" and run >= REQUEUE_LIMIT:
        log.warning("job %s: staging failed in %d runs; holding it instead of requeueing", job_id, run + 1)
        policy = "hold"
    try:
        client.requeue(job_id, hold=policy == "hold")
        log.warning("job %s: %s because staging failed", job_id, "held" if policy == "hold" else "requeued")
    except (HpcsifError, OSError) as exc:
        log.error("job %s: cannot %s the job: %s", job_id, policy, exc)
    return policy
