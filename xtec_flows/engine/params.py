"""The parameters of an XTEC run, declared once (recorded in every result's metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .. import validation
from ..numerics import masking, threshold
from ..numerics.rescale import RESCALE_METHODS
from ..numerics.smoothing import SmoothingKernel

NONFINITE_POLICIES = ("raise", "mask")
# None: a fixed number of components, each one cluster (XTEC-d/s as published). "auto":
# class discovery (see class_discovery.py).
CLASS_MODES = (None, "auto")
# The parameters that only class discovery reads.
CLASS_DISCOVERY_FIELDS = ("classes", "max_components", "stability_runs")


@dataclass(frozen=True)
class ClusterParams:
    """Every parameter of an XTEC run (recorded in the result's metadata).

    mode : "d" (every thresholded voxel), "s" (with label smoothing) or
        "peaks" (one averaged trajectory per connected peak)
    n_components : number of clusters K (1..127)
    threshold : "kl", "simple", "none", or a number: an explicit cut on <I>_T
    rescale : "mean", "zscore", "log-mean" or "none"
    mask : "zero-mean" or "any-zero" (which voxels count as empty)
    nonfinite : "raise" (NaN/Inf is an error) or "mask" (drop those voxels)
    smoothing : label-smoothing kernel for mode "s" (default: local, L = 1 voxel)
    reg_covar, tol, max_iter, n_init, random_state : EM settings (scikit-learn meaning)
    """

    mode: str = "d"
    n_components: int = 4
    threshold: str | float = "kl"
    rescale: str = "mean"
    mask: str = "zero-mean"
    nonfinite: str = "raise"
    smoothing: SmoothingKernel | None = None
    reg_covar: float = 1e-6
    tol: float = 1e-4
    max_iter: int = 300
    n_init: int = 3
    random_state: int | None = 0
    init_sample_size: int = 20_000
    classes: str | None = None
    max_components: int = 8
    stability_runs: int = 3
    ordering: str = "monotonic"

    def __post_init__(self):
        validation.check_choice("mode", self.mode, validation.MODES)
        validation.check_int("n_components", self.n_components, 1)
        if self.n_components > 127:
            raise ValueError(f"n_components must be <= 127 (labels are int8); got {self.n_components}")
        if isinstance(self.threshold, str):
            validation.check_choice("threshold", self.threshold, threshold.THRESHOLD_METHODS)
        else:
            validation.check_positive("threshold (explicit mean-intensity cutoff)", self.threshold)
        validation.check_choice("rescale", self.rescale, RESCALE_METHODS)
        validation.check_choice("mask", self.mask, masking.MASK_TYPES)
        validation.check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        validation.check_positive("reg_covar", self.reg_covar)
        validation.check_positive("tol", self.tol)
        validation.check_int("max_iter", self.max_iter, 1)
        validation.check_int("n_init", self.n_init, 1)
        validation.check_int("init_sample_size", self.init_sample_size, 2)
        if self.random_state is not None:
            validation.check_int("random_state", self.random_state, 0)
        if self.smoothing is not None and not isinstance(self.smoothing, SmoothingKernel):
            raise TypeError(f"smoothing must be a SmoothingKernel or None; got {type(self.smoothing).__name__}")
        if self.mode == "s" and self.smoothing is None:
            object.__setattr__(self, "smoothing", SmoothingKernel())
        if self.mode != "s" and self.smoothing is not None:
            raise ValueError(f"smoothing applies to mode 's' only; got mode {self.mode!r} with smoothing")
        validation.check_choice("ordering", self.ordering, validation.ORDERINGS)
        validation.check_choice("classes", self.classes, CLASS_MODES)
        validation.check_int("stability_runs", self.stability_runs, 0)
        if self.classes is not None and isinstance(self.max_components, int) and 2 <= self.max_components <= 127:
            # Class discovery fits max_components components; n_components says the same, so that
            # the recorded parameters (and the result key, a hash of them) do not depend on an
            # unused n_components.
            object.__setattr__(self, "n_components", self.max_components)
        if isinstance(self.max_components, bool) or not isinstance(self.max_components, int) or not (
            2 <= self.max_components <= 127
        ):
            raise ValueError(
                "max_components (the upper bound on mixture components for classes='auto') must be an "
                f"integer from 2 to 127; got {self.max_components!r}. Class discovery fits more components "
                "than classes and groups them, so it needs at least 2 (default 8)"
            )

    @classmethod
    def from_dict(cls, values: dict | None) -> ClusterParams:
        """Parameters from JSON-like values (a flow parameter, a result's metadata).

        Unknown names are refused with the list of known ones, so a typo never silently
        falls back to a default.
        """
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown clustering parameter(s) {unknown}; known: {sorted(known)}")
        smoothing = values.get("smoothing")
        if isinstance(smoothing, dict):
            kernel = dict(smoothing)
            if "unit_cell" in kernel:
                kernel["unit_cell"] = tuple(kernel["unit_cell"])
            values["smoothing"] = SmoothingKernel(**kernel)
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.classes is None:
            # Fixed-K runs record exactly what they did before class discovery existed, so
            # their result keys (a hash of these parameters) do not change.
            for name in CLASS_DISCOVERY_FIELDS:
                d.pop(name)
        if self.ordering == "monotonic":
            d.pop("ordering")  # the default, unrecorded so that earlier result keys hold
        if self.smoothing is not None:
            d["smoothing"] = asdict(self.smoothing)
            d["smoothing"]["unit_cell"] = list(self.smoothing.unit_cell)
        return d
