"""xtec-flows: out-of-core X-ray TEmperature Clustering (XTEC).

Data flows one way through the package::

    volume (T, *spatial)            xtec_flows.io.*, xtec_flows.tiled.scans (zarr, NeXus/HDF5, Tiled)
      -> statistics                 xtec_flows.engine.first_pass  (chunked pass: mean over T)
      -> threshold                  xtec_flows.engine.histogram + numerics.threshold
      -> trajectories (N, T)        xtec_flows.engine.trajectories (chunked gather) + numerics.rescale
      -> fit                        xtec_flows.engine.fit: numerics.mixture (+ smoothing, peaks)
      -> classes (classes="auto")   xtec_flows.engine.class_discovery: numerics.classes, stability
      -> labels (*spatial) int8     xtec_flows.engine.labels  (chunked zarr write)
      -> Tiled                      xtec_flows.tiled.results  (the result contract, spec.py)

Per-block kernels are pure numpy (xtec_flows.numerics); the engine runs them over dask blocks.

The top-level names are imported lazily so ``import xtec_flows`` stays cheap and
never pulls in matplotlib.
"""

from ._version import __version__

__all__ = ["__version__", "cluster", "select_n_components", "ClusterResult", "ClusterParams"]


def __getattr__(name):
    if name in ("cluster", "select_n_components", "ClusterResult", "ClusterParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'xtec_flows' has no attribute {name!r}")
