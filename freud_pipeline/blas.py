"""numpy's OpenBLAS kept to one thread while a function runs (`one_thread`).

Feature mining and labelling multiply small matrices only ([64 sampled frames x features] by [64 x 128] per clip,
[features x phones] by [phones x classes]), where BLAS threads do not pay, and OpenBLAS's idle workers spin after
each product and take the core that a merge's hashing and writer threads need (benchmarks/RESULTS.md, issue 14).

The limit is process-wide while it holds (threadpoolctl): another thread's products are single-threaded meanwhile,
which changes their speed, not their results. The library is found in this process's memory map, and only if that
fails by threadpoolctl's scan of every loaded library, which with torch and LanceDB loaded (about 190 libraries)
cost 12 ms per process, 6% of a merge of six clips."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Iterator

from threadpoolctl import LibController, OpenBLASController, ThreadpoolController


def one_thread(function: Callable) -> Callable:
    """`function` with numpy's OpenBLAS on one thread while it runs."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with threads(1):
            return function(*args, **kwargs)

    return run


_lock = threading.Lock()
_holders = 0  # blocks inside `threads` now, across all threads
_restore: list[int | None] = []  # the counts before the first of them


@contextlib.contextmanager
def threads(limit: int) -> Iterator[None]:
    """OpenBLAS on `limit` threads while any block of this process is inside (the limit is process-wide, and merges
    may run from several threads at once): the first to enter sets it, the last to leave restores the old counts
    (then no thread holds control of the pool, as threadpoolctl leaves it)."""
    global _holders
    controllers = openblas()
    with _lock:
        if _holders == 0:
            _restore[:] = [controller.get_num_threads() for controller in controllers]
            OpenBLASController.clear_controlling_thread(force=True)  # this thread takes control (under _lock)
            for controller in controllers:
                controller.set_num_threads(limit)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                OpenBLASController.clear_controlling_thread(force=True)  # the first may still hold it, alive
                for controller, count in zip(controllers, _restore):
                    if count is not None:
                        controller.set_num_threads(count)
                OpenBLASController.clear_controlling_thread(force=True)


@functools.cache
def openblas() -> tuple[LibController, ...]:
    """Controllers of the OpenBLAS libraries loaded when first asked (numpy's is loaded with numpy, so always among
    them; one that a later import loads, such as scipy's, is not limited)."""
    return loaded_openblas()


def loaded_openblas() -> tuple[LibController, ...]:
    """Controllers of the OpenBLAS libraries loaded in this process now (numpy's, and scipy's if loaded)."""
    found = []
    for path in sorted(_mapped_libraries()):
        name = os.path.basename(path)
        prefix = next((p for p in OpenBLASController.filename_prefixes if name.startswith(p)), None)
        if prefix is not None and "openblas" in name:
            found.append(OpenBLASController(filepath=path, prefix=prefix))
    if found:
        return tuple(found)
    return tuple(ThreadpoolController().select(internal_api="openblas").lib_controllers)


def _mapped_libraries() -> set[str]:
    """Paths of the shared libraries in this process's memory map (Linux); empty elsewhere."""
    try:
        with open("/proc/self/maps") as maps:
            fields = (line.split(maxsplit=5) for line in maps)
            return {f[5].strip() for f in fields if len(f) == 6 and ".so" in f[5] and not f[5].rstrip().endswith(
                "(deleted)")}
    except OSError:
        return set()
