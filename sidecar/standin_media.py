"""The stand-in model's non-chat endpoints: images, audio, video, the Responses API, KServe v2.

Deterministic, so tests can compute exactly what each answer costs:
- images (``/v1/images/generations`` JSON, ``/edits`` and ``/variations`` multipart): ``n``
  images (1-10) of ``size``; each ``b64_json`` is a few bytes naming the image.
- ``/v1/audio/speech``: 100 bytes of audio per input character.
- ``/v1/audio/transcriptions`` and ``/translations`` (multipart ``file``): the upload is taken
  as 16 kHz 16-bit mono PCM, so it lasts ``bytes / 32000`` seconds; ``usage`` reports
  ``{"type": "duration", "seconds": ceil(that)}`` and ``verbose_json`` adds ``duration``.
- ``/v1/videos``: a finished video job echoing ``seconds`` and ``size``.
- ``/v1/responses``: prompt tokens are the words of ``input`` and ``instructions``; output is
  ``max_output_tokens`` (default ``default_max_tokens``) words, fewer with ``stop_after``;
  streamed as Responses events ending in ``response.completed`` with ``usage``.
- ``/v2/models/{name}/infer`` (KServe v2 / Triton): echoes the inputs as outputs after
  ``parameters.compute_ms`` milliseconds (at most 10 s) of pretend GPU time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from typing import Any

from aiohttp import web

from . import standin
from .standin import CONFIG, STATE, BadRequest, Json, count_words, read_json

IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024",
               "1024x1536", "auto")  # fmt: skip
IMAGE_QUALITIES = ("standard", "hd", "low", "medium", "high", "auto")
VIDEO_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
VIDEO_SECONDS = ("4", "8", "12")
PCM_BYTES_PER_SECOND = 32_000
MAX_COMPUTE_MS = 10_000


def _choice(body: Json, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name, default)
    if value not in allowed:
        raise BadRequest(f"'{name}' must be one of {', '.join(allowed)}", "invalid_value")
    return str(value)


def _count(body: Json, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, str) and value.isdigit():  # form fields arrive as text
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}", "invalid_value")
    return value


async def _form(request: web.Request) -> tuple[Json, dict[str, bytes]]:
    if request.content_type != "multipart/form-data":
        raise BadRequest("this endpoint takes multipart/form-data", "invalid_content_type")
    fields: Json = {}
    files: dict[str, bytes] = {}
    form = await request.post()
    for name, value in form.items():
        if isinstance(value, web.FileField):
            files[name] = value.file.read()
        else:
            fields[name] = value
    return fields, files


def _images(body: Json) -> web.Response:
    n = _count(body, "n", 1, 1, 10)
    size = _choice(body, "size", IMAGE_SIZES, "1024x1024")
    quality = _choice(body, "quality", IMAGE_QUALITIES, "standard")
    data = [
        {"b64_json": base64.b64encode(f"image {i} {size} {quality}".encode()).decode()}
        for i in range(n)
    ]
    return web.json_response({"created": int(time.time()), "data": data})


async def image_generations(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body.get("prompt"), str):
        raise BadRequest("'prompt' must be a string", "invalid_value")
    await asyncio.sleep(request.app[CONFIG].latency_ms / 1000)
    return _images(body)


async def image_edits(request: web.Request) -> web.StreamResponse:
    fields, files = await _form(request)
    if "image" not in files and "image[]" not in files:
        raise BadRequest("an 'image' file is required", "invalid_value")
    await asyncio.sleep(request.app[CONFIG].latency_ms / 1000)
    return _images(fields)


async def speech(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    text = body.get("input")
    if not isinstance(text, str) or not text:
        raise BadRequest("'input' must be a non-empty string", "invalid_value")
    await asyncio.sleep(request.app[CONFIG].latency_ms / 1000)
    audio = (text.encode()[:1] or b"\0") * (100 * len(text))
    return web.Response(body=audio, content_type="audio/mpeg")


async def transcription(request: web.Request) -> web.StreamResponse:
    fields, files = await _form(request)
    audio = files.get("file")
    if audio is None:
        raise BadRequest("a 'file' is required", "invalid_value")
    await asyncio.sleep(request.app[CONFIG].latency_ms / 1000)
    duration = len(audio) / PCM_BYTES_PER_SECOND
    seconds = math.ceil(duration)
    text = " ".join(f"word{i}" for i in range(seconds))
    fmt = fields.get("response_format", "json")
    if fmt == "text":
        return web.Response(text=text)
    payload: Json = {"text": text, "usage": {"type": "duration", "seconds": seconds}}
    if fmt == "verbose_json":
        task = "translate" if request.path.endswith("translations") else "transcribe"
        payload.update(task=task, language="english", duration=round(duration, 2))
    return web.json_response(payload)


async def videos(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    seconds = _choice(body, "seconds", VIDEO_SECONDS, "4")
    size = _choice(body, "size", VIDEO_SIZES, "720x1280")
    await asyncio.sleep(request.app[CONFIG].latency_ms / 1000)
    config = request.app[CONFIG]
    return web.json_response(
        {
            "id": f"video_standin_{time.time_ns()}",
            "object": "video",
            "model": str(body.get("model") or config.models[0]),
            "status": "completed",
            "progress": 100,
            "seconds": seconds,
            "size": size,
            "created_at": int(time.time()),
        }
    )


def _response_object(model: str, text: str, n_in: int, n_out: int, status: str) -> Json:
    return {
        "id": f"resp_standin_{time.time_ns()}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
    }


async def responses(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_json(request)
    raw_input = body.get("input")
    if isinstance(raw_input, list):
        n_in = sum(count_words(item.get("content")) for item in raw_input if isinstance(item, dict))
    else:
        n_in = count_words(raw_input)
    n_in += count_words(body.get("instructions"))
    limit = standin._int_field(body, "max_output_tokens", config.default_max_tokens)
    assert limit is not None
    stop_after = standin._int_field(body, "stop_after", None)
    n_out = limit if stop_after is None else min(stop_after, limit)
    model = str(body.get("model") or config.models[0])
    words = [f"tok{i}" for i in range(n_out)]
    status = "incomplete" if n_out == limit and limit else "completed"
    await asyncio.sleep(config.latency_ms / 1000)
    if not body.get("stream"):
        return web.json_response(_response_object(model, " ".join(words), n_in, n_out, status))
    resp = web.StreamResponse(headers=standin.SSE_HEADERS)
    await resp.prepare(request)
    created = _response_object(model, "", 0, 0, "in_progress")
    del created["usage"]
    await _event(resp, "response.created", {"response": created})
    for i, word in enumerate(words):
        if i:
            await asyncio.sleep(config.token_interval_ms / 1000)
        delta = word if i == 0 else f" {word}"
        await _event(resp, "response.output_text.delta", {"output_index": 0, "delta": delta})
    final = _response_object(model, " ".join(words), n_in, n_out, status)
    await _event(resp, "response.completed", {"response": final})
    await resp.write_eof()
    request.app[STATE].completed_streams += 1
    return resp


async def _event(resp: web.StreamResponse, kind: str, data: Json) -> None:
    payload = json.dumps({"type": kind, **data}, separators=(",", ":"))
    await resp.write(f"event: {kind}\ndata: {payload}\n\n".encode())


async def kserve_infer(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list", "invalid_value")
    parameters: Any = body.get("parameters") or {}
    compute_ms = _count(parameters, "compute_ms", 0, 0, MAX_COMPUTE_MS) if parameters else 0
    await asyncio.sleep(compute_ms / 1000)
    outputs = [
        {**item, "name": f"output{i}"} for i, item in enumerate(inputs) if isinstance(item, dict)
    ]
    return web.json_response(
        {"model_name": request.match_info["name"], "model_version": "1",
         "id": body.get("id", ""), "outputs": outputs}
    )  # fmt: skip


async def kserve_ready(request: web.Request) -> web.StreamResponse:
    return web.json_response({"name": request.match_info["name"], "ready": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/images/generations", image_generations)
    app.router.add_post("/v1/images/edits", image_edits)
    app.router.add_post("/v1/images/variations", image_edits)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcription)
    app.router.add_post("/v1/audio/translations", transcription)
    app.router.add_post("/v1/videos", videos)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v2/models/{name}/infer", kserve_infer)
    app.router.add_get("/v2/models/{name}/ready", kserve_ready)
