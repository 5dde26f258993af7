"""How the engine's Ray tasks are placed: datatrove's RayTaskManager, with a placement that a
node lost meanwhile cannot hang (engine.run_stage runs RayPipelineExecutor under
`task_manager()`).

datatrove 0.10.1 places each task in a thread (a placement group, its RankWorker actor, the
actor's node address) and hands the driver a Future that the thread resolves when the task
is launched. When the placement fails, e.g. the node the group was given dies before its
actor answers (RayActorError in that thread), the Future is never resolved and
RayPipelineExecutor.run waits on it forever. Here a failed placement is undone (actor
killed, group removed, so it holds no CPU of a live node) and made again, up to
PLACE_ATTEMPTS times; its waits give up when for INFEASIBLE_S no live node could hold the
task (a Ray autoscaler has that long to add one); and a placement that cannot be made stops
the stage with one DataError instead of a hang. A task lost once it runs (its node or
worker killed) is datatrove's to resubmit, as before (RayActorError, WorkerCrashedError...).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future

from datatrove.executor import ray as dt_ray
from datatrove.utils.logging import logger

from gopher_jax.errors import DataError

PLACE_ATTEMPTS = 3
INFEASIBLE_S = 600.0  # no live node could hold the task for this long: the stage stops
POLL_S = 5.0


class _Closing(Exception):
    """The executor is cleaning up: a placement still waiting stops."""


def _fits(bundle: dict) -> bool:
    """Whether some live node of the cluster has, in all, the resources of `bundle`."""
    import ray

    need = {k: v for k, v in bundle.items() if v}
    return any(node.get("Alive") and all(node.get("Resources", {}).get(k, 0) >= v
                                         for k, v in need.items())
               for node in ray.nodes())


def _describe(bundle: dict) -> str:
    return ", ".join(f"{v / 2**20:,.0f} MB memory" if k == "memory" else f"{v:g} {k}"
                     for k, v in bundle.items() if v)


class TaskManager(dt_ray.RayTaskManager):
    """RayTaskManager whose placements are retried, bounded and never left unresolved."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._closing = False

    def _wait(self, refs: list, bundle: dict, what: str) -> list:
        """ray.get(refs), in polls: stops when the executor closes, and with a DataError
        once no live node has been able to hold `bundle` for INFEASIBLE_S."""
        import ray

        pending, since = list(refs), None
        while pending:
            if self._closing:
                raise _Closing
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            if not pending:
                break
            if _fits(bundle):
                since = None
            elif since is None:
                since = time.monotonic()
            elif time.monotonic() - since > INFEASIBLE_S:
                raise DataError(
                    f"--executor ray: {what}: for {INFEASIBLE_S:.0f} s no live Ray node has "
                    f"had the {_describe(bundle)} a task asks for",
                    "add a node that large, or lower --task_memory; then run the same "
                    "command again: it redoes only the unfinished tasks")
        return ray.get(list(refs))

    def _place(self, executor_ref, ranks: list[int], remote_options: dict) -> list:
        """datatrove's placement of one task (RayTaskManager.submit_task's thread), undone
        where it fails."""
        import ray

        bundle = dt_ray.convert_remote_options_to_bundle(remote_options)
        what = f"placing the task of rank(s) {list(ranks)}"
        pg = ray.util.placement_group([bundle] * self.nodes_per_task)
        workers = []
        try:
            self._wait([pg.ready()], bundle, what)
            workers = [ray.remote(dt_ray.RankWorker).options(
                placement_group=pg, placement_group_bundle_index=i, **remote_options).remote()
                for i in range(self.nodes_per_task)]
            node_ips = self._wait([w.get_node_ip.remote() for w in workers], bundle, what)
        except BaseException:
            for w in workers:
                with contextlib.suppress(Exception):
                    ray.kill(w)
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(pg)
            raise
        tasks = [w.run_for_rank.remote(executor_ref, ranks, node_ips, i)
                 for i, w in enumerate(workers)]
        group = dt_ray.TaskGroup(tasks=tasks, workers=workers, placement_group=pg, ranks=ranks)
        for t in tasks:
            self.task_to_group[t] = group
            self.timeout_manager.add_task(t)
        return tasks

    def submit_task(self, executor_ref, ranks_to_submit: list[int],
                    remote_options: dict) -> Future:
        from ray.exceptions import RayError

        placed: Future = Future()

        def place() -> None:
            for attempt in range(1, PLACE_ATTEMPTS + 1):
                try:
                    placed.set_result(self._place(executor_ref, ranks_to_submit,
                                                  remote_options))
                    return
                except RayError as e:  # e.g. the group's node died before its actor answered
                    if attempt < PLACE_ATTEMPTS:
                        logger.warning(f"Placing the task of rank(s) {ranks_to_submit} failed "
                                       f"({type(e).__name__}: {e}); placing it again")
                        continue
                    placed.set_exception(DataError(
                        f"--executor ray: the task of rank(s) {ranks_to_submit} could not be "
                        f"placed in {PLACE_ATTEMPTS} attempts ({type(e).__name__}: {e})",
                        "run the same command again: it redoes only the unfinished tasks"))
                except BaseException as e:  # noqa: BLE001 (handed to the driver's wait)
                    placed.set_exception(e)
                    return

        self.pg_futures.append(self.executor.submit(place))
        return placed

    def wait(self, tasks: list, timeout: int = 0, num_returns: int = 1) -> tuple[list, list]:
        """RayTaskManager.wait, except that a placement that failed raises here (datatrove
        logs it and drops its ranks)."""
        import ray

        futures = [t for t in tasks if isinstance(t, Future)]
        refs = [t for t in tasks if not isinstance(t, Future)]
        if futures and not refs:
            concurrent.futures.wait(futures, timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        pending = []
        for f in futures:
            if f.done():
                refs.extend(f.result())  # a placement's DataError stops the stage here
            else:
                pending.append(f)
        if refs:
            finished, unfinished = ray.wait(refs, num_returns=num_returns, timeout=timeout)
            return finished, unfinished + pending
        return [], pending

    def clean_up(self) -> None:
        self._closing = True  # placements still waiting stop (shutdown waits for them)
        super().clean_up()


@contextlib.contextmanager
def task_manager() -> Iterator[None]:
    """RayPipelineExecutor.run, inside, places its tasks with TaskManager (datatrove's run
    builds its RayTaskManager by this module-level name; the stages run one at a time)."""
    saved = dt_ray.RayTaskManager
    dt_ray.RayTaskManager = TaskManager
    try:
        yield
    finally:
        dt_ray.RayTaskManager = saved
