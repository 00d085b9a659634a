"""Spreading per-file work over worker processes (`--jobs N`).

Reading DICOM headers is Python work that holds the GIL, so threads would not use a second
core: each worker is a process holding its own state (e.g. its own `Archive`, with its own
staging folder and SQLite connection), built once by `factory` and closed when the worker
exits. With one job, or one item, everything runs in this process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_state: Any = None
_method: Callable[[Any], Any] | None = None


def default_jobs() -> int:
    """One job per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _close(state: Any) -> None:
    close = getattr(state, "close", None)
    if close is not None:
        close()


def _init(factory: Callable[[], Any], method: str) -> None:
    global _state, _method
    # Forked from a command whose SIGTERM means "interrupted" (cli.common.run): a worker
    # the pool terminates just ends, without a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _state = factory()
    _method = getattr(_state, method)
    multiprocessing.util.Finalize(_state, _close, args=(_state,), exitpriority=10)


def _run(item: Any) -> Any:
    assert _method is not None
    return _method(item)


def parallel_map(factory: Callable[[], Any], method: str, items: Sequence[Any], jobs: int,
                 *, ordered: bool) -> Iterator[Any]:
    """`factory().method(item)` for each item, over `jobs` worker processes.

    `ordered` yields results in the items' order; otherwise as they complete. The factory
    and the items must pickle where processes are spawned rather than forked.
    """
    if jobs <= 1 or len(items) <= 1:
        state = factory()
        try:
            call = getattr(state, method)
            for item in items:
                yield call(item)
        finally:
            _close(state)
        return
    # fork: workers start at once and inherit what the parent set up (logging, warnings).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    jobs = min(jobs, len(items))
    pool = context.Pool(jobs, initializer=_init, initargs=(factory, method))
    try:
        chunk = max(1, min(32, len(items) // (jobs * 32)))
        results = (pool.imap if ordered else pool.imap_unordered)(_run, items, chunk)
        yield from results
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
