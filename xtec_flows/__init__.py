"""xtec-flows: out-of-core X-ray TEmperature Clustering (XTEC).

Data flows one way through the package::

    volume (T, *spatial)            xtec_flows.io.*        (zarr, NeXus/HDF5)
      -> statistics                 xtec_flows.pipeline    (chunked pass: mean over T)
      -> threshold                  xtec_flows.numerics.threshold
      -> trajectories (N, T)        xtec_flows.pipeline    (chunked gather) + numerics.rescale
      -> fit                        xtec_flows.numerics.mixture (+ smoothing, peaks)
      -> labels (*spatial) int8     xtec_flows.pipeline    (chunked zarr write)

The top-level names are imported lazily so ``import xtec_flows`` stays cheap and
never pulls in matplotlib.
"""

from ._version import __version__

__all__ = ["__version__", "cluster", "select_n_components", "ClusterResult", "ClusterParams"]


def __getattr__(name):
    if name in ("cluster", "select_n_components", "ClusterResult", "ClusterParams"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'xtec_flows' has no attribute {name!r}")
