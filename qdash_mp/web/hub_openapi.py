"""The hub's part of the OpenAPI document (``qdash_mp.hub``): per-host rows, ``?host=``, 202.

On a hub (``qdash-mp hub``) ``/queues/api/stats`` also carries ``hosts`` (one row per
publishing host), every GET route takes ``?host=NAME`` (one host only; an unknown name is a
404), and retry/forget of a job whose host has not executed the command yet answer 202
``{"ok": true, "queued": true, "host"}``. A single collector's dashboard has none of these.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_hub_docs"]

_HOST_PARAM = {
    "name": "host",
    "in": "query",
    "required": False,
    "description": "hub only: read one host (a name in the hosts of /queues/api/stats)",
    "schema": {"type": "string"},
}


def add_hub_docs(doc: dict[str, Any]) -> None:
    """Add the hub's schemas, parameter and responses to the OpenAPI ``doc`` in place."""
    schemas = doc["components"]["schemas"]
    qs = {"$ref": "#/components/schemas/QueueStat"}
    schemas["HostRow"] = {
        "type": "object",
        "required": ["last_seen", "stale", "seq", "queued", "queues", "totals"],
        "properties": {
            "last_seen": {"type": "number"},
            "stale": {"type": "boolean"},
            "seq": {"type": "integer"},
            "queued": {"type": "integer", "minimum": 0},
            "version": {"type": ["string", "null"]},
            "pid": {"type": ["integer", "null"]},
            "started_at": {"type": ["number", "null"]},
            "queues": {"type": "object", "additionalProperties": qs},
            "totals": qs,
        },
    }
    schemas["Stats"]["properties"]["hosts"] = {
        "type": "object",
        "description": "hub only: host name -> that host's rows (stale hosts keep their counts)",
        "additionalProperties": {"$ref": "#/components/schemas/HostRow"},
    }
    done = schemas["ActionDone"]["properties"]
    done["queued"] = {"type": "boolean"}
    done["host"] = {"type": "string"}
    for path, item in doc["paths"].items():
        get = item.get("get")
        if get is not None and path.startswith("/queues/api/") and "openapi" not in path:
            get.setdefault("parameters", []).append(_HOST_PARAM)
        post = item.get("post")
        if post is not None and path.endswith(("/retry", "/forget")):
            post["responses"]["202"] = {
                "description": "hub only: queued for a host that has not executed it yet",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ActionDone"}}
                },
            }
