"""Stripe without the internet: localstripe in a subprocess, and a recording double.

- :class:`LocalStripe`: the ``localstripe`` package (PyPI) as a real HTTP server in its own
  process (customers, payment methods, subscriptions, invoices, payment failures and its
  signed webhooks). It never writes its pickle, and one shim route it lacks is added:
  ``GET /v1/customers/{id}/payment_methods`` (served from its own store).
- :class:`StripeDouble`: a small aiohttp app for what localstripe does not have (billing credit
  grants and balance summaries, v1 meter events, the v2 meter event session and stream, and
  subscriptions with ``billing_thresholds``). It can proxy everything else to a LocalStripe,
  so one client base address serves both. **Every** request it receives is checked against the
  typed parameter definitions that ship in the ``stripe`` package (``stripe.params``
  TypedDicts): required keys present, no unknown keys, recursively through nested TypedDicts,
  lists, literals and scalar types. A request to an endpoint with no known definition is a
  failure too. Tests (the ``stripe_double`` fixture) assert there were no violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import typing
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
import pytest_asyncio
import stripe
import stripe.params as P
import stripe.params.billing as B
import stripe.params.v2.billing as V2
import typing_extensions
from aiohttp import web
from aiohttp.test_utils import TestServer
from stripe._request_options import RequestOptions

from tests.support.redis_servers import _die_with_parent, _free_ports, _libc

API_KEY = "sk_test_spendgate_0123456789"
WEBHOOK_SECRET = "whsec_test_spendgate_current"
WEBHOOK_SECRET_NEXT = "whsec_test_spendgate_next"

# --------------------------------------------------------------------------- typed params

REQUEST_OPTION_KEYS = frozenset(RequestOptions.__annotations__)

ENDPOINTS: list[tuple[str, re.Pattern[str], type]] = [
    ("POST", re.compile(r"^/v1/billing/meter_events$"), B.MeterEventCreateParams),
    ("GET", re.compile(r"^/v1/billing/credit_grants$"), B.CreditGrantListParams),
    (
        "GET",
        re.compile(r"^/v1/billing/credit_balance_summary$"),
        B.CreditBalanceSummaryRetrieveParams,
    ),
    ("POST", re.compile(r"^/v2/billing/meter_event_session$"), V2.MeterEventSessionCreateParams),
    ("POST", re.compile(r"^/v2/billing/meter_event_stream$"), V2.MeterEventStreamCreateParams),
    ("GET", re.compile(r"^/v1/subscriptions/[^/]+$"), P.SubscriptionRetrieveParams),
    ("POST", re.compile(r"^/v1/subscriptions/[^/]+$"), P.SubscriptionUpdateParams),
    ("GET", re.compile(r"^/v1/subscriptions$"), P.SubscriptionListParams),
    ("GET", re.compile(r"^/v1/invoices/[^/]+$"), P.InvoiceRetrieveParams),
    ("GET", re.compile(r"^/v1/invoices$"), P.InvoiceListParams),
    (
        "GET",
        re.compile(r"^/v1/customers/[^/]+/payment_methods$"),
        P.CustomerPaymentMethodListParams,
    ),
    ("GET", re.compile(r"^/v1/customers/[^/]+$"), P.CustomerRetrieveParams),
    ("GET", re.compile(r"^/v1/customers$"), P.CustomerListParams),
    ("GET", re.compile(r"^/v1/events$"), P.EventListParams),
]


def params_class(method: str, path: str) -> type | None:
    for m, pattern, cls in ENDPOINTS:
        if m == method and pattern.match(path):
            return cls
    return None


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=v``) back into dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


def _resolve(cls: type, key: str) -> Any:
    """The annotation of ``key`` in a stripe params TypedDict, evaluated in its module."""
    raw = cls.__annotations__[key]
    if isinstance(raw, typing.ForwardRef):
        raw = raw.__forward_arg__
    if not isinstance(raw, str):
        return raw
    namespace = dict(vars(typing))
    namespace.update(vars(typing_extensions))
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None:
            namespace.update(vars(module))
    return eval(raw, namespace)  # the package's own annotation text


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and (typing.is_typeddict(tp) or typing_extensions.is_typeddict(tp))


def check_params(tp: Any, value: Any, path: str, *, top: bool = False) -> list[str]:
    """Problems of ``value`` against the annotation ``tp`` (empty list: conforms)."""
    origin = typing_extensions.get_origin(tp)
    args = typing_extensions.get_args(tp)
    if origin in (typing_extensions.NotRequired, typing_extensions.Required):
        return check_params(args[0], value, path)
    if tp is Any or tp is object:
        return []
    if origin in (typing.Union, types.UnionType):
        results = [check_params(a, value, path) for a in args]
        if any(not r for r in results):
            return []
        return [f"{path}: {value!r} matches none of {tp}"]
    if origin is typing.Literal or origin is typing_extensions.Literal:
        return (
            []
            if value in args or str(value) in {str(a) for a in args}
            else [f"{path}: {value!r} is not one of {args}"]
        )
    if _is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{path}: expected an object ({tp.__name__}), got {value!r}"]
        known = set(tp.__annotations__) - (REQUEST_OPTION_KEYS if top else set())
        required = set(getattr(tp, "__required_keys__", set())) - REQUEST_OPTION_KEYS
        problems = [
            f"{path}.{k}: unknown parameter for {tp.__name__}" for k in value if k not in known
        ]
        problems += [
            f"{path}.{k}: required by {tp.__name__}, missing" for k in required if k not in value
        ]
        for key in value:
            if key in known:
                problems += check_params(_resolve(tp, key), value[key], f"{path}.{key}")
        return problems
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, v in enumerate(value) for p in check_params(args[0], v, f"{path}[{i}]")]
    if origin in (dict, dict) or (isinstance(origin, type) and "StripeObject" in origin.__name__):
        return [] if isinstance(value, dict) else [f"{path}: expected a map, got {value!r}"]
    if tp is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if tp is bool:
        return (
            []
            if isinstance(value, bool) or value in ("true", "false")
            else [f"{path}: expected a boolean, got {value!r}"]
        )
    if tp is int:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"-?\d+", value)
        )
        return [] if ok else [f"{path}: expected an integer, got {value!r}"]
    if tp is float:
        ok = isinstance(value, int | float) or (
            isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value)
        )
        return [] if ok else [f"{path}: expected a number, got {value!r}"]
    return []  # an annotation we cannot check more precisely


# --------------------------------------------------------------------------- the double


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    status: int = 0


@dataclass
class StripeDouble:
    """State and knobs of the recording double (see module docstring)."""

    upstream: str | None = None  # proxy target for everything else (a LocalStripe URL)
    requests: list[Recorded] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    grants: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # cus -> grants
    remaining: dict[str, int] = field(default_factory=dict)  # grant id -> minor units
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)  # without upstream
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)  # identifier -> params
    meter_event_posts: list[str] = field(default_factory=list)  # identifiers, every accepted POST
    stream_events: list[dict[str, Any]] = field(default_factory=list)
    rejected_identifiers: set[str] = field(default_factory=set)
    failures: list[tuple[re.Pattern[str], int]] = field(default_factory=list)
    sessions: dict[str, float] = field(default_factory=dict)  # token -> expiry
    url: str = ""

    def fail(self, path_regex: str, *statuses: int) -> None:
        """The next requests matching ``path_regex`` answer these statuses, in order."""
        for status in statuses:
            self.failures.append((re.compile(path_regex), status))

    def add_grant(
        self,
        customer: str,
        value: int,
        currency: str = "usd",
        *,
        grant_id: str | None = None,
        voided_at: int | None = None,
        expires_at: int | None = None,
        remaining: int | None = None,
    ) -> dict[str, Any]:
        grant = {
            "id": grant_id or f"credgr_{uuid.uuid4().hex[:14]}",
            "object": "billing.credit_grant",
            "amount": {"type": "monetary", "monetary": {"currency": currency, "value": value}},
            "applicability_config": {"scope": {"price_type": "metered"}},
            "category": "paid",
            "created": int(time.time()),
            "customer": customer,
            "effective_at": None,
            "expires_at": expires_at,
            "livemode": False,
            "metadata": {},
            "name": "top-up",
            "updated": int(time.time()),
            "voided_at": voided_at,
        }
        self.grants.setdefault(customer, []).append(grant)
        if remaining is not None:
            self.remaining[grant["id"]] = remaining
        return grant

    @property
    def post_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]


def _stripe_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "api_error"
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def _list(url: str, items: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    limit = int(params.get("limit") or 10)
    start = 0
    after = params.get("starting_after")
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return {"object": "list", "url": url, "has_more": start + limit < len(items), "data": page}


PARAMS_KEY = web.RequestKey("params", dict)
BODY_KEY = web.RequestKey("body", bytes)


def create_double_app(double: StripeDouble) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        if request.method == "GET":
            params = decode_form(list(parse_qsl(request.query_string, keep_blank_values=True)))
        elif request.path.startswith("/v2/"):
            params = json.loads(body) if body else {}
        else:
            params = decode_form(parse_qsl(body.decode(), keep_blank_values=True))
        entry = Recorded(request.method, request.path, params, dict(request.headers))
        double.requests.append(entry)
        cls = params_class(request.method, request.path)
        if cls is None:
            double.violations.append(f"{request.method} {request.path}: no typed definition")
        else:
            double.violations += [
                f"{request.method} {request.path}: {p}"
                for p in check_params(cls, params, "params", top=True)
            ]
        request[PARAMS_KEY] = params
        request[BODY_KEY] = body
        for i, (pattern, status) in enumerate(double.failures):
            if pattern.search(request.path):
                del double.failures[i]
                entry.status = status
                return _stripe_error(status, f"injected {status}")
        response = await handler(request)
        entry.status = response.status
        return response

    async def meter_event(request: web.Request) -> web.Response:
        params = request[PARAMS_KEY]
        identifier = params.get("identifier") or uuid.uuid4().hex
        if identifier in double.rejected_identifiers:
            return _stripe_error(400, f"meter event {identifier} rejected")
        double.meter_event_posts.append(identifier)
        double.meter_events.setdefault(identifier, params)  # Stripe: unique by identifier
        return web.json_response(
            {
                "object": "billing.meter_event",
                "created": int(time.time()),
                "event_name": params["event_name"],
                "identifier": identifier,
                "livemode": False,
                "payload": params["payload"],
                "timestamp": int(params.get("timestamp") or time.time()),
            }
        )

    async def credit_grants(request: web.Request) -> web.Response:
        params = request[PARAMS_KEY]
        items = double.grants.get(params.get("customer", ""), [])
        return web.json_response(_list("/v1/billing/credit_grants", items, params))

    async def balance_summary(request: web.Request) -> web.Response:
        params = request[PARAMS_KEY]
        grant_id = (params.get("filter") or {}).get("credit_grant")
        grant = next((g for gs in double.grants.values() for g in gs if g["id"] == grant_id), None)
        balances = []
        if grant is not None and grant_id in double.remaining:
            currency = grant["amount"]["monetary"]["currency"]
            value = double.remaining[grant_id]
            money = {"type": "monetary", "monetary": {"currency": currency, "value": value}}
            balances.append({"available_balance": money, "ledger_balance": money})
        return web.json_response(
            {
                "object": "billing.credit_balance_summary",
                "customer": params.get("customer"),
                "livemode": False,
                "balances": balances,
            }
        )

    async def session(request: web.Request) -> web.Response:
        token = f"ek_test_{uuid.uuid4().hex}"
        expires = time.time() + 900
        double.sessions[token] = expires
        iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(expires))
        return web.json_response(
            {
                "id": f"mtrses_{uuid.uuid4().hex[:12]}",
                "object": "v2.billing.meter_event_session",
                "authentication_token": token,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "expires_at": iso,
                "livemode": False,
            }
        )

    async def stream(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if double.sessions.get(token, 0) < time.time():
            return web.json_response(
                {"error": {"type": "invalid_request_error", "message": "bad session"}}, status=401
            )
        for event in request[PARAMS_KEY].get("events", []):
            if event.get("identifier") in double.rejected_identifiers:
                return _stripe_error(400, f"meter event {event.get('identifier')} rejected")
        for event in request[PARAMS_KEY].get("events", []):
            double.stream_events.append(event)
            double.meter_events.setdefault(event["identifier"], event)
        return web.json_response({})

    async def subscription(request: web.Request) -> web.StreamResponse:
        sub = double.subscriptions.get(request.match_info["id"])
        if sub is None:
            return await proxy(request)
        if request.method == "POST":
            thresholds = request[PARAMS_KEY].get("billing_thresholds")
            if thresholds is not None:
                sub["billing_thresholds"] = {
                    "amount_gte": int(thresholds["amount_gte"]),
                    "reset_billing_cycle_anchor": False,
                }
        return web.json_response(sub)

    async def local(request: web.Request) -> web.StreamResponse | None:
        """Customers, subscription and invoice lists from the double's own state."""
        params = request[PARAMS_KEY]
        if request.method != "GET":
            return None
        if request.path.startswith("/v1/customers/") and request.path.count("/") == 3:
            customer = double.customers.get(request.path.rsplit("/", 1)[1])
            if customer is None:
                return _stripe_error(404, "No such customer")
            return web.json_response(customer)
        if request.path == "/v1/subscriptions":
            subs = [
                s
                for s in double.subscriptions.values()
                if s.get("customer") == params.get("customer")
            ]
            return web.json_response(_list(request.path, subs, params))
        if request.path == "/v1/invoices":
            return web.json_response(_list(request.path, [], params))
        return None

    async def proxy(request: web.Request) -> web.StreamResponse:
        if double.upstream is None:
            answer = await local(request)
            return answer or _stripe_error(404, f"no such endpoint {request.path}")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session_,
            session_.request(
                request.method,
                double.upstream + request.path_qs,
                data=request[BODY_KEY],
                headers=headers,
            ) as upstream,
        ):
            body = await upstream.read()
            return web.Response(body=body, status=upstream.status, content_type="application/json")

    app = web.Application(middlewares=[record])
    app.router.add_post("/v1/billing/meter_events", meter_event)
    app.router.add_get("/v1/billing/credit_grants", credit_grants)
    app.router.add_get("/v1/billing/credit_balance_summary", balance_summary)
    app.router.add_post("/v2/billing/meter_event_session", session)
    app.router.add_post("/v2/billing/meter_event_stream", stream)
    app.router.add_route("GET", "/v1/subscriptions/{id}", subscription)
    app.router.add_route("POST", "/v1/subscriptions/{id}", subscription)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


