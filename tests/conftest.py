import contextlib
import io
import warnings

import numpy as np
import pytest


@pytest.fixture
def quiet():
    """Silence the reference implementation, which prints and warns freely."""

    @contextlib.contextmanager
    def _quiet():
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    return _quiet


def lognormal_volume(seed: int, n_temperatures: int = 6, shape=(30, 30, 30), gap_axis_index: int = 7):
    """A background-plus-peaks volume whose log-mean histogram has a clear background peak."""
    rng = np.random.default_rng(seed)
    bg = rng.lognormal(1.0, 0.5, shape)
    peaks = rng.random(shape) < 0.05
    bg[peaks] *= rng.lognormal(3.0, 1.0, int(peaks.sum()))
    vol = rng.poisson(np.broadcast_to(bg, (n_temperatures,) + shape)).astype(np.float32)
    vol[(slice(None),) + (slice(None),) * (len(shape) - 1) + (gap_axis_index,)] = 0
    return vol


# A real Tiled server (one per pytest process) and a client for it; see tiled_support.py.
from tiled_support import containers, tiled_client, tiled_server  # noqa: E402,F401
