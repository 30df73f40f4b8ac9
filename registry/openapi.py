"""The OpenAPI document (3.1 by default, 3.2 on request), generated from the same pydantic models
that validate."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from registry import __version__
from registry.admission.schemas import (
    InstanceCreate,
    InstanceList,
    InstanceOut,
    InstancePatch,
    InstanceQuery,
    RefusalOut,
    ReservationCreate,
    ReservationList,
    ReservationOut,
    ReservationPatch,
    ReservationQuery,
    TrialOut,
)
from registry.catalog.document import CatalogDocument
from registry.catalog.schemas import ApplyQuery, ApplyResult, ModelCreate, ModelPatch
from registry.fleet.schemas import FleetModelList, FleetModelsQuery, FleetOut, FleetQuery
from registry.footprints.schemas import FootprintOut
from registry.model import NAME_LIST_PATTERN
from registry.schemas import (
    ErrorOut,
    GpusOut,
    HealthOut,
    ListQuery,
    ModelList,
    ModelOut,
    ReadyOut,
    ValidationErrorOut,
)

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_ERRORS = {
    "422": _json(ValidationErrorOut, "Invalid parameters"),
}
# Naming a process by its pid in a container: a request that validates may still name no
# process the daemon can find (reason pid_unresolved, the why in detail).
_INVALID_OR_UNRESOLVED = {
    "422": {
        "description": "Invalid parameters, or a container_pid that resolves to no single "
        "host process (reason pid_unresolved)",
        "content": {
            "application/json": {"schema": {"anyOf": [_ref(ValidationErrorOut), _ref(RefusalOut)]}}
        },
    }
}
_VALIDATED = (
    ModelCreate,
    ModelPatch,
    ReservationCreate,
    ReservationPatch,
    InstanceCreate,
    InstancePatch,
    CatalogDocument,
)
_NOT_FOUND = {"404": _json(ErrorOut, "No such model")}
_WRITE_ERRORS = {
    "400": _json(ErrorOut, "Malformed request"),
    "401": _json(ErrorOut, "Missing or invalid bearer token"),
    "403": _json(ErrorOut, "Writes are disabled: no admin token configured"),
    "413": _json(ErrorOut, "Request body over 64 KiB"),
    "503": _json(ErrorOut, "Database unavailable"),
}


# One Server-Sent Event as OpenAPI 3.2 models it: its fields, with `data` a JSON document.
_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": ["snapshot", "models", "gpus", "reservations", "instances"],
        },
        "id": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "The generation this event brings the client to (Last-Event-ID).",
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"type": "object"},
        },
        "retry": {"type": "integer", "minimum": 0},
    },
}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": prop.get("description", ""),
            "schema": {k: v for k, v in prop.items() if k not in ("title", "description")},
        }
        for name, prop in schema["properties"].items()
    ]


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
}
_RESERVATION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_RESERVATION_ERRORS = {
    "400": _json(ErrorOut, "Malformed request"),
    "401": _json(ErrorOut, "Missing or invalid bearer token"),
    "403": _json(ErrorOut, "Reservations are disabled: no scheduler or admin token configured"),
    "413": _json(ErrorOut, "Request body over 64 KiB"),
    **_ERRORS,
}
_GONE = {"404": _json(ErrorOut, "No such open reservation")}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(model)}}, "required": True}


def _reservation_paths(secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "/reservations": {
            "get": {
                "summary": "Open reservations, oldest first",
                "operationId": "list_reservations",
                "responses": {"200": _json(ReservationList, "Open reservations")},
            },
            "post": {
                "summary": "Reserve VRAM for a load: check and book in one step (with "
                "make_room, claim the memory of idle instances)",
                "operationId": "create_reservation",
                "security": secured,
                "parameters": _query_parameters(ReservationQuery),
                "requestBody": _body(ReservationCreate),
                "responses": {
                    "200": _json(TrialOut, "dry_run: what a real request would get now"),
                    "201": _json(ReservationOut, "Booked"),
                    "202": _json(
                        ReservationOut,
                        "A claim: booked, free once the instances in `awaiting` have gone",
                    ),
                    "403": _json(ErrorOut, "A priority above 50 without an admin token"),
                    "404": _json(ErrorOut, "No such model or GPU"),
                    "409": _json(
                        RefusalOut,
                        "Does not fit now (insufficient_vram), never here (too_large), or the "
                        "model is disabled",
                    ),
                    "429": _json(RefusalOut, "Too many open (reason too_many)"),
                    "503": _json(
                        ErrorOut,
                        "GPU state unknown (with reason gpu_state_unknown), or not recorded",
                    ),
                    **_RESERVATION_ERRORS,
                    **_INVALID_OR_UNRESOLVED,
                },
            },
        },
        "/reservations/{id}": {
            "parameters": [_RESERVATION_ID],
            "get": {
                "summary": "One open reservation",
                "operationId": "get_reservation",
                "responses": {"200": _json(ReservationOut, "The reservation"), **_GONE},
            },
            "patch": {
                "summary": "Renew the lease from now, or name the loading process",
                "operationId": "renew_reservation",
                "security": secured,
                "requestBody": _body(ReservationPatch),
                "responses": {
                    "200": _json(ReservationOut, "Renewed"),
                    "503": _json(ErrorOut, "Not recorded on disk; nothing changed"),
                    **_GONE,
                    **_RESERVATION_ERRORS,
                },
            },
            "delete": {
                "summary": "Release: the load finished or failed",
                "operationId": "release_reservation",
                "security": secured,
                "responses": {
                    "204": {"description": "Released"},
                    **_GONE,
                    **_RESERVATION_ERRORS,
                },
            },
        },
        "/models/{id}/footprint": {
            "parameters": [_ID],
            "get": {
                "summary": "What the model's loads really took, per GPU product",
                "operationId": "get_footprint",
                "responses": {
                    "200": _json(FootprintOut, "Its footprint"),
                    "404": _json(ErrorOut, "No such model"),
                    "503": _json(ErrorOut, "Database unavailable"),
                    **_ERRORS,
                },
            },
            "delete": {
                "summary": "Discard the model's samples (its serving setup changed)",
                "operationId": "delete_footprint",
                "security": secured,
                "responses": {
                    "204": {"description": "Discarded"},
                    "404": _json(ErrorOut, "No such model"),
                    **_ERRORS,
                    **_WRITE_ERRORS,
                },
            },
        },
        "/instances": {
            "get": {
                "summary": "Instances: models loaded on this host, oldest first",
                "operationId": "list_instances",
                "parameters": _query_parameters(InstanceQuery),
                "responses": {"200": _json(InstanceList, "A page of live instances"), **_ERRORS},
            },
            "post": {
                "summary": "Bind a reservation to its loading process, or adopt a loaded model",
                "operationId": "create_instance",
                "security": secured,
                "requestBody": _body(InstanceCreate),
                "responses": {
                    "201": _json(InstanceOut, "Followed from now on"),
                    "404": _json(ErrorOut, "No such reservation, model or GPU"),
                    "409": _json(
                        RefusalOut,
                        "The process is not on the GPU (pid_not_on_gpu), or already holds a "
                        "live instance of the model there (already_loaded)",
                    ),
                    "429": _json(RefusalOut, "Too many instances (too_many)"),
                    "503": _json(
                        ErrorOut,
                        "Processes or GPU state unknown (with a reason), or not recorded",
                    ),
                    **_RESERVATION_ERRORS,
                    **_INVALID_OR_UNRESOLVED,
                },
            },
        },
        "/instances/{id}": {
            "parameters": [_RESERVATION_ID],
            "get": {
                "summary": "One instance",
                "operationId": "get_instance",
                "responses": {
                    "200": _json(InstanceOut, "The instance"),
                    "404": _json(ErrorOut, "No such instance"),
                },
            },
            "patch": {
                "summary": "Say how it stands: sessions, pinned, priority, or that it is ready",
                "operationId": "change_instance",
                "security": secured,
                "requestBody": _body(InstancePatch),
                "responses": {
                    "200": _json(InstanceOut, "The instance as it is now"),
                    "403": _json(ErrorOut, "Another token's, or a priority above 50"),
                    "404": _json(ErrorOut, "No such instance"),
                    "503": _json(ErrorOut, "Not recorded"),
                    **_RESERVATION_ERRORS,
                },
            },
            "delete": {
                "summary": "Report an unload",
                "operationId": "delete_instance",
                "security": secured,
                "responses": {
                    "204": {"description": "Ended"},
                    "404": _json(ErrorOut, "No such instance"),
                    **_RESERVATION_ERRORS,
                },
            },
        },
    }


# OpenAPI 3.1 (what code generators read) has no schema for a stream's items: the stream is
# one string there, and the 3.2 document models each event.
_EVENT_STREAM_31: dict[str, Any] = {
    "schema": {
        "type": "string",
        "description": "Server-Sent Events; each event's data is a JSON document. The OpenAPI "
        "3.2 document (?version=3.2) models the events.",
    }
}


@functools.cache
def openapi_json(version: str = "3.1") -> str:
    """The document, encoded once per version."""
    return json.dumps(openapi_document(version))


def openapi_document(version: str = "3.1") -> dict[str, Any]:
    """The OpenAPI document: 3.1 by default, 3.2 (events modelled item by item) on request."""
    document = _document_32()
    if version == "3.2":
        return document
    events = document["paths"]["/events"]["get"]["responses"]["200"]
    return {
        **document,
        "openapi": "3.1.0",
        "paths": {
            **document["paths"],
            "/events": {
                "get": {
                    **document["paths"]["/events"]["get"],
                    "responses": {
                        **document["paths"]["/events"]["get"]["responses"],
                        "200": {**events, "content": {"text/event-stream": _EVENT_STREAM_31}},
                    },
                }
            },
        },
    }


@functools.cache
def _document_32() -> dict[str, Any]:
    _, components = models_json_schema(
        [
            (m, "validation" if m in _VALIDATED else "serialization")
            for m in (
                ModelList,
                ModelOut,
                ModelCreate,
                ModelPatch,
                GpusOut,
                ErrorOut,
                ValidationErrorOut,
                HealthOut,
                ReadyOut,
                ReservationCreate,
                ReservationPatch,
                ReservationOut,
                ReservationList,
                InstanceCreate,
                InstancePatch,
                InstanceOut,
                InstanceList,
                TrialOut,
                FootprintOut,
                RefusalOut,
                CatalogDocument,
                ApplyResult,
                FleetOut,
                FleetModelList,
            )
        ],
        ref_template=_REF,
    )
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    model_body = _body(ModelCreate)
    patch_body = _body(ModelPatch)
    return {
        "openapi": "3.2.0",
        "info": {
            "title": "model-registry",
            "version": __version__,
            "description": "Which models can be loaded on this machine right now.",
        },
        "paths": {
            "/models": {
                "get": {
                    "summary": "List models",
                    "operationId": "list_models",
                    "parameters": _query_parameters(ListQuery),
                    "responses": {"200": _json(ModelList, "A page of models"), **_ERRORS},
                },
                "post": {
                    "summary": "Add a model",
                    "operationId": "create_model",
                    "security": secured,
                    "requestBody": model_body,
                    "responses": {
                        "201": _json(ModelOut, "Created"),
                        "409": _json(ErrorOut, "Name taken"),
                        **_ERRORS,
                        **_WRITE_ERRORS,
                    },
                },
                "put": {
                    "summary": "Apply a whole catalog: upsert by name, optionally prune",
                    "operationId": "apply_catalog",
                    "security": secured,
                    "parameters": _query_parameters(ApplyQuery),
                    "requestBody": _body(CatalogDocument),
                    "responses": {
                        "200": _json(ApplyResult, "What changed (or would, on a dry run)"),
                        **_ERRORS,
                        **_WRITE_ERRORS,
                        "413": _json(ErrorOut, "Request body over 16 MiB"),
                    },
                },
            },
            "/models/{id}": {
                "parameters": [_ID],
                "get": {
                    "summary": "One model",
                    "operationId": "get_model",
                    "responses": {"200": _json(ModelOut, "The model"), **_NOT_FOUND, **_ERRORS},
                },
                "patch": {
                    "summary": "Change a model",
                    "operationId": "patch_model",
                    "security": secured,
                    "requestBody": patch_body,
                    "responses": {
                        "200": _json(ModelOut, "The changed model"),
                        "409": _json(ErrorOut, "Name taken"),
                        **_NOT_FOUND,
                        **_ERRORS,
                        **_WRITE_ERRORS,
                    },
                },
                "delete": {
                    "summary": "Remove a model",
                    "operationId": "delete_model",
                    "security": secured,
                    "responses": {
                        "204": {"description": "Removed"},
                        **_NOT_FOUND,
                        **_ERRORS,
                        **_WRITE_ERRORS,
                    },
                },
            },
            "/gpus": {
                "get": {
                    "summary": "GPU devices and poller state",
                    "operationId": "gpus",
                    "responses": {"200": _json(GpusOut, "Devices")},
                }
            },
            **_reservation_paths(secured),
            "/events": {
                "get": {
                    "summary": "Server-Sent Events: a snapshot, then what changes",
                    "operationId": "events",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "query",
                            "required": False,
                            "description": "Comma-separated model names to limit model events to.",
                            "schema": {"type": "string", "pattern": NAME_LIST_PATTERN},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Events snapshot, models, gpus, reservations",
                            "content": {"text/event-stream": {"itemSchema": _EVENT}},
                        },
                        **_ERRORS,
                    },
                }
            },
            "/fleet": {
                "get": {
                    "summary": "Every host of the fleet and its state",
                    "operationId": "fleet",
                    "parameters": _query_parameters(FleetQuery),
                    "responses": {"200": _json(FleetOut, "The hosts"), **_ERRORS},
                }
            },
            "/fleet/models": {
                "get": {
                    "summary": "Where each model fits now, across the fleet",
                    "operationId": "fleet_models",
                    "parameters": _query_parameters(FleetModelsQuery),
                    "responses": {
                        "200": _json(FleetModelList, "A page of models with their hosts"),
                        **_ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "operationId": "healthz",
                    "responses": {"200": _json(HealthOut, "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: database reachable and migrated",
                    "operationId": "readyz",
                    "responses": {
                        "200": _json(ReadyOut, "Ready"),
                        "503": _json(ReadyOut, "Not ready, with the problems"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": components.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
