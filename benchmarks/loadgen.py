"""The load generators of `make bench`, each run as its own process printing one JSON result.

``python benchmarks/loadgen.py --target T --url U --keys K1,K2 --kind chat|images ...``
    HTTP: ``--concurrency`` keep-alive connections, each sending one request at a time for
    ``--warmup`` + ``--duration`` seconds; connection *i* uses key *i* mod the number of keys
    (so 32 connections over 32 keys are 32 customers).

Only the measured window counts (requests sent after the warm-up). The default client is a
minimal keep-alive HTTP/1.1 client on uvloop (~20-60 us of CPU per request), so the servers get
as much of the machine as possible; ``--client aiohttp`` uses aiohttp's client instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

CHAT_PATH = "/v1/chat/completions"
IMAGES_PATH = "/v1/images/generations"
# A token-priced chat completion, and an image request priced by the CEL rule `images` of
# examples/pricebook-media.yaml: 4 HD images of 1792x1024 (bound = cost = 4 x 0.12 USD).
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": (
        CHAT_PATH,
        {
            "model": "standin",
            "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly please"}],
            "max_tokens": 16,
        },
    ),
    "images": (
        IMAGES_PATH,
        {"prompt": "a lighthouse at dusk", "n": 4, "size": "1792x1024", "quality": "hd"},
    ),
}


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending one request at a time.

    Just enough HTTP for this benchmark: responses framed by Content-Length or chunked
    encoding (no trailers). Far cheaper per request than a full client, so on a 2-core machine
    the servers get as much CPU as possible.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            status = self._parse()
            if status is not None:
                self.waiter.set_result(status)

    def _parse(self) -> int | None:
        """The status of the complete response at the head of the buffer, which is consumed."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[:end]).lower()
        status = int(head[9:12])
        body_start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            total = body_start + int(head[at + 17 : stop if stop >= 0 else None])
        elif b"\r\ntransfer-encoding: chunked" in head:
            chunked_end = self._chunked_end(body_start)
            if chunked_end is None:
                return None
            total = chunked_end
        else:
            total = body_start  # 204/304: no body
        if len(buffer) < total:
            return None
        del buffer[:total]
        return status

    def _chunked_end(self, position: int) -> int | None:
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
            if size == 0:
                return line_end + 4 if len(buffer) >= line_end + 4 else None
            position = line_end + 2 + size + 2
            if position > len(buffer):
                return None

    async def request(self, payload: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter


@dataclass
class LoadResult:
    target: str
    concurrency: int
    client: str
    duration_s: float
    requests: int  # completed inside the measured window
    total_requests: int  # including warm-up
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    statuses: dict[str, int]
    loadgen_cpu_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per server process, in the run
    machine_busy_s: float = 0.0  # every process on the machine, same window

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))


def request_body(kind: str) -> tuple[str, bytes]:
    path, body = BODIES[kind]
    return path, json.dumps(body, separators=(",", ":")).encode()


def raw_request(host: str, port: int, key: str, kind: str) -> bytes:
    path, body = request_body(kind)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


Sender = Callable[[], Awaitable[int]]


async def raw_senders(url: str, keys: list[str], kind: str, concurrency: int) -> list[Sender]:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    senders: list[Sender] = []
    for index in range(concurrency):
        payload = raw_request(host, int(port), keys[index % len(keys)], kind)
        _, connection = await loop.create_connection(HttpConnection, host, int(port))

        def send(
            connection: HttpConnection = connection, payload: bytes = payload
        ) -> Awaitable[int]:
            return connection.request(payload)

        senders.append(send)
    return senders


async def aiohttp_senders(
    url: str, keys: list[str], kind: str, concurrency: int, stack: contextlib.AsyncExitStack
) -> list[Sender]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
    path, body = request_body(kind)
    senders: list[Sender] = []
    for index in range(concurrency):
        headers = {
            "Authorization": f"Bearer {keys[index % len(keys)]}",
            "Content-Type": "application/json",
        }

        async def send(headers: dict[str, str] = headers) -> int:
            async with session.post(url + path, data=body, headers=headers) as response:
                await response.read()
                return response.status

        senders.append(send)
    return senders


async def drive(
    target: str, senders: Sequence[Sender], duration: float, warmup: float, client: str
) -> LoadResult:
    """Run every sender in a loop for warmup + duration; the measured window's statistics."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    total = 0
    clock = time.perf_counter
    start = clock()
    measure_from, measure_to = start + warmup, start + warmup + duration
    cpu_before: list[float] = []

    async def worker(send: Sender) -> None:
        nonlocal total
        while True:
            sent = clock()
            if sent >= measure_to:
                return
            status = await send()
            total += 1
            if sent >= measure_from:
                latencies.append(clock() - sent)
                statuses[str(status)] += 1

    async def mark_cpu() -> None:
        await asyncio.sleep(warmup)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before.append(usage.ru_utime + usage.ru_stime)

    await asyncio.gather(mark_cpu(), *(worker(send) for send in senders))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    loadgen_cpu = usage.ru_utime + usage.ru_stime - cpu_before[0]
    if not latencies:
        raise SystemExit(f"no request to {target} completed in the measured window")
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return LoadResult(
        target=target,
        concurrency=len(senders),
        client=client,
        duration_s=duration,
        requests=len(latencies),
        total_requests=total,
        rps=len(latencies) / duration,
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        mean_ms=statistics.fmean(latencies) * 1000,
        max_ms=latencies[-1] * 1000,
        statuses=dict(statuses),
        loadgen_cpu_s=loadgen_cpu,
    )


async def http_load(ns: argparse.Namespace) -> LoadResult:
    keys = ns.keys.split(",")
    async with contextlib.AsyncExitStack() as stack:
        if ns.client == "raw":
            senders = await raw_senders(ns.url, keys, ns.kind, ns.concurrency)
        else:
            senders = await aiohttp_senders(ns.url, keys, ns.kind, ns.concurrency, stack)
        return await drive(ns.target, senders, ns.duration, ns.warmup, ns.client)


def run(coroutine: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the row's name in the report")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys", required=True, help="comma-separated API keys")
    parser.add_argument("--kind", choices=sorted(BODIES), default="chat")
    parser.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    ns = parser.parse_args(argv)
    print(json.dumps(asdict(run(http_load(ns)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
