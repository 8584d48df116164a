"""numpy's OpenBLAS limited to one thread while feature sets are mined (freud_pipeline.blas)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from freud_pipeline import blas


def test_the_libraries_found_in_the_memory_map_are_those_threadpoolctl_finds():
    import numpy.linalg  # noqa: F401 - numpy's OpenBLAS (others may be loaded by earlier tests: scipy's)

    scanned = {c.filepath for c in ThreadpoolController().select(internal_api="openblas").lib_controllers}
    assert scanned and {c.filepath for c in blas.loaded_openblas()} == scanned
    assert {c.filepath for c in blas.openblas()} <= scanned  # those loaded when first asked, numpy's among them


def test_one_thread_inside_and_the_old_count_after():
    controllers = blas.openblas()
    before = [c.get_num_threads() for c in controllers]

    @blas.one_thread
    def product():
        assert [c.get_num_threads() for c in controllers] == [1] * len(controllers)
        return np.arange(12.0).reshape(3, 4) @ np.arange(12.0).reshape(4, 3)

    assert np.array_equal(product(), np.arange(12.0).reshape(3, 4) @ np.arange(12.0).reshape(4, 3))
    assert [c.get_num_threads() for c in controllers] == before
    try:
        with blas.threads(1):
            raise KeyError("inside")
    except KeyError:
        pass
    assert [c.get_num_threads() for c in controllers] == before


def test_overlapping_limits_from_two_threads_restore_the_old_count_whichever_leaves_last():
    """Merges may run from several threads: the limit holds while any of them is inside, and the count before the
    first is restored when the last leaves (in either order), not the 1 that a later entrant saw."""
    import threading

    controllers = blas.openblas()
    before = [c.get_num_threads() for c in controllers]
    for last in ("a", "b"):
        entered = {name: threading.Event() for name in "ab"}
        leave = {name: threading.Event() for name in "ab"}
        inside: dict[str, list] = {}

        def hold(name):
            with blas.threads(1):
                inside[name] = [c.get_num_threads() for c in controllers]
                entered[name].set()
                leave[name].wait(10)

        workers = {name: threading.Thread(target=hold, args=(name,)) for name in "ab"}
        workers["a"].start()
        entered["a"].wait(10)
        workers["b"].start()
        entered["b"].wait(10)
        first = "b" if last == "a" else "a"
        leave[first].set()
        workers[first].join()
        assert [c.get_num_threads() for c in controllers] == [1] * len(controllers)  # the other is still inside
        leave[last].set()
        workers[last].join()
        assert inside == {"a": [1] * len(controllers), "b": [1] * len(controllers)}
        assert [c.get_num_threads() for c in controllers] == before
