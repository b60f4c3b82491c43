"""OneActor over the WebUI's HTTP API (FastAPI app of both hosts, with ``--api`` or ``--nowebui``).

- ``GET  /consistent-story/oneactor/characters``: the character folder and every character in it.
- ``POST /consistent-story/oneactor/characters``: create one (JSON body = ``CreateRequest`` keys). The job takes the
  WebUI's queue lock (a second request waits, as generations do), shows in ``/sdapi/v1/progress`` and stops on
  ``/sdapi/v1/interrupt`` without writing a file. Invalid body: HTTP 422; refused or interrupted job: HTTP 400;
  both with ``detail`` naming the field, file or reason.

Registered from ``on_app_started(demo, app)`` (called with ``demo=None`` for ``--nowebui``).
"""
from __future__ import annotations

from typing import Any

ROUTE = "/consistent-story/oneactor/characters"
_STRING, _INTEGER, _NUMBER = {"type": "string"}, {"type": "integer"}, {"type": "number"}
CHARACTER_SCHEMA = {  # one entry of the list (``folder.describe_characters``); an unreadable file has ``error``
    "title": "OneActorCharacter", "type": "object", "required": ["name", "file"],
    "properties": {"name": _STRING, "file": _STRING, "hash": _STRING, "base_word": _STRING,
                   "arch": {"type": "string", "enum": ["sd15", "sdxl"]}, "checkpoint_name": _STRING,
                   "checkpoint_hash": _STRING, "prompt": _STRING, "seed": _INTEGER,
                   "error": {"type": "string", "description": "why the file cannot be read (only then)"}}}
LIST_SCHEMA = {"title": "OneActorCharacters", "type": "object", "required": ["folder", "characters"],
               "properties": {"folder": _STRING, "characters": {"type": "array", "items": CHARACTER_SCHEMA}}}
CREATED_SCHEMA = {  # what ``create.create_character`` answers
    "title": "OneActorCreated", "type": "object",
    "required": ["name", "file", "base_word", "arch", "seed", "final_loss", "seconds"],
    "properties": {"name": _STRING, "file": _STRING, "base_word": _STRING, "arch": _STRING, "seed": _INTEGER,
                   "final_loss": _NUMBER, "seconds": _NUMBER}}
ERROR_SCHEMA = {"title": "OneActorError", "type": "object", "properties": {"detail": _STRING}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def list_characters_route() -> dict[str, Any]:
    from .folder import characters_dir, describe_characters
    return {"folder": str(characters_dir()), "characters": describe_characters()}


def create_character_route(body: Any) -> dict[str, Any]:
    from fastapi import HTTPException

    from ...oneactor.request import CreateRequest, CreateRequestError

    try:
        request = CreateRequest.from_dict(body)
    except CreateRequestError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    from modules import call_queue, shared

    from ...oneactor.character_file import CharacterFileError
    from .create import CreateError, create_character

    with call_queue.queue_lock:
        shared.state.begin(job="consistent_story_oneactor")
        try:
            return create_character(request)
        except (CreateError, CharacterFileError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        except Exception as error:  # unexpected: the console gets the traceback, the client the message
            from modules import errors
            errors.report(f"OneActor: creating character '{request.name}' failed", exc_info=True)
            raise HTTPException(status_code=500, detail=f"OneActor: {type(error).__name__}: {error}") from None
        finally:
            shared.state.end()


def openapi_extras() -> dict[str, dict]:
    """The routes' documented bodies for ``/openapi.json`` (FastAPI deep-merges ``openapi_extra`` into each
    operation). The body stays a plain ``dict`` for FastAPI, so every client gets ``CreateRequest.from_dict``'s own
    messages, naming the field, rather than a second validator's."""
    from ...oneactor.request import CreateRequest
    return {
        "GET": {"summary": "List the OneActor characters of the folder", "responses": {"200": _json(LIST_SCHEMA)}},
        "POST": {"summary": "Create a OneActor character (runs the tuning job; waits for the WebUI's queue)",
                 "requestBody": {"required": True, **_json(CreateRequest.json_schema())},
                 "responses": {"200": _json(CREATED_SCHEMA),
                               "400": {"description": "refused or interrupted job", **_json(ERROR_SCHEMA)},
                               "422": {"description": "invalid body, naming the field", **_json(ERROR_SCHEMA)}}},
    }


def register_api(demo, app) -> None:
    from fastapi import Body

    def create(body: Any = Body(...)) -> dict:  # noqa: B008  (FastAPI's idiom); any JSON: from_dict judges it
        return create_character_route(body)

    extras = openapi_extras()
    app.add_api_route(ROUTE, list_characters_route, methods=["GET"], tags=["Consistent Story"],
                      openapi_extra=extras["GET"])
    app.add_api_route(ROUTE, create, methods=["POST"], tags=["Consistent Story"], openapi_extra=extras["POST"])
