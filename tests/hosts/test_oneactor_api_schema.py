"""The OneActor routes in ``/openapi.json``: the create body's fields with types, defaults, ranges and descriptions,
the typed responses, and the same validation messages as before (FastAPI does not validate the body itself)."""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from lib_consistency.oneactor.request import CreateRequest, CreateRequestError

fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture
def app(monkeypatch):
    api = importlib.import_module("lib_consistency.hosts.oneactor.api")
    app = fastapi.FastAPI()
    api.register_api(None, app)
    return app, api


def _operation(app, method):
    return app.openapi()["paths"]["/consistent-story/oneactor/characters"][method]


def test_the_create_body_lists_every_field_with_type_default_and_range(app):
    body = _operation(app[0], "post")["requestBody"]["content"]["application/json"]["schema"]
    fields = {f.name: f for f in dataclasses.fields(CreateRequest)}
    assert list(body["properties"]) == list(fields)
    assert body["required"] == ["name", "prompt", "base_word"] and body["additionalProperties"] is False
    kinds = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
    for name, f in fields.items():
        entry = body["properties"][name]
        assert entry["type"] == kinds[f.type] and entry["description"]
        if f.default is not dataclasses.MISSING:
            assert entry["default"] == f.default
    assert (body["properties"]["steps"]["minimum"], body["properties"]["steps"]["maximum"]) == (1, 150)
    assert body["properties"]["cfg_scale"]["maximum"] == 30.0 and "CON" in body["properties"]["name"]["description"]


def test_the_responses_are_typed(app):
    listed = _operation(app[0], "get")["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["properties"]["characters"]["items"]["properties"]["base_word"] == {"type": "string"}
    created = _operation(app[0], "post")["responses"]
    assert set(created["200"]["content"]["application/json"]["schema"]["required"]) == {
        "name", "file", "base_word", "arch", "seed", "final_loss", "seconds"}
    assert {"400", "422"} <= set(created)


@pytest.mark.parametrize("body, field", [
    ({"name": "CON", "prompt": "a hobbit", "base_word": "hobbit"}, "name"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "steps": "30"}, "steps"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "colour": 1}, "colour"),
    (["name"], "body"),
])
def test_bad_bodies_get_the_requests_own_message(app, body, field):
    """The route still answers 422 with ``CreateRequest``'s message naming the field, not FastAPI's."""
    with pytest.raises(CreateRequestError) as expected:
        CreateRequest.from_dict(body)
    response = testclient.TestClient(app[0]).post("/consistent-story/oneactor/characters", json=body)
    assert response.status_code == 422 and response.json() == {"detail": str(expected.value)}
    assert f"field '{field}'" in response.json()["detail"]