# --------------------------------------------------------------------------- localstripe

_LAUNCHER = textwrap.dedent(
    """
    import sys
    import localstripe.resources as resources
    resources.Store.dump_to_disk = lambda self: None  # no /tmp/localstripe.pickle
    from aiohttp import web
    from localstripe import server

    def customer_payment_methods(request):
        # Shim: GET /v1/customers/{id}/payment_methods (all types; localstripe has cards).
        data = server.unflatten_data(request.query)
        listing = resources.PaymentMethod._api_list_all(
            "/v1/customers/" + request.match_info["id"] + "/payment_methods",
            customer=request.match_info["id"], type="card", limit=data.get("limit"),
            starting_after=data.get("starting_after"))
        return server.json_response(listing._export())

    server.app.router.add_get("/v1/customers/{id}/payment_methods", customer_payment_methods)
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
                access_log=None)
    """
)


class LocalStripe:
    """``localstripe`` in a subprocess on a free loopback port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spendgate-localstripe-"))
        self.port = _free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        script = self.dir / "launch_localstripe.py"
        script.write_text(_LAUNCHER)
        log = open(self.dir / "localstripe.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.port)],
            cwd=self.dir,  # never the checkout: its operator/ must not shadow the stdlib
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if _libc is not None else None,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("localstripe exited:\n" + self.log_tail())
            with contextlib.suppress(OSError):
                req = urllib.request.Request(
                    self.url + "/v1/customers", headers={"Authorization": f"Bearer {API_KEY}"}
                )
                with urllib.request.urlopen(req, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise TimeoutError("localstripe did not start:\n" + self.log_tail())

    def log_tail(self) -> str:
        try:
            return (self.dir / "localstripe.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def flush(self) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.delete(self.url + "/_config/data") as response,
        ):
            assert response.status == 200

    async def register_webhook(
        self, url: str, secret: str, events: list[str] | None = None
    ) -> None:
        data: dict[str, Any] = {"url": url, "secret": secret}
        if events is not None:
            data["events"] = events
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.post(self.url + "/_config/webhooks/spendgate", json=data) as response,
        ):
            assert response.status == 200, await response.text()


@pytest.fixture(scope="session")
def localstripe_server() -> Iterator[LocalStripe]:
    server = LocalStripe()
    server.start()
    yield server
    server.close()


@pytest_asyncio.fixture
async def localstripe(localstripe_server: LocalStripe) -> AsyncIterator[LocalStripe]:
    if localstripe_server.proc is None or localstripe_server.proc.poll() is not None:
        localstripe_server.start()
    await localstripe_server.flush()
    yield localstripe_server


@pytest_asyncio.fixture
async def stripe_double() -> AsyncIterator[StripeDouble]:
    """A recording double; after the test, every request it saw must match the typed params."""
    double = StripeDouble()
    server = TestServer(create_double_app(double), host="127.0.0.1")
    await server.start_server()
    double.url = str(server.make_url("")).rstrip("/")
    try:
        yield double
    finally:
        await server.close()
    assert double.violations == [], "\n".join(double.violations)


def sign(payload: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header made by the stripe package itself."""
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)


