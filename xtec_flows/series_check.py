"""The series check: audit the slices of a temperature series before clustering.

A pure function of the per-slice facts (no I/O): the readers gather the facts
(:class:`SliceFacts`), :func:`check_series` says which slices to keep, in which
order, and why the others go. The audit table it returns is recorded with the
result, so the data documents its own repairs.

Offenders (each excluded, or the series refused, as the caller chooses):

* ``empty``: an empty stub (dataset never written), an all-zero volume, or a missing volume;
* ``no_temperature``: no temperature could be read for the slice;
* ``shape`` / ``axes``: a grid different from the most common one;
* ``exposure`` / ``monitor``: differs from the most common value (a scan taken with
  another count time or monitor preset is not comparable);
* ``duplicate``: the same temperature as a slice given earlier (the first one is kept).

Reported, never fatal: ``order`` (the slices were given out of temperature order and
are sorted) and ``gap`` (a step larger than ``gap_factor`` x the median step: a
temperature is probably missing).

>>> facts = [SliceFacts("a.nxs", 20.0, (4, 4, 4)), SliceFacts("b.nxs", 10.0, (4, 4, 4)),
...          SliceFacts("c.nxs", 30.0, (4, 4, 5)), SliceFacts("d.nxs", 40.0, (4, 4, 4))]
>>> audit = check_series(facts, on_problem="exclude")
>>> audit.kept, [(r["source"], r["problem"]) for r in audit.rows]
([1, 0, 3], [('c.nxs', 'shape'), ('b.nxs', 'order')])
"""

from __future__ import annotations

import math
from collections import Counter
import statistics
from dataclasses import dataclass, field

ON_PROBLEM = ("exclude", "refuse")

# What the user can do about each kind of offender (said in the refusal).
REMEDIES = {
    "empty": "re-run the reduction for it, or leave the file out",
    "no_temperature": "write entry/sample/temperature into it, or leave the file out",
    "shape": "re-transform it onto the common grid, or leave the file out",
    "axes": "re-transform it with the common axes, or leave the file out",
    "exposure": "leave the file out (intensities are not comparable), or normalise it first",
    "monitor": "leave the file out (intensities are not comparable), or normalise it first",
    "duplicate": "keep one scan per temperature (average or drop the repeat)",
}


class SeriesCheckError(ValueError):
    """The series check refused the series (``on_problem='refuse'``)."""


@dataclass(frozen=True)
class SliceFacts:
    """What a reader knows about one slice of a series, before reading its data.

    ``shape`` is the slice's spatial shape in the project's axis order, ``axes`` its dim names
    (e.g. ``('L', 'K', 'H')``) or None if unknown; ``exposure`` and ``monitor`` are None when the
    file does not say; ``empty`` is None for a usable slice, else why it is not
    (``'empty stub'``, ``'all zeros'``, ``'missing'``, ...).
    """

    source: str
    temperature: float | None
    shape: tuple | None
    axes: tuple | None = None
    exposure: float | None = None
    monitor: float | None = None
    empty: str | None = None


@dataclass
class SeriesAudit:
    """The outcome of :func:`check_series`.

    ``kept`` : indices into the facts, sorted by temperature (the order to stack them in);
    ``rows`` : one dict per finding (index, source, temperature, problem, detail, action);
    ``on_problem``, ``gap_factor``, ``rtol`` : the settings used.
    """

    kept: list
    rows: list = field(default_factory=list)
    on_problem: str = "exclude"
    gap_factor: float = 1.5
    rtol: float = 1e-6
    n_slices: int = 0

    @property
    def excluded(self) -> list:
        return [r for r in self.rows if r["action"] == "excluded"]

    def to_dict(self) -> dict:
        """JSON-ready record for the result's metadata."""
        return {"on_problem": self.on_problem, "gap_factor": self.gap_factor, "rtol": self.rtol,
                "n_slices": self.n_slices, "n_kept": len(self.kept), "n_excluded": len(self.excluded),
                "kept": list(self.kept), "findings": [dict(r) for r in self.rows]}


def _mode(values):
    """The most common value (ties: the one seen first)."""
    return Counter(values).most_common(1)[0][0]


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


