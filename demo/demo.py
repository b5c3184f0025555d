"""`make demo`: spendgate in front of a stand-in model, live, in about twenty seconds.

Starts a throwaway redis-server, the stand-in model and the spendgate sidecar as subprocesses,
applies examples/pricebook.yaml and examples/budgets.yaml, then drives traffic from the example
customers and prints one line per notable event:

- acme (well funded) is served; each line shows tokens, the cost charged and the balance left;
- an acme stream prints its tokens as they arrive;
- burstco goes over 2 requests/second and gets 429 with Retry-After, then is served again;
- tinyco (a tenth of a cent) streams without max_tokens: the sidecar limits the request's
  output to what the balance pays for (X-Spendgate-Output-Limit), so the charge stays within
  the hold and the balance never goes below zero; further requests get 402 until a top-up
  (`spendgate fund`) lets it in again;
- an unknown API key gets 401.

It ends with a summary table and exits 0, or 1 with the reason and the tails of the
subprocess logs when something did not behave. Every subprocess and the temp dir are cleaned
up on success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio

from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.local_processes import (
    HOST,
    Processes,
    StartupFailure,
    accepts,
    free_port,
    http_ok,
    sigterm_as_interrupt,
    start_redis,
    wait_until,
)
from spendgate.money import format_amount

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SPENDGATE = str(BIN / "spendgate") if (BIN / "spendgate").exists() else "spendgate"
EXAMPLES = [ROOT / "examples" / "pricebook.yaml", ROOT / "examples" / "budgets.yaml"]

# Keys from examples/budgets.yaml (demo keys, published on purpose).
KEYS = {
    "acme": "sk-demo-acme-prod-7Qm2vX9c",
    "tinyco": "sk-demo-tinyco-Hb3kW8sQ",
    "burstco": "sk-demo-burstco-Zr5nY2dT",
    "postpaid": "sk-demo-postpaid-Vf6hJ0eK",
}
UNKNOWN_KEY = "sk-demo-nobody-00000000"
CUSTOMERS = list(KEYS)

# The stand-in model: a little latency, a visible token rhythm, and a default completion far
# longer than the PriceBook's 256-token estimate, so a request without max_tokens outruns it.
STANDIN_LATENCY_MS = 150
STANDIN_TOKEN_INTERVAL_MS = 8
STANDIN_DEFAULT_MAX_TOKENS = 4096
STARTUP_TIMEOUT_S = 20.0
SETTLE_TIMEOUT_S = 5.0


class DemoFailure(Exception):
    """Something did not behave as spendgate promises: exit 1 with this message."""


# --------------------------------------------------------------------------- output


class Out:
    """Timestamped event lines; colour only on a terminal (and never with NO_COLOR)."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def stamp(self) -> str:
        return datetime.now().strftime("%H:%M:%S.%f")[:-3]

    def event(self, who: str, what: str, detail: str = "", *, tone: str = "") -> None:
        codes = {"ok": "32", "warn": "33", "bad": "31", "info": "36"}
        label = self.paint(f"{what:<10}", codes[tone]) if tone else f"{what:<10}"
        print(f"{self.stamp()}  {who:<9} {label} {detail}".rstrip(), flush=True)

    def section(self, title: str) -> None:
        print(f"\n{self.paint('== ' + title, '1')}", flush=True)

    def raw(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


out = Out()


# --------------------------------------------------------------------------- processes


def run_cli(*args: str, redis_url: str) -> str:
    result = subprocess.run(
        [SPENDGATE, *args, "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise DemoFailure(
            f"spendgate {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result.stdout


@dataclass(frozen=True)
class Stack:
    redis_url: str
    sidecar_url: str


def start_stack(procs: Processes) -> Stack:
    _, redis_url = start_redis(procs, timeout=STARTUP_TIMEOUT_S)
    out.event("redis", "started", f"redis-server at {redis_url} (no persistence)")

    model_port = free_port()
    model = procs.start(
        "standin-model",
        [
            SPENDGATE, "standin-model", "--host", HOST, "--port", str(model_port),
            "--latency-ms", str(STANDIN_LATENCY_MS),
            "--token-interval-ms", str(STANDIN_TOKEN_INTERVAL_MS),
            "--default-max-tokens", str(STANDIN_DEFAULT_MAX_TOKENS),
        ],
    )  # fmt: skip
    wait_until(model, "listening", accepts(model_port), timeout=STARTUP_TIMEOUT_S)
    out.event(
        "model",
        "started",
        f"stand-in model on {HOST}:{model_port} ({STANDIN_LATENCY_MS} ms to first token,"
        f" {STANDIN_TOKEN_INTERVAL_MS} ms per token, {STANDIN_DEFAULT_MAX_TOKENS} tokens"
        " when max_tokens is absent)",
    )

    files = [arg for path in EXAMPLES for arg in ("-f", str(path))]
    applied = run_cli("apply", *files, redis_url=redis_url)
    for line in applied.splitlines():
        out.event("apply", "", line)

    sidecar_port, probe_port = free_port(), free_port()
    sidecar = procs.start(
        "sidecar",
        [
            SPENDGATE, "sidecar", "--upstream", f"http://{HOST}:{model_port}",
            "--listen", f"{HOST}:{sidecar_port}", "--probe-listen", f"{HOST}:{probe_port}",
            "--pricebook", "default/default",
            "--fail-mode", "closed", "--pod", "demo-pod", "--redis", redis_url,
            "--log-format", "text",
        ],
    )  # fmt: skip
    sidecar_url = f"http://{HOST}:{sidecar_port}"
    ready_url = f"http://{HOST}:{probe_port}/readyz"
    wait_until(sidecar, "ready", http_ok(ready_url), timeout=STARTUP_TIMEOUT_S)
    out.event("sidecar", "ready", f"{sidecar_url} -> model, fail-mode closed")
    return Stack(redis_url, sidecar_url)


# --------------------------------------------------------------------------- traffic


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def request_id(self) -> str:
        return self.headers.get("X-Spendgate-Request-Id", "")

    def error(self) -> str:
        error = self.body.get("error")
        if isinstance(error, dict):
            return f"{error.get('code')}: {error.get('message')}"
        return json.dumps(self.body)[:200]


class Driver:
    def __init__(self, stack: Stack, session: aiohttp.ClientSession, redis: Any) -> None:
        self.url = f"{stack.sidecar_url}/v1/chat/completions"
        self.session = session
        self.redis = redis
        self.ledger = Ledger(redis)

    @staticmethod
    def chat(prompt: str, max_tokens: int | None = None, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "standin",
            "messages": [{"role": "user", "content": prompt}],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def post(self, who: str, key: str, body: dict[str, Any]) -> Answer:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.session.post(self.url, json=body, headers=headers) as response:
            text = await response.text()
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"raw": text[:200]}
        return Answer(response.status, dict(response.headers), payload)

    async def charged(self, customer: str, request_id: str) -> int | None:
        """The cost settled for a request, once the sidecar has settled it (it does so after the
        response). None when it was released without a charge."""
        key = for_customer(customer).request(request_id)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            raw = await self.redis.get(key)
            if raw is not None:
                state = raw.decode()
                if state.startswith("settled:"):
                    return int(state.partition(":")[2])
                return None
            await asyncio.sleep(0.02)
        raise DemoFailure(f"request {request_id} of {customer} was not settled in time")

    async def ledger_entry(self, customer: str, request_id: str) -> dict[str, str]:
        """The usage entry the settlement appended to the customer's ledger stream."""
        entries = await self.redis.xrevrange(for_customer(customer).ledger, count=50)
        for _, fields in entries:
            entry = {k.decode(): v.decode() for k, v in fields.items()}
            if entry.get("request_id") == request_id:
                return entry
        raise DemoFailure(f"no ledger entry for request {request_id} of {customer}")

    async def balance(self, customer: str) -> str:
        account = await self.ledger.account(customer)
        return f"{format_amount(account.available)} {account.currency}"

    async def served_line(self, who: str, answer: Answer, note: str = "") -> None:
        usage = answer.body.get("usage") or {}
        cost = await self.charged(who, answer.request_id)
        tokens = f"{usage.get('prompt_tokens', '?')}+{usage.get('completion_tokens', '?')} tok"
        out.event(
            who,
            f"{answer.status} ok",
            f"{tokens:<10} charged {format_amount(cost or 0):<9} available"
            f" {await self.balance(who)}{note}",
            tone="ok",
        )

    @contextlib.asynccontextmanager
    async def stream(
        self, who: str, body: dict[str, Any], note: str = ""
    ) -> AsyncIterator[tuple[aiohttp.ClientResponse, str]]:
        """Open a streamed request of ``who``: the 200 response and its request id."""
        headers = {"Authorization": f"Bearer {KEYS[who]}"}
        async with self.session.post(self.url, json=body, headers=headers) as response:
            if response.status != 200:
                raise DemoFailure(f"{who} stream refused: {response.status}")
            out.event(who, "stream", note, tone="info")
            out.raw("    ")
            yield response, response.headers.get("X-Spendgate-Request-Id", "")

    # ------------------------------------------------------------------ scenes

    async def acme_served(self) -> None:
        out.section("acme: prepaid $5.00, served and charged by the token")
        for prompt, max_tokens in (
            ("Summarize the quarterly report in one line", 16),
            ("Translate 'spend cap' into French", 8),
            ("Write a haiku about GPUs", 48),
        ):
            answer = await self.post("acme", KEYS["acme"], self.chat(prompt, max_tokens))
            if answer.status != 200:
                raise DemoFailure(f"acme should be served, got {answer.status} {answer.error()}")
            await self.served_line("acme", answer, f"   (max_tokens={max_tokens})")

    async def acme_stream(self) -> None:
        out.section("acme: a streamed completion, tokens as they arrive")
        body = self.chat("Stream me a short story", max_tokens=40, stream=True)
        async with self.stream("acme", body) as (response, request_id):
            tokens, usage, column = 0, None, 4
            async for data in sse_data(response):
                event = json.loads(data)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        tokens += 1
                        if column + len(content) > 96:
                            out.raw("\n    ")
                            content, column = content.lstrip(), 4
                        out.raw(content)
                        column += len(content)
            out.raw("\n")
        if tokens == 0:
            raise DemoFailure("the acme stream delivered no tokens")
        cost = await self.charged("acme", request_id)
        out.event(
            "acme",
            "200 done",
            f"{tokens} tokens streamed, usage {usage}; charged {format_amount(cost or 0)},"
            f" available {await self.balance('acme')}",
            tone="ok",
        )

    async def burstco_rate_limited(self) -> None:
        out.section("burstco: 2 requests/second allowed, 5 sent at once")
        body = self.chat("ping", max_tokens=4)
        answers = await asyncio.gather(
            *(self.post("burstco", KEYS["burstco"], body) for _ in range(5))
        )
        retry_after = 1
        for answer in answers:
            if answer.status == 429:
                retry_after = int(answer.headers.get("Retry-After", "0") or 0)
                rate = ", ".join(
                    f"{name}={answer.headers[name]}"
                    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
                    if name in answer.headers
                )
                out.event(
                    "burstco",
                    "429 limit",
                    f"Retry-After: {answer.headers.get('Retry-After')}  {rate}",
                    tone="warn",
                )
            elif answer.status == 200:
                await self.served_line("burstco", answer)
            else:
                raise DemoFailure(f"burstco: unexpected {answer.status} {answer.error()}")
        limited = [a for a in answers if a.status == 429]
        if not limited:
            raise DemoFailure("burstco sent 5 requests at once and none was rate limited")
        if any(not a.headers.get("Retry-After") for a in limited):
            raise DemoFailure("a 429 came without a Retry-After header")
        out.event("burstco", "waits", f"{retry_after} s as Retry-After says", tone="info")
        await asyncio.sleep(retry_after)
        answer = await self.post("burstco", KEYS["burstco"], body)
        if answer.status != 200:
            raise DemoFailure(f"burstco after Retry-After: {answer.status} {answer.error()}")
        await self.served_line("burstco", answer, "   (after waiting)")

    async def tinyco_cut_off(self) -> None:
        out.section(
            "tinyco: $0.001 prepaid; a stream without max_tokens is limited to what it can pay"
        )
        out.event("tinyco", "balance", f"available {await self.balance('tinyco')}", tone="info")
        body = self.chat("Tell me everything you know", stream=True)
        tokens, final_error = 0, None
        async with self.stream("tinyco", body, "one '.' per 25 tokens") as (response, request_id):
            limit_header = response.headers.get("X-Spendgate-Output-Limit")  # "498; reason=balance"
            async for data in sse_data(response):
                event = json.loads(data)
                if "error" in event:
                    final_error = data
                    continue
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        tokens += 1
                        if tokens % 25 == 0:
                            out.raw(".")
            out.raw(f" {tokens} tokens\n")
        if limit_header is None:
            raise DemoFailure(
                "tinyco's stream was not given an output limit (X-Spendgate-Output-Limit);"
                " its balance cannot pay for the model's default"
            )
        output_limit = int(limit_header.split(";")[0])
        out.event(
            "tinyco",
            "clamped",
            f"the sidecar set max_tokens to {output_limit}: all that the balance pays for"
            f" (X-Spendgate-Output-Limit: {limit_header})",
            tone="bad",
        )
        if final_error is not None:
            out.event("tinyco", "cut off", f"final SSE event: data: {final_error}", tone="bad")
        if tokens > output_limit or tokens >= STANDIN_DEFAULT_MAX_TOKENS:
            raise DemoFailure(f"tinyco's stream sent {tokens} tokens past its limit {output_limit}")
        cost = await self.charged("tinyco", request_id)
        entry = await self.ledger_entry("tinyco", request_id)
        held = int(entry.get("estimate", 0))
        if cost is not None and cost > held:
            raise DemoFailure(f"tinyco was charged {cost} micro-units, more than its hold {held}")
        out.event(
            "tinyco",
            "charged",
            f"{format_amount(cost or 0)} for {tokens} tokens, within the {format_amount(held)}"
            f" held up front (ledger: outcome {entry.get('outcome')},"
            f" {entry.get('output_tokens')} output tokens); available"
            f" {await self.balance('tinyco')}",
            tone="info",
        )

    async def tinyco_exhausted(self, redis_url: str) -> None:
        out.section("tinyco: more requests once the money is gone")
        for _ in range(20):
            answer = await self.post("tinyco", KEYS["tinyco"], self.chat("one more?", 16))
            if answer.status == 200:
                await self.served_line("tinyco", answer)
                continue
            if answer.status != 402:
                raise DemoFailure(f"tinyco: expected 200 or 402, got {answer.status}")
            out.event("tinyco", "402 denied", answer.error(), tone="bad")
            break
        else:
            raise DemoFailure("tinyco never got 402 although its balance is a tenth of a cent")
        report = json.loads(run_cli("balance", "tinyco", "--json", redis_url=redis_url))
        out.event(
            "tinyco",
            "balance",
            f"`spendgate balance tinyco`: state {report['state']}, balance {report['balance']},"
            f" spent {report['spentThisPeriod']} {report['currency']}",
            tone="info",
        )
        funded = run_cli("fund", "tinyco", "0.01", "--id", "demo-topup-1", redis_url=redis_url)
        out.event("tinyco", "top-up", f"`spendgate fund`: {funded.strip()}", tone="info")
        answer = await self.post("tinyco", KEYS["tinyco"], self.chat("back in business?", 16))
        if answer.status != 200:
            raise DemoFailure(f"tinyco after a top-up: {answer.status} {answer.error()}")
        await self.served_line("tinyco", answer, "   (after the top-up)")

    async def postpaid_served(self) -> None:
        out.section("postpaid: capped mode, $100 per month, invoiced later")
        answer = await self.post("postpaid", KEYS["postpaid"], self.chat("Classify: 'refund'", 6))
        if answer.status != 200:
            raise DemoFailure(f"postpaid should be served, got {answer.status} {answer.error()}")
        await self.served_line("postpaid", answer, "   (of the monthly cap)")

    async def unknown_key(self) -> None:
        out.section("someone with a key spendgate does not know")
        answer = await self.post("(unknown)", UNKNOWN_KEY, self.chat("hello?", 4))
        if answer.status != 401:
            raise DemoFailure(f"an unknown key should get 401, got {answer.status}")
        out.event("(unknown)", "401 denied", answer.error(), tone="bad")

    async def summary(self, redis_url: str) -> None:
        """What the operators of the platform and the customers see, from spendgate itself."""
        out.section("what acme's application sees: GET /v1/spendgate/balance with its own key")
        url = self.url.replace("/v1/chat/completions", "/v1/spendgate/balance")
        headers = {"Authorization": f"Bearer {KEYS['acme']}"}
        async with self.session.get(url, headers=headers) as response:
            view = await response.json()
        if response.status != 200 or view.get("customerId") != "acme":
            raise DemoFailure(f"the balance endpoint answered {response.status}: {view}")
        fields = ("state", "balance", "held", "available", "spentThisPeriod")
        print("  ".join(f"{name} {view[name]}" for name in fields))
        for name in CUSTOMERS:  # settlements run after the responses: wait for them
            run_cli("balance", name, "--wait-settled", "--timeout", "10s", redis_url=redis_url)
        out.section("spendgate usage --since 1h --by customer,model")
        out.raw(run_cli("usage", "--since", "1h", "--by", "customer,model", redis_url=redis_url))
        out.section("spendgate audit")
        out.raw(run_cli("audit", redis_url=redis_url))  # exit 3 on a mismatch fails the demo


async def sse_data(response: aiohttp.ClientResponse) -> Any:
    """The ``data:`` payloads of an SSE response, without ``[DONE]``."""
    async for raw_line in response.content:
        line = raw_line.decode().strip()
        if line.startswith("data:"):
            data = line[5:].strip()
            if data != "[DONE]":
                yield data


async def drive(stack: Stack) -> None:
    client = redis.asyncio.Redis.from_url(stack.redis_url)
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            driver = Driver(stack, session, client)
            await driver.acme_served()
            await driver.acme_stream()
            await driver.burstco_rate_limited()
            await driver.tinyco_cut_off()
            await driver.tinyco_exhausted(stack.redis_url)
            await driver.postpaid_served()
            await driver.unknown_key()
            await driver.summary(stack.redis_url)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- main


def main() -> int:
    started = time.monotonic()
    procs = Processes(Path(tempfile.mkdtemp(prefix="spendgate-demo-")))
    try:
        with sigterm_as_interrupt():
            out.section("starting redis, the stand-in model and the spendgate sidecar")
            stack = start_stack(procs)
            asyncio.run(drive(stack))
            for child in procs.children:
                if not child.alive():
                    raise DemoFailure(f"{child.name} exited early ({child.proc.returncode})")
    except (DemoFailure, StartupFailure) as failure:
        print(f"\nDEMO FAILED: {failure}\n", file=sys.stderr)
        print(procs.tails(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.close()
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s; everything stopped and removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
