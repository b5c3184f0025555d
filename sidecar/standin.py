"""Stand-in model server: a deterministic OpenAI-compatible "GPU inference service" (no GPU,
no model) for the demo, tests and benchmarks.

Prompt tokens = sum of ``len(text.split())`` over message contents (chat), prompts (completions)
or inputs (embeddings). Completion tokens = ``max_tokens`` (or ``max_completion_tokens``, else
``default_max_tokens``), fewer if the request has the extension field ``"stop_after": N``;
token i is the word ``tok{i}``. ``usage_mode``: ``body`` (OpenAI ``usage`` in the JSON, or a
final SSE chunk with empty ``choices`` if ``stream_options.include_usage``), ``header``
(``X-Usage-Input-Tokens``/``X-Usage-Output-Tokens``, non-streaming only) or ``none``.

Images, audio, video, the Responses API and KServe v2 are in :mod:`.standin_media`.

Test helpers: ``/echo`` (headers as lowercase name -> list of values, body), ``/bytes?n=N&
chunk=C&interval_ms=I&seed=S`` (:func:`pseudo_random_bytes`, chunked), ``/slow?ms=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from spendgate.listening import ListenError, bind_listener

Json = dict[str, Any]
log = logging.getLogger("spendgate.standin")


@dataclass(frozen=True)
class StandinConfig:
    latency_ms: float = 0  # before the first token / the response (inference endpoints)
    token_interval_ms: float = 0  # between streamed tokens
    default_max_tokens: int = 16
    usage_mode: Literal["body", "header", "none"] = "body"
    fail_status: int | None = None  # answer every request with this status
    models: tuple[str, ...] = ("standin",)
    # Its own bounds, as a real model server has them: a request beyond one is refused (400,
    # 413) before any work is done, so no input makes it allocate without bound.
    max_output_tokens: int = 8192
    max_body_bytes: int = 1024 * 1024


@dataclass
class StandinState:
    requests: Counter[str] = field(default_factory=Counter)  # "POST /v1/chat/completions": n
    completed_streams: int = 0
    aborted_streams: int = 0  # client went away mid-stream


CONFIG = web.AppKey("standin_config", StandinConfig)
STATE = web.AppKey("standin_state", StandinState)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


# Bounds of the test helpers and of embeddings (OpenAI's own input limit is 2048 items).
MAX_HELPER_BYTES = 64 * 1024 * 1024
MAX_SLOW_MS = 600_000
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_DIMENSIONS = 4096


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def error_response(status: int, type_: str, code: str, message: str) -> web.Response:
    error = {"type": type_, "code": code, "message": message}
    return web.json_response({"error": error}, status=status)


def pseudo_random_bytes(n: int, seed: int = 0) -> bytes:
    """What ``/bytes?n=N&seed=S`` sends, for byte-exact passthrough checks."""
    return random.Random(seed).randbytes(n)


def count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):  # list of strings, or chat content parts
        return sum(count_words(p.get("text") if isinstance(p, dict) else p) for p in value)
    return 0


def _int_field(
    body: Json, name: str, default: int | None, maximum: int | None = None
) -> int | None:
    value = body.get(name, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise BadRequest(f"'{name}' must be a non-negative integer", "invalid_value")
    if value is not None and maximum is not None and value > maximum:
        raise BadRequest(
            f"'{name}' is too large: {value}; this model allows at most {maximum}",
            "invalid_value",
        )
    return value


async def read_json(request: web.Request) -> Json:
    try:
        raw = await request.read()  # at most client_max_size, decompressed
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        raise BadRequest(
            f"request body is larger than {limit} bytes", "body_too_large", 413
        ) from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", "invalid_json")
    return body


@web.middleware
async def standin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request.app[STATE].requests[f"{request.method} {request.path}"] += 1
    status = request.app[CONFIG].fail_status
    if status is not None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return error_response(status, kind, "standin_fail_status", f"configured to fail ({status})")
    try:
        return await handler(request)
    except BadRequest as e:
        return error_response(e.status, "invalid_request_error", e.code, str(e))


class Generation:
    """One completion request: parsed limits, timing and the OpenAI envelope."""

    def __init__(self, request: web.Request, body: Json, kind: str) -> None:
        self.config = request.app[CONFIG]
        self.request = request
        self.kind = kind  # "chat.completion" | "text_completion"
        self.model = str(body.get("model") or self.config.models[0])
        most = self.config.max_output_tokens
        max_tokens = _int_field(body, "max_completion_tokens", None, most)
        max_tokens = _int_field(body, "max_tokens", max_tokens, most)
        self.max_tokens = self.config.default_max_tokens if max_tokens is None else max_tokens
        stop_after = _int_field(body, "stop_after", None)
        self.n_out = self.max_tokens if stop_after is None else min(stop_after, self.max_tokens)
        self.finish_reason = "length" if self.n_out == self.max_tokens else "stop"
        if kind == "chat.completion":
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise BadRequest("'messages' must be a list", "invalid_value")
            self.n_in = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
        else:
            self.n_in = count_words(body.get("prompt"))
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-standin-{time.time_ns()}"
        self.created = int(time.time())

    def envelope(self, choices: list[Json], chunk: bool) -> Json:
        obj = f"{self.kind}.chunk" if chunk and self.kind == "chat.completion" else self.kind
        return dict(id=self.id, object=obj, created=self.created, model=self.model, choices=choices)

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> Json:
        out: Json = {"index": 0, "finish_reason": finish}
        if self.kind != "chat.completion":
            return {**out, "text": text or ""}
        if not self.stream:
            return {**out, "message": {"role": "assistant", "content": text}}
        delta = {"role": "assistant"} if first else {}
        return {**out, "delta": delta if text is None else {**delta, "content": text}}

    async def respond(self) -> web.StreamResponse:
        await asyncio.sleep(self.config.latency_ms / 1000)
        if self.stream:
            return await self.respond_stream()
        text = " ".join(f"tok{i}" for i in range(self.n_out))
        payload = self.envelope([self.choice(text, self.finish_reason)], chunk=False)
        return with_usage(self.config, payload, self.n_in, self.n_out)

    async def respond_stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(self.request)
        state = self.request.app[STATE]
        try:
            for i in range(self.n_out):
                if i:
                    await asyncio.sleep(self.config.token_interval_ms / 1000)
                text = f"tok{i}" if i == 0 else f" tok{i}"
                await send_event(resp, self.envelope([self.choice(text, None, i == 0)], True))
            last = self.choice(None, self.finish_reason, first=self.n_out == 0)
            await send_event(resp, self.envelope([last], True))
            if self.include_usage and self.config.usage_mode == "body":
                usage = usage_dict(self.n_in, self.n_out)
                await send_event(resp, {**self.envelope([], True), "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            state.aborted_streams += 1
            raise
        state.completed_streams += 1
        return resp


def usage_dict(n_in: int, n_out: int | None) -> dict[str, int]:
    """OpenAI ``usage``; ``n_out`` None for embeddings (no completion tokens)."""
    if n_out is None:
        return {"prompt_tokens": n_in, "total_tokens": n_in}
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def with_usage(cfg: StandinConfig, payload: Json, n_in: int, n_out: int | None) -> web.Response:
    headers = {}
    if cfg.usage_mode == "body":
        payload["usage"] = usage_dict(n_in, n_out)
    elif cfg.usage_mode == "header":
        headers = {"X-Usage-Input-Tokens": str(n_in), "X-Usage-Output-Tokens": str(n_out or 0)}
    return web.json_response(payload, headers=headers)


async def send_event(resp: web.StreamResponse, data: Json) -> None:
    await resp.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")


async def completions(request: web.Request) -> web.StreamResponse:
    kind = "chat.completion" if request.path.endswith("/chat/completions") else "text_completion"
    return await Generation(request, await read_json(request), kind).respond()


async def embeddings(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_json(request)
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"'input' has more than {MAX_EMBEDDING_INPUTS} items", "invalid_value")
    dims = _int_field(body, "dimensions", 8, MAX_EMBEDDING_DIMENSIONS) or 8
    await asyncio.sleep(config.latency_ms / 1000)
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(item).encode()).digest()
        vector = [round(digest[j % 32] / 255 - 0.5, 6) for j in range(dims)]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    model = str(body.get("model") or config.models[0])
    payload = {"object": "list", "data": data, "model": model}
    return with_usage(config, payload, count_words(inputs), None)


async def list_models(request: web.Request) -> web.StreamResponse:
    models = request.app[CONFIG].models
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "standin"} for m in models]
    return web.json_response({"object": "list", "data": data})


async def echo(request: web.Request) -> web.StreamResponse:
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    raw = await request.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    info = dict(method=request.method, path=request.path, query=request.query_string)
    body = raw.decode(errors="replace")
    return web.json_response({**info, "headers": headers, "body": body, "json": parsed})


def _query_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    value = request.query.get(name, str(default))
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"'{name}' must be a non-negative integer", "invalid_value")
    if len(value) > len(str(maximum)) or int(value) > maximum:
        raise BadRequest(f"'{name}' is too large: at most {maximum}", "invalid_value")
    return int(value)


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    n = _query_int(request, "n", 1024, MAX_HELPER_BYTES)
    chunk = max(1, _query_int(request, "chunk", 4096, MAX_HELPER_BYTES))
    interval = _query_int(request, "interval_ms", 0, MAX_SLOW_MS)
    seed = _query_int(request, "seed", 0, 2**63)
    await request.read()
    data = pseudo_random_bytes(n, seed)
    sha = {"X-Bytes-Sha256": hashlib.sha256(data).hexdigest()}
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **sha})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for offset in range(0, n, chunk):
        if offset:
            await asyncio.sleep(interval / 1000)
        await resp.write(data[offset : offset + chunk])
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.StreamResponse:
    ms = _query_int(request, "ms", 1000, MAX_SLOW_MS)
    await asyncio.sleep(ms / 1000)
    return web.json_response({"slept_ms": ms})


def create_app(config: StandinConfig | None = None) -> web.Application:
    config = config or StandinConfig()
    # aiohttp stops reading a body at client_max_size; the JSON routes answer that in the
    # OpenAI error shape (413), the test helpers with aiohttp's own 413.
    app = web.Application(middlewares=[standin_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = StandinState()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_route("*", "/echo", echo)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/bytes", stream_bytes)
        app.router.add_route(method, "/slow", slow)
    from .standin_media import add_routes  # it builds on this module's helpers

    add_routes(app)
    return app


DESCRIPTION = """\
A deterministic OpenAI-compatible model server with no model and no GPU, for the demo, tests
and benchmarks. It answers /v1/chat/completions, /v1/completions (both also streaming),
/v1/embeddings and /v1/models.

