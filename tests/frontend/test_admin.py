"""The admin API's HTTP side (kvmesh.frontend.admin) over a recording ModelAdmin: its
routes, its answers, an unknown model's 404, a router that cannot answer (503), and API
keys (the Gate admits only a request that carries one). The router's side and the
launchers are tested on a real cluster in tests/cluster/test_models.py."""

import httpx
import pytest

from kvmesh.frontend.app import create_app
from kvmesh.frontend.backend import BackendUnavailable
from kvmesh.frontend.limits import HTTPLimits
from kvmesh.protocol import ModelState, ModelStates
from kvmesh.tokenizer import Tokenizer
from tests.frontend import StubBackend, running_server

KEY = "sk-admin-test"


class RecordingAdmin:
    """Serves models "stub" and "other"; records what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.router_down = False

    async def model_states(self) -> ModelStates:
        if self.router_down:
            raise BackendUnavailable("the router is unreachable", retry_after=2.0)
        unloaded = ("other", "unload") in self.calls
        return ModelStates(
            models=[
                ModelState(name="stub", state="loaded", workers=["decode-0"]),
                ModelState(
                    name="other",
                    state="unloaded" if unloaded else "loaded",
                    workers=[] if unloaded else ["decode-1"],
                    unloaded_workers=["decode-1"] if unloaded else [],
                ),
            ]
        )

    async def control_model(self, name: str, action: str) -> ModelStates:
        if name not in ("stub", "other"):
            raise KeyError(name)
        self.calls.append((name, action))
        return await self.model_states()


@pytest.fixture(scope="module")
def stub(tiny_model_dir):
    return StubBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture()
def admin():
    return RecordingAdmin()


def test_routes_ask_the_admin_and_answer_each_models_state(stub, admin):
    with running_server(create_app(stub, admin=admin)) as url:
        listed = httpx.get(f"{url}/v1/admin/models")
        unloaded = httpx.post(f"{url}/v1/admin/models/other/unload")
        unknown = httpx.post(f"{url}/v1/admin/models/gamma/load")
        admin.router_down = True
        down = httpx.get(f"{url}/v1/admin/models")
    assert listed.status_code == 200
    assert [(m["id"], m["state"], m["workers"]) for m in listed.json()["data"]] == [
        ("stub", "loaded", ["decode-0"]),
        ("other", "loaded", ["decode-1"]),
    ]
    assert unloaded.status_code == 200
    assert unloaded.json()["data"][1] == {
        "id": "other",
        "object": "model",
        "state": "unloaded",
        "workers": [],
        "unloaded_workers": ["decode-1"],
    }
    assert admin.calls == [("other", "unload")]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == (
        "model 'gamma' does not exist; this server serves 'stub', 'other'"
    )
    assert (down.status_code, down.headers["Retry-After"]) == (503, "2")


def test_with_api_keys_the_admin_api_needs_one(stub, admin):
    app = create_app(stub, HTTPLimits(api_keys=frozenset({KEY})), admin=admin)
    with running_server(app) as url:
        anonymous = [
            httpx.get(f"{url}/v1/admin/models").status_code,
            httpx.post(f"{url}/v1/admin/models/other/unload").status_code,
        ]
        wrong = httpx.post(
            f"{url}/v1/admin/models/other/unload", headers={"Authorization": "Bearer sk-no"}
        )
        keyed = httpx.post(
            f"{url}/v1/admin/models/other/unload", headers={"Authorization": f"Bearer {KEY}"}
        )
    assert anonymous == [401, 401]
    assert wrong.status_code == 401
    assert admin.calls == [("other", "unload")]  # only the keyed request reached it
    assert keyed.status_code == 200


def test_a_server_without_an_admin_has_no_admin_routes(stub):
    with running_server(create_app(stub)) as url:
        assert httpx.get(f"{url}/v1/admin/models").status_code == 404