def make_event(
    kind: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "pending_webhooks": 1,
        "type": kind,
        "data": data,
    }


async def wait_for(predicate: Any, limit_s: float = 5.0, interval: float = 0.02) -> Any:
    """Poll an async or sync predicate until it is truthy (bounded)."""
    deadline = time.monotonic() + limit_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit_s}s")
        await asyncio.sleep(interval)


def paid_topup_session(amount_minor: int = 1000, payment_intent: str = "pi_1") -> dict[str, Any]:
    """A completed Checkout Session that paid for a spendgate top-up."""
    return {
        "id": "cs_1",
        "object": "checkout.session",
        "customer": "cus_ACME",
        "mode": "payment",
        "payment_status": "paid",
        "payment_intent": payment_intent,
        "amount_total": amount_minor,
        "currency": "usd",
        "metadata": {"spendgate_topup": "true"},
    }


async def apply_linked_budget(client: Any, ledger: Any, balance: str) -> Any:
    """Configure customer ``acme`` (USD, ``balance``) and link it to Stripe's ``cus_ACME``."""
    from spendgate.config_store import ConfigStore
    from spendgate.models import parse_resource
    from spendgate.operator.stripe.links import link_budget

    budget = parse_resource(
        {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": "acme", "namespace": "default"},
            "spec": {
                "customerId": "acme",
                "currency": "USD",
                "balance": balance,
                "stripe": {"customerId": "cus_ACME"},
            },
        }
    )
    await ConfigStore(client, ledger).apply_budget(budget, {})  # type: ignore[arg-type]
    await link_budget(client, budget.spec)  # type: ignore[union-attr]
    return budget
