"""A class that signals a transition, announced as a Prefect event.

The live follower (:mod:`xtec_flows.tiled.live`) calls :func:`emit_class_alert` the first
time a running scan shows an order parameter, a critical class or an onset. The event is
``xtec.class.appeared`` on the resource ``xtec.scan.<uid>``; a facility routes it to people
with one of Prefect's own automations (deploy/prefect/class-alert-automation.json sends it to
a webhook). The event id is derived from (scan, kind), so an alert re-sent after a restart is
the same event to Prefect, not a second one.
"""

from __future__ import annotations

import uuid

CLASS_APPEARED = "xtec.class.appeared"
#: uuid5 namespace of the alert ids (fixed: the same (scan, kind) gives the same id everywhere).
ALERT_NAMESPACE = uuid.UUID("5f0c3d1e-7b1a-4e55-9c1e-0a7e5c1a55e5")


def class_alert_event(alert, tiled_uri: str | None = None) -> dict:
    """The keyword arguments of ``prefect.events.emit_event`` for a ClassAlert."""
    resource = {"prefect.resource.id": f"xtec.scan.{alert.scan}", "prefect.resource.name": alert.sample or alert.scan,
                "xtec.kind": alert.kind}
    if tiled_uri:
        resource["tiled.uri"] = tiled_uri
    payload = alert.to_dict()
    payload["message"] = (f"{alert.kind.replace('_', ' ')} class appeared in scan {alert.scan}"
                          + (f" (sample {alert.sample})" if alert.sample else "")
                          + f" after {alert.n_temperatures} temperatures (last {alert.temperature:g})"
                          + (f"; Tc = {alert.tc:g}" if alert.tc is not None else ""))
    return {"event": CLASS_APPEARED, "resource": resource, "payload": payload,
            "id": uuid.uuid5(ALERT_NAMESPACE, f"{alert.scan}/{alert.kind}")}


def emit_class_alert(alert, tiled_uri: str | None = None) -> None:
    """Emit the alert as a Prefect event (raises when the event could not be handed over)."""
    from prefect.events import emit_event

    if emit_event(**class_alert_event(alert, tiled_uri)) is None:
        raise RuntimeError("Prefect did not accept the event (is PREFECT_API_URL set and the server up?)")
