"""Figures for a clustering result (matplotlib, imported only here, Agg backend).

Colours are fixed per label, so label 0 is always the same colour across runs
and scans; unclustered voxels are grey, masked/empty voxels white.
"""

from __future__ import annotations

import numpy as np

PALETTE = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b",
    "#bcbd22", "#7f7f7f",
]
UNCLUSTERED = "#c8c8c8"


def _colour(k: int) -> str:
    return PALETTE[k % len(PALETTE)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def qmap(labels, path, n_components: int, slices: int = 3, title: str = "", names: list | None = None,
         intensity=None, coordinate=None) -> None:
    """Colour-coded slices of reciprocal space (a coloured profile for a 1-D series, see :func:`profile`).

    Parameters
    ----------
    labels : array-like of shape (L, K, H), (K, H) or (q,), int8 (−1 = not clustered)
        Read slice by slice (a zarr array is never loaded whole for 3-D).
    names : legend text per label (default "cluster k"), e.g. class kinds
    intensity, coordinate : 1-D series only, see :func:`profile`
    """
    from matplotlib.colors import ListedColormap

    if labels.ndim == 1:
        profile(labels, path, n_components, title=title, names=names, intensity=intensity, coordinate=coordinate)
        return
    plt = _pyplot()
    cmap = ListedColormap([UNCLUSTERED] + [_colour(k) for k in range(n_components)])
    if labels.ndim == 2:
        planes = [("", np.asarray(labels[...]))]
    else:
        n = labels.shape[0]
        idx = np.unique(np.linspace(0, n - 1, slices + 2).astype(int)[1:-1])
        planes = [(f"axis 0 = {i}", np.asarray(labels[int(i)])) for i in idx]
    fig, axes = plt.subplots(1, len(planes), figsize=(4.2 * len(planes), 4.2), squeeze=False)
    for ax, (name, plane) in zip(axes[0], planes):
        ax.imshow(plane + 1, cmap=cmap, vmin=0, vmax=n_components, origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=_colour(k)) for k in range(n_components)]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=UNCLUSTERED))
    names = list(names) if names is not None else [f"cluster {k}" for k in range(n_components)]
    fig.legend(handles, names + ["not clustered"], loc="lower center",
               ncol=min(n_components + 1, 6), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(labels, path, n_components: int, title: str = "", names: list | None = None, intensity=None,
            coordinate=None, xlabel: str = "q (index)") -> None:
    """The map of a 1-D series (powder, line scan, PDF): intensity vs q, each point coloured by its label.

    labels : (q,) int8; intensity : (q,) e.g. the mean over the series (default: a strip of labels);
    coordinate : (q,) the q (or 2θ, r) values (default: the index).
    """
    plt = _pyplot()
    lab = np.asarray(labels[...])
    x = np.arange(lab.size) if coordinate is None else np.asarray(coordinate, dtype=float)
    y = np.ones(lab.size) if intensity is None else np.asarray(intensity, dtype=float)
    names = list(names) if names is not None else [f"cluster {k}" for k in range(n_components)]
    fig, ax = plt.subplots(figsize=(9.0, 3.8))
    if intensity is not None:
        ax.plot(x, y, color="#555555", lw=0.6, zorder=1)
    ax.scatter(x[lab < 0], y[lab < 0], s=3, color=UNCLUSTERED, label="not clustered", zorder=2)
    for k in range(n_components):
        sel = lab == k
        if sel.any():
            ax.scatter(x[sel], y[sel], s=9, color=_colour(k), label=names[k], zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean intensity" if intensity is not None else "")
    if intensity is not None and np.all(y > 0):
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=min(n_components + 1, 5))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories(temperatures, means, variances, counts, path, ylabel: str = "rescaled I(T)") -> None:
    """Cluster mean trajectories ± 1σ versus temperature.

    means, variances : (K, T); counts : (K,)
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    t = np.asarray(temperatures)
    for k, (m, v) in enumerate(zip(means, variances)):
        s = np.sqrt(v)
        ax.plot(t, m, color=_colour(k), lw=2, label=f"cluster {k} ({int(counts[k])})")
        ax.fill_between(t, m - s, m + s, color=_colour(k), alpha=0.25)
    ax.set_xlabel("T")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bic_curve(table, path) -> None:
    """BIC versus number of components; the best K marked."""
    plt = _pyplot()
    ks = [r["n_components"] for r in table]
    b = [r["bic"] for r in table]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, b, "o-")
    best = min(table, key=lambda r: r["bic"])
    ax.plot([best["n_components"]], [best["bic"]], "r*", ms=14, label=f"best K = {best['n_components']}")
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel("BIC (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def class_names(classes: list) -> list:
    """Short legend text per class for a q-map: "label: kind"."""
    return [f"{c['label']}: {c['kind'].replace('_', ' ')}" for c in classes]


def class_label(c: dict) -> str:
    """Legend text of a class summary (a dict of ``result.classes``): kind, size, Tc, stability."""
    text = f"{c['label']}: {c['kind'].replace('_', ' ')}"
    if c["kind"] == "static" and c.get("trend") not in (None, "flat"):
        text += f" ({c['trend']})"
    text += f", {int(c['n_voxels']):,} vox"
    if c.get("tc") is not None:
        err = c.get("tc_err")
        text += f", Tc {c['tc']:.1f}" + (f" ± {err:.1f}" if err is not None else "")
    if c.get("stable") is False:
        text += " [UNSTABLE]"
    return text


def class_trajectories(temperatures, classes: list, path, title: str = "") -> None:
    """Class mean trajectories (relative intensity I / <I>_T) with their fitted curves and Tc marked.

    temperatures : (T,); classes : ``result.classes`` (dicts with mean_relative, fit_curve, tc, kind...).
    An unstable class is drawn dashed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    t = np.asarray(temperatures, dtype=float)
    for c in classes:
        colour = _colour(int(c["label"]))
        style = "--" if c.get("stable") is False else "-"
        ax.plot(t, c["mean_relative"], "o", color=colour, ms=3.5)
        ax.plot(t, c["fit_curve"], style, color=colour, lw=1.8, label=class_label(c))
        if c.get("tc") is not None:
            ax.axvline(c["tc"], color=colour, lw=0.8, ls=":")
    ax.set_xlabel("T")
    ax.set_ylabel("I(T) / <I>_T (class mean; lines: fitted model)")
    ax.legend(fontsize=7.5)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
