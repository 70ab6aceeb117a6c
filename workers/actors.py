"""The Ray actors of one EP group, and every call to all of them under the group's failure rule.

NCCL and gloo process groups do not survive the loss of a member, so the group fails as a unit: when a
worker dies, raises (other than on bad input) or outlives a call's timeout, every worker is killed and the
call raises `WorkerFailure` or `StepTimeout`; the owner then creates a new group.
"""

from __future__ import annotations

import contextlib
import time
from typing import NoReturn

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .compiled_steps import CompiledSteps
from .group_config import GroupConfig
from .worker import ExpertWorker

__all__ = ["WorkerActors", "GroupError", "WorkerFailure", "StepTimeout"]

_RemoteWorker = ray.remote(ExpertWorker)


class GroupError(RuntimeError):
    """The group cannot serve (any more); create a new one."""


class WorkerFailure(GroupError):
    """A worker died or raised during a call; the group has been torn down."""


class StepTimeout(GroupError):
    """A call did not finish within its timeout; the group has been torn down."""


def _cause(err: Exception) -> BaseException:
    """The worker-side exception inside a RayTaskError (so callers see ValueError, not a wrapper)."""
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return err


class WorkerActors:
    """One `ExpertWorker` actor per rank in a placement group of one bundle each; `call` waits for one call
    per worker, `graph_call` runs a step through the group's compiled graph (`compiled_steps.py`)."""

    def __init__(self, actors: list, pg) -> None:
        self.actors, self._pg = actors, pg
        self.compiled = CompiledSteps(actors)
        self.pids: list[int] = []  # the workers' process ids, once their setup reported them
        self.broken: str | None = None  # why the group is unusable, once it is

    @classmethod
    def start(cls, config: GroupConfig, num_workers: int) -> WorkerActors:
        """Reserve the bundles (or fail within `timeouts.setup_s`, naming the cluster's resources) and start
        one actor per bundle."""
        timeouts = config.timeouts
        bundle = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.device == "cuda" else {})}
        pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy=config.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=timeouts.setup_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise GroupError(
                f"placement group: {num_workers} bundles of {bundle} ({config.placement_strategy}) could not be "
                f"scheduled within {timeouts.setup_s:.0f} s; cluster resources: {ray.cluster_resources()}"
            ) from None
        actors = [
            _RemoteWorker.options(
                num_cpus=config.cpus_per_worker,
                num_gpus=1 if config.device == "cuda" else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank, num_workers)
            for rank in range(num_workers)
        ]
        return cls(actors, pg)

    def check_usable(self) -> None:
        if self.broken is not None:
            raise GroupError(f"this group is unusable ({self.broken}); create a new one with EPGroup.create")

    def call(self, refs: list, timeout_s: float, what: str) -> list:
        """Wait for one call per worker; on the first failure or at the timeout, tear the group down.

        Each result is fetched once, as it arrives (a decode step is short enough for every extra Ray
        round trip to show); the last one outstanding is fetched without a `ray.wait` before it.
        """
        deadline = time.monotonic() + timeout_s
        results: dict[int, object] = {}
        pending = list(refs)
        while pending:
            left = max(deadline - time.monotonic(), 0)
            ready = pending[:1]
            if len(pending) > 1:
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            else:
                pending = []
            if not ready:
                self.timed_out(what, [refs.index(r) for r in pending], timeout_s)
            rank = refs.index(ready[0])
            try:
                results[rank] = ray.get(ready[0], timeout=left)
            except GetTimeoutError:
                self.timed_out(what, [rank], timeout_s)
            except (RayActorError, RayTaskError) as err:
                self.failed(what, rank, err)
        return [results[i] for i in range(len(refs))]

    def timed_out(self, what: str, stuck: list[int], timeout_s: float) -> NoReturn:
        self.teardown(f"{what} timed out")
        raise StepTimeout(f"{what}: workers {stuck} did not answer within {timeout_s:.0f} s; the group was torn down")

    def failed(self, what: str, rank: int, err: Exception) -> NoReturn:
        """Tear down after worker `rank` died or raised; a bad-input error keeps its own type and message.

        A worker's collective fails as soon as a peer's process is gone, often before Ray reports the
        death, so a worker that raised anything but bad input is blamed only when no peer is dead.
        """
        cause = _cause(err)
        if not isinstance(err, RayActorError) and not isinstance(cause, (ValueError, KeyError, TypeError)):
            dead = self.dead_ranks()
            if dead:
                rank, err = dead[0]
        if isinstance(err, RayActorError):
            self.teardown(f"worker {rank} died during {what}")
            raise WorkerFailure(
                f"{what}: worker {rank} died ({type(err).__name__}); the group was torn down, "
                f"create a new one with EPGroup.create"
            ) from err
        self.teardown(f"worker {rank} failed during {what}")
        if isinstance(cause, (ValueError, KeyError, TypeError)):
            raise cause from err  # bad input: the worker's own error names the field
        raise WorkerFailure(f"{what}: worker {rank} raised {type(cause).__name__}: {cause}") from err

    def graph_call(self, args: list[tuple], timeout_s: float, what: str) -> list:
        refs = self.compiled.execute(args)
        try:
            # All at once: a worker that dies or raises fails the whole get at once, even while the
            # others still wait for it inside a collective.
            return ray.get(refs, timeout=timeout_s)
        except TimeoutError:  # RayChannelTimeoutError
            self.timed_out(what, list(range(len(refs))), timeout_s)
        except (RayActorError, RayTaskError) as err:
            self.failed(what, self.rank_of(err), err)

    def rank_of(self, err: Exception) -> int:
        """The rank of the worker an error came from, by actor id or process id (-1 when Ray says neither)."""
        actor_id = getattr(err, "actor_id", None)
        for rank, actor in enumerate(self.actors):
            if actor_id is not None and actor._actor_id.hex() == str(actor_id):
                return rank
        pid = getattr(err, "pid", None)
        return self.pids.index(pid) if pid in self.pids else -1

    def dead_ranks(self, timeout_s: float = 5.0) -> list[tuple[int, RayActorError]]:
        """The workers found dead by a ping within `timeout_s`, each with Ray's error (first found first).

        A worker busy inside a compiled graph's loop does not answer, which is not death; the wait ends
        at the first dead worker found.
        """
        pings = [actor.__ray_ready__.remote() for actor in self.actors]
        deadline = time.monotonic() + timeout_s
        pending, dead = list(pings), []
        while pending and not dead:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                break
            try:
                ray.get(ready[0], timeout=0)
            except RayActorError as err:
                dead.append((pings.index(ready[0]), err))
            except Exception:  # noqa: BLE001 - anything else is not death
                pass
        return dead

    def teardown(self, reason: str) -> None:
        self.broken = reason
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        self.compiled.release()  # after the kill: a graph waiting on a dead or stuck worker returns at once
        with contextlib.suppress(Exception):
            remove_placement_group(self._pg)
