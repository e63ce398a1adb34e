"""Class discovery on generator settings nobody tuned for: random draws over every knob at once.

Section 13's grid varies one knob of ``synthetic.SeriesModel`` at a time, around the defaults the
method was developed on. Releases are judged on volumes generated with other settings, so this
benchmark draws whole settings at random, every knob at once, including knobs the grid never
moves (the order-parameter exponent, the width of the critical region, the CDW and halo
strengths and widths, the thermal slope of the background, the lattice and wavevector), from
the ranges in ``UNSEEN_RANGES`` with a fixed draw seed. Each setting is scored like the grid
(``bench_engine._grid_run``: found fractions, ARI, Tc of the CDW class) for the ``xtec``
reference XTEC-d at the physical K=4, xtec-flows XTEC-d at K=4 and ``classes="auto"``.

A draw is rejected (and drawn again) when two peak sites, a CDW site and a Bragg site or CDW
sites of two arms, are closer than ``halo_radius + 3 bragg_sigma`` voxels: the generator's
truth names a voxel by its strongest component, and where a truncated halo runs into another
peak's core the classes it names are not separable by any temperature dependence.

Usage: ``.venv/bin/python benchmarks/bench_unseen.py [--settings 24] [--seeds 2] [--draw-seed 2026]
[--results benchmarks/RESULTS.md]``; prints markdown tables (``--results`` merges them into
RESULTS.md as section 20). ``--save-json FILE`` keeps every run's scores; ``--compare-json FILE``
adds a table of classes auto against such a file from another checkout (run it there with
``PYTHONPATH=<that checkout> ... --methods "classes auto" --save-json FILE``), so a change to the
method is judged on the same draws before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_engine as be  # noqa: E402

SECTION = "## 20. Class discovery on settings nobody tuned for"

#: knob -> ("log" | "uniform", low, high), ("int", low, high) inclusive, or ("choice", values).
UNSEEN_RANGES: dict = {
    "exposure": ("log", 0.3, 2.0),
    "background_level": ("uniform", 5.0, 30.0),
    "background_slope": ("uniform", 0.0, 0.4),
    "tc": ("uniform", 80.0, 240.0),
    "beta": ("uniform", 0.2, 0.5),
    "critical_cutoff": ("uniform", 0.02, 0.1),
    "cdw_amplitude": ("log", 1500.0, 6000.0),
    "cdw_arms": ("int", 1, 3),
    "halo_amplitude": ("log", 120.0, 600.0),
    "halo_width": ("uniform", 1.0, 2.0),
    "debye_waller": ("uniform", 0.0, 8e-4),
    "monitor_jitter": ("uniform", 0.0, 0.08),
    "pixels_per_zone": ("choice", (12, 16, 20)),
    "cdw_wavevector": ("choice", ((0.5, 0.5, 0.0), (0.5, 0.0, 0.0), (1 / 3, 0.0, 0.0), (0.25, 0.25, 0.0))),
}
#: Number of temperatures: uniform integers in this range (inclusive).
TEMPERATURE_RANGE = (12, 40)
#: A class with fewer truth voxels than this is "n/a" for the found targets (its few voxels are
#: the tips of a halo barely above twice the background, not a region a map would show).
MIN_TRUTH_VOXELS = 200
METHODS = ("reference d", "xtec-flows d", "classes auto")


def _draw_knob(rng: np.random.Generator, spec):
    kind = spec[0]
    if kind == "log":
        return float(np.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))))
    if kind == "uniform":
        return float(rng.uniform(spec[1], spec[2]))
    if kind == "int":
        return int(rng.integers(spec[1], spec[2] + 1))
    if kind == "choice":
        return spec[1][int(rng.integers(len(spec[1])))]
    raise ValueError(f"unknown range kind {kind!r} in UNSEEN_RANGES")


def peak_separation(model) -> float:
    """Smallest distance (voxels) between a CDW site and a Bragg site or a CDW site of another arm."""
    q = np.asarray(model.cdw_wavevector, float)
    arms = [np.roll(q, j) for j in range(int(model.cdw_arms))]
    sites = [np.zeros(3)] + arms
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3)), float)
    best = math.inf
    for a, b in itertools.combinations(range(len(sites)), 2):
        d = np.linalg.norm(sites[a] - sites[b] + shifts, axis=1).min()
        best = min(best, float(d) * model.pixels_per_zone)
    return best


def draw_settings(n: int, draw_seed: int) -> list:
    """``n`` settings [(name, knobs, n_temperatures)], drawn with ``draw_seed``; see the module text."""
    from xtec_flows.synthetic import SeriesModel

    rng = np.random.default_rng(draw_seed)
    out = []
    while len(out) < n:
        knobs = {name: _draw_knob(rng, spec) for name, spec in UNSEEN_RANGES.items()}
        n_t = int(rng.integers(TEMPERATURE_RANGE[0], TEMPERATURE_RANGE[1] + 1))
        model = SeriesModel(**knobs)
        if peak_separation(model) < model.halo_radius + 3 * model.bragg_sigma:
            continue
        knobs["monitor_seed"] = be.GRID_SEED
        out.append((f"u{len(out):02d}", knobs, n_t))
    return out


def short_knobs(knobs: dict, n_t: int) -> str:
    abbrev = {"exposure": "exp", "background_level": "bg", "background_slope": "bg slope", "tc": "Tc",
              "beta": "β", "critical_cutoff": "cutoff", "cdw_amplitude": "CDW", "cdw_arms": "arms",
              "halo_amplitude": "halo", "halo_width": "halo w", "debye_waller": "DW", "monitor_jitter": "jitter",
              "pixels_per_zone": "px/zone", "cdw_wavevector": "q"}

    def val(k, v):
        if k == "cdw_wavevector":
            return "(" + ",".join(f"{x:.3g}" for x in v) + ")"
        if k == "debye_waller":
            return f"{v:.1e}"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return f"T={n_t}, " + ", ".join(f"{abbrev[k]} {val(k, v)}" for k, v in knobs.items() if k in abbrev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", type=int, default=24, help="settings drawn (default 24)")
    p.add_argument("--seeds", type=int, default=2, help="noise seeds per setting (default 2)")
    p.add_argument("--draw-seed", type=int, default=2026, help="seed of the settings' draw (default 2026)")
    p.add_argument("--size", type=int, default=64, help="spatial edge N of the (T, N, N, N) volumes (default 64)")
    p.add_argument("--results", default=None, help="RESULTS.md to merge the section into")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %s" % ", ".join(METHODS))
    p.add_argument("--save-json", default=None, help="write every run's scores to this file")
    p.add_argument("--compare-json", default=None,
                   help="a --save-json file from another checkout: classes auto there against here")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "classes auto" not in methods:
        p.error(f"--methods must name 'classes auto' and only {', '.join(METHODS)}; got {args.methods!r}")
    be.REF_BLAS_THREADS = 1
    command = "python benchmarks/bench_unseen.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    machine = be.machine_info()
    t_section = time.perf_counter()

    from xtec_flows.engine import cluster
    from xtec_flows.synthetic import CLASS_NAMES, make_volume, truth_block

    settings = draw_settings(args.settings, args.draw_seed)
    seeds = list(range(args.seeds))
    wv, wt, _ = make_volume((12, 24, 24, 24), seed=99)
    with be.warnings_quiet():
        for kw in ({"mode": "d", "n_components": be.K}, {"classes": "auto"}):
            cluster(wv, wt, random_state=0, **kw)
    import xtec_flows

    checkout = str(Path(xtec_flows.__file__).resolve().parent.parent)
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    if subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--", "xtec_flows"], capture_output=True,
                      text=True).stdout.strip():
        commit += "+dirty"

    res, meta = {}, {}
    for si, (name, knobs, n_t) in enumerate(settings):
        for seed in seeds:
            model = be.grid_model(knobs, seed)
            vol, temps, truth = make_volume((n_t, args.size, args.size, args.size), model=model, seed=seed)
            # The diagnostic truth of section 13: a peak class wherever its component exceeds the
            # background once, not twice (where the background is high the halo's outer voxels,
            # whose intensity still doubles at Tc, are "background" at contrast 2).
            truth_alt = truth_block(dataclasses.replace(model, truth_contrast=be.GRID_ALT_CONTRAST), None, vol.shape[1:])
            meta[name] = {"counts": {CLASS_NAMES[c]: int((truth == c).sum()) for c in range(len(CLASS_NAMES))},
                          "counts_alt": {CLASS_NAMES[c]: int((truth_alt == c).sum()) for c in range(len(CLASS_NAMES))},
                          "dT": float(temps[1] - temps[0]), "tc": model.tc}
            res[(name, seed)] = {m: be._grid_run(m, vol, temps, truth, seed, model, truth_alt) for m in methods}
            a = res[(name, seed)]["classes auto"]
            be.log(f"unseen [{si + 1}/{len(settings)}] {name} seed {seed}: "
                   + ("failed: " + a["failed"] if "failed" in a else
                      f"auto cdw {a['cdw']:.2f} halo {a['halo']:.2f} Tc {be.fmt_f(a.get('tc'), 1)} "
                      f"(model {model.tc:.1f}) kinds {a.get('kinds')}"))
            del vol, truth

    if args.save_json:
        Path(args.save_json).write_text(json.dumps({
            "checkout": checkout, "version": commit, "draw_seed": args.draw_seed,
            "settings": [[name, {k: v for k, v in knobs.items()}, n_t] for name, knobs, n_t in settings],
            "meta": meta, "runs": {f"{name}/{seed}": r for (name, seed), r in res.items()},
        }, default=float, indent=1))
    if len(methods) < len(METHODS):
        be.log("not every method ran: no section written (see --save-json)")
        return 0

    # ---- tables ------------------------------------------------------------------------------
    def applicable(name, cls):
        return meta[name]["counts"][cls] >= MIN_TRUTH_VOXELS

    setting_rows, seed_rows = [], []
    found_ok = found_n = tc_ok = tc_n = 0
    ari_ok, missed, tc_missed = 0, [], []
    auto_t, d_t = [], []
    for name, knobs, n_t in settings:
        runs = [res[(name, s)] for s in seeds]
        means = {m: {k: be._nanmean([r[m].get(k) for r in runs if "failed" not in r[m]])
                     for k in ("ari_all", "cdw", "halo", "time")} for m in METHODS}
        classes_needed = [c for c in ("cdw", "halo") if applicable(name, c)]
        for s, r in zip(seeds, runs):
            a = r["classes auto"]
            ok = "failed" not in a and all(a[c] >= be.GRID_FOUND_MIN for c in classes_needed)
            found_ok += ok
            found_n += 1
            if not ok:
                missed.append(f"{name}/{s}")
            tc_n += 1
            if "failed" not in a and a.get("tc_ok"):
                tc_ok += 1
            else:
                tc_missed.append(f"{name}/{s}")
            if "failed" not in a and "failed" not in r["xtec-flows d"]:
                auto_t.append(a["time"])
                d_t.append(r["xtec-flows d"]["time"])
            seed_rows.append([
                name, s,
                *(("failed" if "failed" in r[m] else
                   f"{be.fmt_f(r[m]['ari_all'])} · {be.fmt_f(r[m]['cdw'], 2)} · {be.fmt_f(r[m]['halo'], 2)}")
                  for m in METHODS),
                "failed" if "failed" in a else f"{a['n_classes']}: {', '.join(a['kinds'])}"
                + (f" ({a['n_unstable']} unstable)" if a.get("n_unstable") else ""),
                "-" if "failed" in a else f"{be.fmt_f(a.get('tc'), 1)} ± {be.fmt_f(a.get('tc_err'), 1)} "
                f"({'ok' if a.get('tc_ok') else 'off'})",
            ])
        ari_better = means["classes auto"]["ari_all"] >= means["reference d"]["ari_all"] - 1e-12
        ari_ok += ari_better
        c, c_alt = meta[name]["counts"], meta[name]["counts_alt"]
        alt = {k: be._nanmean([r["classes auto"].get(k) for r in runs if "failed" not in r["classes auto"]])
               for k in ("cdw_alt", "halo_alt")}
        setting_rows.append([
            name, short_knobs(knobs, n_t), f"{c['cdw']:,} / {c['halo']:,} ({c_alt['cdw']:,} / {c_alt['halo']:,})",
            *(f"{be.fmt_f(means[m]['cdw'], 2)} · {be.fmt_f(means[m]['halo'], 2)}" for m in METHODS),
            f"{be.fmt_f(alt['cdw_alt'], 2)} · {be.fmt_f(alt['halo_alt'], 2)}",
            f"{be.fmt_f(means['classes auto']['ari_all'])} vs {be.fmt_f(means['reference d']['ari_all'])}",
            f"{meta[name]['tc']:.1f} / {meta[name]['dT']:.1f}",
        ])
    ratio = float(np.mean(auto_t) / np.mean(d_t)) if auto_t else math.nan
    targets = [
        ["classes auto: CDW and halo found ≥ 0.8 (classes with ≥ %d truth voxels)" % MIN_TRUTH_VOXELS,
         f"{found_ok}/{found_n} runs" + (f"; missed {', '.join(missed)}" if missed else ""),
         be.verdict(found_ok == found_n)],
        ["classes auto: mean ARI (all) ≥ reference's, per setting", f"{ari_ok}/{len(settings)} settings",
         be.verdict(ari_ok == len(settings))],
        ["classes auto: CDW Tc within one temperature step", f"{tc_ok}/{tc_n} runs"
         + (f"; off {', '.join(tc_missed)}" if tc_missed else ""), be.verdict(tc_ok == tc_n)],
        ["classes auto time ≤ 3× xtec-flows d (mean over runs)", be.fmt_x(ratio),
         be.verdict(ratio <= be.GRID_TIME_RATIO_MAX)],
    ]
    compare_text = ""
    if args.compare_json:
        before = json.loads(Path(args.compare_json).read_text())
        if [s[0] for s in before["settings"]] != [s[0] for s in settings] or before["draw_seed"] != args.draw_seed:
            raise ValueError(f"--compare-json {args.compare_json} holds other draws; run it with the same "
                             "--settings and --draw-seed")
        rows, ok_before = [], 0
        for name, knobs, n_t in settings:
            needed = [c for c in ("cdw", "halo") if applicable(name, c)]
            for s in seeds:
                old = before["runs"].get(f"{name}/{s}", {}).get("classes auto", {"failed": "not run"})
                new = res[(name, s)]["classes auto"]

                def cell(r):
                    if "failed" in r:
                        return "failed"
                    return (f"{be.fmt_f(r['cdw'], 2)} · {be.fmt_f(r['halo'], 2)} · Tc {be.fmt_f(r.get('tc'), 1)} "
                            f"({'ok' if r.get('tc_ok') else 'off'}) · {r.get('n_classes')} classes")
                ok_before += "failed" not in old and all(old[c] >= be.GRID_FOUND_MIN for c in needed) and bool(
                    old.get("tc_ok"))
                rows.append([name, s, cell(old), cell(new)])
        ok_now = sum(1 for (name, s), r in res.items() if "failed" not in r["classes auto"]
                     and all(r["classes auto"][c] >= be.GRID_FOUND_MIN for c in ("cdw", "halo") if applicable(name, c))
                     and r["classes auto"].get("tc_ok"))
        compare_text = (
            f"### Classes auto before and after\n\nThe same draws and seeds, classes auto from `{before['checkout']}` "
            f"({before.get('version')}) against this checkout. Runs with CDW and halo found ≥ 0.8 and the CDW Tc within "
            f"one step: {ok_before}/{len(rows)} before, {ok_now}/{len(rows)} now. Cells: CDW found · halo found · CDW Tc "
            "(within one step?) · classes.\n\n" + be.table(["setting", "seed", "before", "now"], rows))
    knob_text = "; ".join(
        f"`{k}` {spec[0]} {spec[1]}–{spec[2]}" if spec[0] != "choice" else
        f"`{k}` one of {', '.join(str(tuple(round(x, 3) for x in v)) if isinstance(v, tuple) else str(v) for v in spec[1])}"
        for k, spec in UNSEEN_RANGES.items())
    body = "\n\n".join([
        f"{len(settings)} settings drawn with `numpy.random.default_rng({args.draw_seed})` (`draw_settings` in this "
        f"script), {len(seeds)} noise seeds each, volumes ({TEMPERATURE_RANGE[0]}–{TEMPERATURE_RANGE[1]} "
        f"temperatures, {args.size}³). Every knob at once: {knob_text}; `monitor_seed` = the noise seed. Draws with two "
        "peak sites closer than `halo_radius + 3 bragg_sigma` are drawn again (see the script's docstring). "
        "Scored as section 13 (truth at the model's `truth_contrast` 2); a class with fewer than "
        f"{MIN_TRUTH_VOXELS} truth voxels is not judged. Cells: mean CDW found · halo found over the seeds; the "
        "column \"classes auto at contrast 1\" scores the same runs against section 13's diagnostic truth (a peak "
        "class wherever its component exceeds the background once), which tells a missed halo from a critical class "
        "that holds the whole halo where the contrast-2 truth names only its core.",
        "### Per setting\n\n" + be.table(
            ["setting", "knobs", "truth CDW / halo voxels (contrast 1)", *METHODS, "classes auto at contrast 1",
             "ARI all: auto vs reference", "model Tc / T step"], setting_rows),
        "### Per run\n\nCells: ARI all · CDW found · halo found.\n\n" + be.table(
            ["setting", "seed", *METHODS, "auto classes: kinds", "CDW Tc ± err"], seed_rows),
        *([compare_text] if compare_text else []),
        be.table(["target", "value", "status"], targets),
    ])
    la = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    block = (f"{SECTION}\n\n_{machine['date']}; `{command}`; section took {be.fmt_t(time.perf_counter() - t_section)}; "
             f"load average at its end {la}._  \n_Machine: {be.machine_line(machine)}._\n\n{body}\n")
    print(block, flush=True)
    if args.results:
        be.merge_results(Path(args.results), {"unseen": block})
    return 0


if __name__ == "__main__":
    sys.exit(main())
