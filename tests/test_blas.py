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