def check_series(facts, on_problem: str = "exclude", *, gap_factor: float = 1.5, rtol: float = 1e-6) -> SeriesAudit:
    """Audit a series: which slices to keep, sorted by temperature, and a table of findings.

    Parameters
    ----------
    facts : sequence of SliceFacts, one per slice as given
    on_problem : {'exclude', 'refuse'}
        'exclude' drops the offenders (recorded in the table); 'refuse' raises
        :class:`SeriesCheckError` naming each offender, its problem and the remedy.
    gap_factor : float > 1
        A step between kept temperatures larger than ``gap_factor`` x the median step is reported.
    rtol : float >= 0
        Relative tolerance when comparing exposure and monitor values with the most common value.

    Returns
    -------
    SeriesAudit
    """
    if on_problem not in ON_PROBLEM:
        raise ValueError(f"on_problem must be one of {ON_PROBLEM}; got {on_problem!r}")
    if not (isinstance(gap_factor, (int, float)) and gap_factor > 1):
        raise ValueError(f"gap_factor must be a number > 1; got {gap_factor!r}")
    if not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"rtol must be a number >= 0; got {rtol!r}")
    facts = list(facts)
    rows = []
    alive = list(range(len(facts)))

    def offend(i, problem, detail):
        rows.append({"index": i, "source": facts[i].source, "temperature": facts[i].temperature,
                     "problem": problem, "detail": detail, "action": "excluded"})
        alive.remove(i)

    for i in list(alive):
        if facts[i].empty is not None:
            offend(i, "empty", facts[i].empty)
        elif facts[i].temperature is None or not math.isfinite(facts[i].temperature):
            offend(i, "no_temperature", f"temperature {facts[i].temperature!r}")
    for attr in ("shape", "axes"):
        known = [i for i in alive if getattr(facts[i], attr) is not None]
        if known:
            common = _mode([tuple(getattr(facts[i], attr)) for i in known])
            for i in known:
                if tuple(getattr(facts[i], attr)) != common:
                    offend(i, attr, f"{attr} {tuple(getattr(facts[i], attr))}, most slices {common}")
    for attr in ("exposure", "monitor"):
        known = [i for i in alive if getattr(facts[i], attr) is not None]
        if known:
            common = _mode([float(getattr(facts[i], attr)) for i in known])
            for i in known:
                if not _close(float(getattr(facts[i], attr)), common, rtol):
                    offend(i, attr, f"{attr} {getattr(facts[i], attr):g}, most slices {common:g}")
    seen = {}
    for i in list(alive):
        t = float(facts[i].temperature)
        if t in seen:
            offend(i, "duplicate", f"temperature {t:g} also in {facts[seen[t]].source}")
        else:
            seen[t] = i

    if on_problem == "refuse" and rows:
        lines = [f"  {r['source']}: {r['problem']} ({r['detail']}); {REMEDIES[r['problem']]}" for r in rows]
        raise SeriesCheckError(
            f"the series check refused the series: {len(rows)} of {len(facts)} slices are unusable:\n"
            + "\n".join(lines)
            + "\nfix or leave out these inputs, or pass --series-check exclude (on_problem='exclude') to drop them"
        )
    kept = sorted(alive, key=lambda i: float(facts[i].temperature))
    if kept != sorted(kept):
        first = next(i for a, i in zip(sorted(kept), kept) if a != i)
        rows.append({"index": first, "source": facts[first].source, "temperature": facts[first].temperature,
                     "problem": "order", "detail": "slices given out of temperature order", "action": "sorted"})
    temps = [float(facts[i].temperature) for i in kept]
    steps = [b - a for a, b in zip(temps, temps[1:])]
    if len(steps) >= 2:
        median = statistics.median(steps)
        for j, step in enumerate(steps):
            if median > 0 and step > gap_factor * median:
                i = kept[j + 1]
                rows.append({"index": i, "source": facts[i].source, "temperature": temps[j + 1], "problem": "gap",
                             "detail": f"step {step:g} from {temps[j]:g} is {step / median:.3g} x the median step "
                                       f"{median:g}: a temperature may be missing", "action": "reported"})
    if not kept:
        raise SeriesCheckError(f"the series check left no usable slice of {len(facts)}: "
                               + "; ".join(f"{r['source']}: {r['problem']}" for r in rows))
    return SeriesAudit(kept=kept, rows=rows, on_problem=on_problem, gap_factor=float(gap_factor), rtol=float(rtol),
                       n_slices=len(facts))


__all__ = ["ON_PROBLEM", "SeriesAudit", "SeriesCheckError", "SliceFacts", "check_series"]
