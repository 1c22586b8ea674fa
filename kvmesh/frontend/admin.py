"""The admin API: models loaded and unloaded at runtime (a cluster frontend only).

    GET  /v1/admin/models                 every model: state and workers
    POST /v1/admin/models/{name}/load     start its workers again (their launchers do)
    POST /v1/admin/models/{name}/unload   no new requests; its workers drain and stop

The router holds which models are loaded (protocol.ModelControl); these routes ask it.
With API keys configured, the Gate (kvmesh.frontend.limits) admits only requests that
carry one, as on every route but /health. An unknown model is a 404 naming the served
ones; a router that does not answer, a 503.
"""

from __future__ import annotations

from typing import Protocol

from fastapi import FastAPI

from kvmesh.frontend.serving import model_not_found
from kvmesh.protocol import ModelStates

ADMIN_PATH = "/v1/admin/models"


class ModelAdmin(Protocol):
    """What the admin routes call (the frontend actor); both raise BackendUnavailable
    when the router cannot answer, control_model KeyError for an unknown model."""

    async def model_states(self) -> ModelStates: ...

    async def control_model(self, name: str, action: str) -> ModelStates: ...


def add_admin_routes(app: FastAPI, admin: ModelAdmin) -> None:
    @app.get(ADMIN_PATH)
    async def list_models() -> dict:
        return as_json(await admin.model_states())

    @app.post(ADMIN_PATH + "/{name}/load")
    async def load_model(name: str) -> dict:
        return await control(name, "load")

    @app.post(ADMIN_PATH + "/{name}/unload")
    async def unload_model(name: str) -> dict:
        return await control(name, "unload")

    async def control(name: str, action: str) -> dict:
        try:
            states = await admin.control_model(name, action)
        except KeyError:
            served = [m.name for m in (await admin.model_states()).models]
            raise model_not_found(name, served, "name") from None
        return as_json(states)


def as_json(states: ModelStates) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "state": m.state,
                "workers": m.workers,
                "unloaded_workers": m.unloaded_workers,
            }
            for m in states.models
        ],
    }
