"""The parameters of an XTEC run, declared once (recorded in every result's metadata).

Each field of :class:`ClusterParams` has one :class:`Constraint` in :data:`CONSTRAINTS`: what it
accepts and how a command line asks for it. ``ClusterParams`` checks itself against them, and the
CLI (``xtec-flows cluster``, ``bic``, ``serve``) builds its options from them
(:func:`add_options`, :func:`values_from_options`), so a parameter's range, choices, default and
help are written here and nowhere else.
"""

from __future__ import annotations

import numbers
from dataclasses import MISSING, asdict, dataclass, fields

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
#: Labels are int8, so at most this many clusters or components.
MAX_LABELS = 127


@dataclass(frozen=True)
class Constraint:
    """What one parameter accepts, and its command-line option.

    kind : "choice" (one of ``choices``), "int" (``minimum``..``maximum``), "positive" (a
        number > 0), "threshold" (a method name or a positive cut), "flag" (two values, the
        option switches from the default to ``switched``), "kernel" (built from the smoothing
        options), "optional-int" (an int, or None)
    flag : the CLI option (None: not on the command line)
    """

    kind: str
    help: str
    flag: str | None = None
    choices: tuple = ()
    minimum: int | None = None
    maximum: int | None = None
    switched: object = None
    short: str | None = None
    remedy: str = ""

    def check(self, name: str, value) -> None:
        if self.kind == "choice":
            validation.check_choice(name, value, self.choices)
        elif self.kind in ("int", "optional-int"):
            if value is None and self.kind == "optional-int":
                return
            if self.maximum is None:
                validation.check_int(name, value, self.minimum)
                return
            wanted = f"{name} must be an integer from {self.minimum} to {self.maximum}"
            remedy = f" ({self.remedy})" if self.remedy else ""
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{wanted}; got {value!r}{remedy}")
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"{wanted}; got {value!r}{remedy}")
        elif self.kind == "positive":
            validation.check_positive(name, value)
        elif self.kind == "threshold":
            if isinstance(value, str):
                validation.check_choice(name, value, self.choices)
            else:
                validation.check_positive(f"{name} (explicit mean-intensity cutoff)", value)
        elif self.kind == "flag":
            validation.check_choice(name, value, self.choices)
        elif self.kind == "kernel":
            if value is not None and not isinstance(value, SmoothingKernel):
                raise TypeError(f"{name} must be a SmoothingKernel or None; got {type(value).__name__}")


#: One constraint per ClusterParams field, in the fields' order.
CONSTRAINTS = {
    "mode": Constraint("choice", "XTEC-d, XTEC-s (label smoothing) or peak averages", "--mode",
                       choices=validation.MODES),
    "n_components": Constraint("int", "number of clusters K", "--n-components", minimum=1, maximum=MAX_LABELS,
                               short="-k", remedy="labels are int8"),
    "threshold": Constraint("threshold", "kl, simple, none, or an explicit <I>_T cutoff (a number)", "--threshold",
                            choices=threshold.THRESHOLD_METHODS),
    "rescale": Constraint("choice", "how each trajectory is rescaled before the fit", "--rescale",
                          choices=RESCALE_METHODS),
    "mask": Constraint("choice", "which voxels count as empty", "--mask", choices=masking.MASK_TYPES),
    "nonfinite": Constraint("flag", "leave voxels with NaN/Inf unclustered instead of failing", "--mask-nonfinite",
                            choices=NONFINITE_POLICIES, switched="mask"),
    "smoothing": Constraint("kernel", "mode s: the label-smoothing kernel (see the --kernel options)"),
    "reg_covar": Constraint("positive", "added to every variance (numerical floor)", "--reg-covar"),
    "tol": Constraint("positive", "convergence on the change of mean log-likelihood", "--tol"),
    "max_iter": Constraint("int", "EM iterations at most", "--max-iter", minimum=1),
    "n_init": Constraint("int", "EM restarts; the best log-likelihood wins", "--n-init", minimum=1),
    "random_state": Constraint("optional-int", "random_state of the fit", "--seed", minimum=0),
    "init_sample_size": Constraint("int", "rows of the subsample that seeds each restart", minimum=2),
    "classes": Constraint("choice", "auto: discover physical classes (order parameter, critical, onset, static) "
                          "by grouping --max-components mixture components by their temperature dependence; "
                          "-k is then unused", "--classes", choices=CLASS_MODES),
    "max_components": Constraint("int", "--classes auto: mixture components to fit and group (upper bound)",
                                 "--max-components", minimum=2, maximum=MAX_LABELS,
                                 remedy="the upper bound on mixture components for classes='auto': class "
                                        "discovery fits more components than classes and groups them, so it "
                                        "needs at least 2 (default 8)"),
    "stability_runs": Constraint("int", "--classes auto: refits from other seeds that check each class reproduces",
                                 "--stability-runs", minimum=0),
    "ordering": Constraint("choice", "monotonic: axis 0 is a temperature series, strictly increasing or "
                           "decreasing; as-given: axis 0's values (time, field, a ramp then a hold) are taken "
                           "in measurement order", "--ordering", choices=validation.ORDERINGS),
}


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
        for f in fields(self):
            CONSTRAINTS[f.name].check(f.name, getattr(self, f.name))
        if self.mode == "s" and self.smoothing is None:
            object.__setattr__(self, "smoothing", SmoothingKernel())
        if self.mode != "s" and self.smoothing is not None:
            raise ValueError(f"smoothing applies to mode 's' only; got mode {self.mode!r} with smoothing")
        if self.classes is not None:
            # Class discovery fits max_components components; n_components says the same, so that
            # the recorded parameters (and the result key, a hash of them) do not depend on an
            # unused n_components.
            object.__setattr__(self, "n_components", self.max_components)

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


