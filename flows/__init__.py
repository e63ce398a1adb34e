"""Prefect flows and deployments for xtec-flows: thin orchestration over the library.

    cluster_scan.py   one scan -> clustering -> result in Tiled, with Prefect artifacts
    reprocess.py      scheduled selection of scans to re-cluster (cron deployment)
    submit.py         start a cluster_scan run exactly once per (scan, parameters)
    serve.py          one process serving both deployments plus the Tiled scan watcher
                      (and, with --live, the follower of running scans)
    alerts.py         a class that signals a transition, as a Prefect event

The numerics, Tiled I/O and the watcher logic live in ``xtec_flows``; nothing here touches
an array. This folder installs as the package ``xtec_flows_prefect`` (pyproject.toml), so the
modules import each other by that name; the library never imports them (``xtec-flows serve``
finds :mod:`xtec_flows_prefect.serve` through the entry point group ``xtec_flows.serving``).
"""
