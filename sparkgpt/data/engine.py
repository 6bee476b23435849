"""Where the data pipeline's tasks run: worker processes on this machine (`local`, the default) or Ray (`ray`).

Both engines take a worker class and a list of tasks and yield the results in task order with a bounded number in
flight, so the driver writes its output in corpus order whatever runs the tasks: the two engines' outputs are equal
by construction. A worker class is built once per process (it may hold a tokenizer); tasks and results are dicts of
str, int and bytes, which every engine carries without conversion surprises.

Ray runs locally when no cluster is named (an embedded cluster of `workers` CPUs, as the tests use it) and joins one
when `RAY_ADDRESS` is set; Ray Data schedules the tasks, streams the results and applies back-pressure. On a cluster
the output folder must be on storage every node sees, since workers write their parts of the corpus there.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from sparkgpt.errors import SparkGPTError

ENGINES = ("local", "ray")
Task = dict
WorkerClass = Callable[..., Callable[[Task], Task]]

_worker = None  # the worker object of a local pool process


def _start_worker(worker_class: WorkerClass, init: tuple) -> None:
    global _worker
    _worker = worker_class(*init)


def _run(task: Task) -> Task:
    return _worker(task)


@contextlib.contextmanager
def _no_tokenizer_threads() -> Iterator[None]:
    """Forked children must not use the tokenizers library's thread pool (it may be mid-use in this process);
    saying so before the fork also silences the library's warning about it."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


class LocalEngine:
    """Worker processes on this machine; one worker runs in this process (no pool to start)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)

    def map(self, worker_class: WorkerClass, init: tuple, tasks: Iterable[Task]) -> Iterator[Task]:
        if self.workers == 1:
            worker = worker_class(*init)
            for task in tasks:
                yield worker(task)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with _no_tokenizer_threads():
            pool = multiprocessing.get_context(method).Pool(self.workers, _start_worker, (worker_class, init))
        try:
            # A window of 2 tasks per worker keeps them busy while memory stays flat (Pool.imap would read every
            # task ahead); results come back in submission order.
            in_flight: deque = deque()
            for task in tasks:
                in_flight.append(pool.apply_async(_run, (task,)))
                if len(in_flight) > 2 * self.workers:
                    yield in_flight.popleft().get()
            while in_flight:
                yield in_flight.popleft().get()
        finally:
            pool.terminate()
            pool.join()

    def close(self) -> None:
        """Nothing outlives `map`: its pool is stopped when the results are consumed."""


class RayEngine:
    """Ray Data: an embedded local cluster by default, the cluster at `RAY_ADDRESS` when it is set."""

    name = "ray"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        try:
            import ray
        except ImportError:
            raise SparkGPTError("--engine ray needs Ray Data: pip install 'ray[data]'") from None
        if not ray.is_initialized():
            local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": self.workers}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
            self._started = True
        else:
            self._started = False
        self._ray = ray

    def close(self) -> None:
        """Stop the Ray runtime if this engine started it (a cluster the user joined stays up)."""
        if self._started:
            self._ray.shutdown()

    def map(self, worker_class: WorkerClass, init: tuple, tasks: Iterable[Task]) -> Iterator[Task]:
        tasks = list(tasks)  # task descriptions are small (a file name, a range): the data stays in the files
        if not tasks:
            return
        data = self._ray.data
        context = data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        dataset = data.from_items(tasks, override_num_blocks=len(tasks)).map(
            worker_class, fn_constructor_args=init, concurrency=self.workers)
        yield from dataset.iter_rows()


def make_engine(name: str, workers: int) -> LocalEngine | RayEngine:
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(workers)
    raise SparkGPTError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
