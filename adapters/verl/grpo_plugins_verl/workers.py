"""The actor worker of a run whose methods read the old-policy probe: verl's ``ActorRolloutRefWorker`` with
one more registered method (:mod:`grpo_plugins_verl.probe`). The ``grpo_plugins`` trainer builds the actor
worker group from it when a method declares a probe; it behaves exactly as verl's worker otherwise."""

from __future__ import annotations

from typing import Any

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from grpo_plugins_verl.probe import ProbeJob, requests, run_job


class ProbeActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` plus ``probe_old_policy``."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def probe_old_policy(self, job: ProbeJob) -> dict | None:
        """Every actor rank runs ``job`` over the global chunk plan (:func:`~grpo_plugins_verl.probe.run_job`);
        rank 0 returns the result, the others None."""
        return run_job(self.actor.engine, job)


def use_probe_worker(role_worker_mapping: dict, composition: Any) -> None:
    """Build the actor's worker group (not a separate reference group) from :class:`ProbeActorRolloutRefWorker`
    when a method of ``composition`` reads a probe (verl's ``_init_resource_pool_mgr`` mapping, in place)."""
    import ray
    from verl.trainer.ppo.utils import Role

    if not requests(composition):
        return
    for role in (Role.ActorRolloutRef, Role.ActorRollout, Role.Actor):
        cls = role_worker_mapping.get(role)
        if cls is not None and getattr(cls, "__ray_actor_class__", None) is ActorRolloutRefWorker:
            role_worker_mapping[role] = ray.remote(ProbeActorRolloutRefWorker)