Prompt tokens are the words of the messages or prompt; a completion is max_tokens words (or
--default-max-tokens), fewer if the request has "stop_after": N. Usage is reported as OpenAI
"usage" in the body (and a final stream chunk when stream_options.include_usage is set), as
X-Usage-Input-Tokens / X-Usage-Output-Tokens headers, or not at all (--usage-mode).

Like a real server it bounds its own work: max_tokens above --max-output-tokens is a 400 and a
body above --max-body-bytes a 413, both in the OpenAI error shape.

Test helpers: /echo (the request back as JSON), /bytes?n=N&chunk=C&interval_ms=I&seed=S
(N pseudo-random bytes, chunked) and /slow?ms=N.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spendgate standin-model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default %(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=8001,
        metavar="PORT",
        help="port to listen on, 0 for any free one (default %(default)s)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=0,
        metavar="MS",
        help="delay before the first token or response (default %(default)s)",
    )
    p.add_argument(
        "--token-interval-ms",
        type=float,
        default=0,
        metavar="MS",
        help="delay between streamed tokens (default %(default)s)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=16,
        metavar="N",
        help="completion length when a request has no max_tokens (default %(default)s)",
    )
    p.add_argument(
        "--max-output-tokens",
        type=_positive,
        default=StandinConfig.max_output_tokens,
        metavar="N",
        help="largest max_tokens a request may ask for; more is a 400 (default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=StandinConfig.max_body_bytes,
        metavar="BYTES",
        help="largest request body, after decompression; more is a 413 (default %(default)s)",
    )
    p.add_argument(
        "--usage-mode",
        choices=["body", "header", "none"],
        default="body",
        help="how token usage is reported (default %(default)s)",
    )
    p.add_argument(
        "--fail-status",
        type=int,
        default=None,
        metavar="STATUS",
        help="answer every request with this HTTP status (for failure tests)",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model name /v1/models lists, repeatable (default: standin)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (slow)")
    return p


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    opts = vars(build_parser().parse_args(argv))
    host, port, access_log = opts.pop("host"), opts.pop("port"), opts.pop("access_log")
    config = StandinConfig(**{**opts, "models": tuple(opts["models"] or ("standin",))})
    try:  # bound before it says it started: a port in use is this one line, not a traceback
        sock = bind_listener(host, port, what="the stand-in model")
    except ListenError as error:
        print(f"spendgate standin-model: {error}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bound_port = sock.getsockname()[1]
    line = {"event": "standin_start", "host": host, "port": bound_port, **asdict(config)}
    log.info(json.dumps(line))
    access = logging.getLogger("aiohttp.access") if access_log else None
    web.run_app(create_app(config), sock=sock, print=None, access_log=access)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