# ---------------------------------------------------------------------------------------
# the command line, built from CONSTRAINTS
# ---------------------------------------------------------------------------------------


def _parse_threshold(text: str):
    if text in threshold.THRESHOLD_METHODS:
        return text
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(
            f"--threshold must be {', '.join(threshold.THRESHOLD_METHODS)} or a mean intensity (number); got {text!r}"
        ) from None


def _default(name: str):
    f = next(f for f in fields(ClusterParams) if f.name == name)
    return None if f.default is MISSING else f.default


def add_options(parser, names, defaults: dict | None = None) -> None:
    """Add the CLI options of the parameters ``names`` (each with a flag) to an argparse parser.

    ``defaults`` overrides a parameter's default for this command (``serve`` clusters with K=3).
    The option's destination is the parameter's name.
    """
    defaults = defaults or {}
    for name in names:
        c = CONSTRAINTS[name]
        if c.flag is None:
            raise ValueError(f"parameter {name!r} has no command-line option")
        default = defaults.get(name, _default(name))
        flags = [c.short, c.flag] if c.short else [c.flag]
        metavar = c.flag.lstrip("-").upper().replace("-", "_")
        text = f"{c.help} (default {default})" if c.kind not in ("flag",) and default is not None else c.help
        if c.kind == "choice":
            cli_choices = [v for v in c.choices if v is not None]
            parser.add_argument(*flags, dest=name, choices=cli_choices, default=default, help=text)
        elif c.kind in ("int", "optional-int"):
            parser.add_argument(*flags, dest=name, type=int, default=default, metavar=metavar, help=text)
        elif c.kind == "positive":
            parser.add_argument(*flags, dest=name, type=float, default=default, metavar=metavar, help=text)
        elif c.kind == "threshold":
            parser.add_argument(*flags, dest=name, type=_parse_threshold, default=default, metavar=metavar,
                                help=text)
        elif c.kind == "flag":
            parser.add_argument(*flags, dest=name, action="store_const", const=c.switched, default=default,
                                help=text)
        else:
            raise ValueError(f"parameter {name!r} ({c.kind}) cannot be a plain option")


def values_from_options(args, names) -> dict:
    """{name: value} of the parameters ``names`` from parsed options (see :func:`add_options`);
    the class-discovery parameters only when ``--classes`` was given, so a fixed-K run records
    exactly the parameters it always did."""
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("classes", "unset") is None:
        for name in CLASS_DISCOVERY_FIELDS:
            values.pop(name, None)
    return values
