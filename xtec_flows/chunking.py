"""Regular chunk grids: the one place that turns chunk sizes into blocks and regions.

Used by the streaming pipeline and by every backend that reads or writes block
by block, so they all walk a grid the same way.
"""

from __future__ import annotations

import numpy as np


def regular_chunks(shape: tuple, sizes: tuple) -> tuple:
    """Dask-style chunks: every block ``sizes[a]`` long along axis ``a`` but the last.

    >>> regular_chunks((10, 4), (4, 4))
    ((4, 4, 2), (4,))
    """
    return tuple(tuple(min(c, s - o) for o in range(0, s, c)) for c, s in zip(sizes, shape))


def block_regions(chunks: tuple):
    """(block index, offset, slices) of every block of a chunk grid, in C order."""
    starts = [np.cumsum((0,) + tuple(c))[:-1] for c in chunks]
    for idx in np.ndindex(*[len(c) for c in chunks]):
        offset = tuple(int(starts[a][i]) for a, i in enumerate(idx))
        region = tuple(slice(o, o + int(chunks[a][i])) for a, (o, i) in enumerate(zip(offset, idx)))
        yield idx, offset, region
