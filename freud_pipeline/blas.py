"""numpy's OpenBLAS kept to one thread while a function runs (`one_thread`).

Feature mining and labelling multiply small matrices only ([64 sampled frames x features] by [64 x 128] per clip,
[features x phones] by [phones x classes]), where BLAS threads do not pay, and OpenBLAS's idle workers spin after
each product and take the core that a merge's hashing and writer threads need (benchmarks/RESULTS.md, issue 14).

The limit is process-wide while it holds (threadpoolctl): another thread's products are single-threaded meanwhile,
which changes their speed, not their results. The library is found in the dynamic linker's list of loaded objects,
and only if that fails by threadpoolctl's scan, which builds a controller for every loaded library: with torch and
LanceDB loaded (about 190 libraries) 12 ms per process, 6% of a merge of six clips (reading /proc/self/maps instead
took 2 ms; the linker's list 0.4 ms)."""

from __future__ import annotations

import contextlib
import ctypes
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
    for path in sorted(_loaded_libraries("openblas")):
        name = os.path.basename(path)
        prefix = next((p for p in OpenBLASController.filename_prefixes if name.startswith(p)), None)
        if prefix is not None:
            found.append(OpenBLASController(filepath=path, prefix=prefix))
    if found:
        return tuple(found)
    return tuple(ThreadpoolController().select(internal_api="openblas").lib_controllers)


class _ObjectInfo(ctypes.Structure):  # the head of glibc's struct dl_phdr_info: what is read of it
    _fields_ = [("address", ctypes.c_void_p), ("name", ctypes.c_char_p)]


_VISIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_ObjectInfo), ctypes.c_size_t, ctypes.c_void_p)


def _loaded_libraries(part: str = "") -> set[str]:
    """Real paths of the shared objects loaded in this process whose file name contains `part`, from the dynamic
    linker's list (dl_iterate_phdr, as threadpoolctl finds them, without building a controller for each); empty
    where there is no such call."""
    try:
        iterate = ctypes.CDLL(None).dl_iterate_phdr
    except (OSError, AttributeError):
        return set()
    names: list[bytes] = []

    def visit(info, size, data):
        names.append(info.contents.name or b"")
        return 0

    iterate(_VISIT(visit), None)
    return {os.path.realpath(path) for path in map(os.fsdecode, names) if path and part in os.path.basename(path)}
