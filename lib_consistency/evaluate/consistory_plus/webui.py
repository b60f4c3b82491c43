"""A small client of the WebUI's HTTP API (A1111 and Forge, started with ``--api``), standard library only
(hosts.md §8): ``GET /sdapi/v1/scripts``, ``POST /sdapi/v1/txt2img`` with ``alwayson_scripts``."""
from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Any

from .sets import BenchmarkError

SCRIPT_NAME = "consistent story"


class WebUI:
    def __init__(self, url: str, timeout: float = 3600.0):
        if not url.startswith(("http://", "https://")):
            raise BenchmarkError(f"--url {url!r}: expected an http:// or https:// address of the WebUI")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, path: str, payload: dict | None = None) -> Any:
        """The decoded JSON answer; BenchmarkError naming the URL and the server's message on any failure."""
        target = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(target, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            hint = " (is the WebUI started with --api?)" if error.code == 404 else ""
            raise BenchmarkError(f"{target} answered HTTP {error.code}{hint}: {_server_message(error)}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise BenchmarkError(f"cannot reach the WebUI at {target} ({reason}); is it running with --api?") \
                from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise BenchmarkError(f"{target} answered something that is not JSON: {body[:200]!r}") from None

    def check_extension(self) -> None:
        """BenchmarkError unless the server runs txt2img scripts and has Consistent Story among them."""
        scripts = self.call("/sdapi/v1/scripts")
        names = scripts.get("txt2img") if isinstance(scripts, dict) else None
        if not isinstance(names, list):
            raise BenchmarkError(f"{self.url}/sdapi/v1/scripts: unexpected answer {str(scripts)[:200]}")
        if SCRIPT_NAME not in [str(n).lower() for n in names]:
            raise BenchmarkError(f"{self.url}: the Consistent Story extension is not installed or not enabled in "
                                 "this WebUI (not in /sdapi/v1/scripts)")

    def model_name(self, title: str) -> str:
        """The ``model_name`` of the checkpoint ``title`` names (its title, file name or name, as the WebUI accepts
        them); BenchmarkError listing the server's checkpoints when none matches (the WebUI would silently keep the
        loaded one)."""
        models = self.call("/sdapi/v1/sd-models")
        if not isinstance(models, list):
            raise BenchmarkError(f"{self.url}/sdapi/v1/sd-models: unexpected answer {str(models)[:200]}")
        for model in models:
            names = {str(model.get("title", "")), str(model.get("model_name", "")),
                     str(model.get("filename", "")).replace("\\", "/").rsplit("/", 1)[-1]}
            if title in names or str(model.get("title", "")).startswith(title + " ["):
                return str(model.get("model_name", title))
        titles = ", ".join(str(m.get("title")) for m in models) or "none"
        raise BenchmarkError(f"--model {title!r}: not a checkpoint of {self.url} (it has: {titles})")

    def txt2img(self, payload: dict) -> list[bytes]:
        """The generated images as PNG bytes, in the server's order."""
        answer = self.call("/sdapi/v1/txt2img", payload)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not isinstance(images, list):
            raise BenchmarkError(f"{self.url}/sdapi/v1/txt2img: no 'images' in the answer")
        try:
            return [base64.b64decode(image.split(",", 1)[-1]) for image in images]
        except (ValueError, AttributeError) as error:
            raise BenchmarkError(f"{self.url}/sdapi/v1/txt2img: an image is not base64 ({error})") from None


def _server_message(error: urllib.error.HTTPError) -> str:
    raw = error.read() or b""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:500].decode("utf-8", "replace") or str(error.reason)
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "detail", "errors") if body.get(k)]
        return ": ".join(parts)[:1000] or str(body)[:500]
    return str(body)[:500]
