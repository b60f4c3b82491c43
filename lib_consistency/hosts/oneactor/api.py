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


def list_characters_route() -> dict[str, Any]:
    from .folder import characters_dir, describe_characters
    return {"folder": str(characters_dir()), "characters": describe_characters()}


def create_character_route(body: Any) -> dict[str, Any]:
    from fastapi import HTTPException
    from modules import call_queue, shared

    from ...oneactor.character_file import CharacterFileError
    from ...oneactor.request import CreateRequest, CreateRequestError
    from .create import CreateError, create_character

    try:
        request = CreateRequest.from_dict(body)
    except CreateRequestError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
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


def register_api(demo, app) -> None:
    from fastapi import Body

    def create(body: dict = Body(...)) -> dict:  # noqa: B008  (FastAPI's idiom)
        return create_character_route(body)

    app.add_api_route(ROUTE, list_characters_route, methods=["GET"])
    app.add_api_route(ROUTE, create, methods=["POST"])
