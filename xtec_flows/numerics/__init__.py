"""Pure numeric kernels: arrays in, arrays out; no I/O, no plotting, no global state.

Axis conventions: volumes are ``(T, *spatial)``; trajectories are
``(n_samples, n_features)`` with ``n_features == T``.
"""
