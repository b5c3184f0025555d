"""The ready-made expression rules (examples/pricebook-media.yaml) through a real sidecar, real
Redis and the stand-in model: images, audio, video, the Responses API, KServe v2."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from spendgate.models import parse_resource
from spendgate.sidecar.standin import STATE
from tests.support.sidecar_env import ACME_KEY, DataPlane, data_plane

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
MICRO = 1_000_000
HD_WIDE = 120_000  # hd_1792x1024
SMALL = 16_000  # standard_256x256


def media_pricebook(**changes: Any) -> dict[str, Any]:
    manifest = yaml.safe_load((EXAMPLES / "pricebook-media.yaml").read_text())
    manifest["metadata"] = {"name": "default", "namespace": "default"}
    for rule in manifest["spec"]["rules"]:
        rule.update(changes.get(rule["name"], {}))
    return manifest


async def use_pricebook(plane: DataPlane, manifest: dict[str, Any]) -> None:
    await plane.store.apply_pricebook(parse_resource(manifest))  # type: ignore[arg-type]
    wanted = [rule["name"] for rule in manifest["spec"]["rules"]]
    for _ in range(200):
        pricebook = plane.sidecar.config.pricebook
        if (
            pricebook is not None
            and [rule.name for rule in pricebook.rules] == wanted
            and pricebook.to_manifest() == parse_resource(manifest).spec.to_manifest()
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the sidecar did not load the PriceBook")


@asynccontextmanager
async def media_plane(
    redis_url: str, balance: str = "10.00", **changes: Any
) -> AsyncIterator[DataPlane]:
    async with data_plane(redis_url, acme_balance=balance) as plane:
        await use_pricebook(plane, media_pricebook(**changes))
        yield plane


async def spent(plane: DataPlane, start: int = 10 * MICRO) -> int:
    await plane.settled()
    account = await plane.account()
    assert account.held == 0
    return start - account.balance


def served(plane: DataPlane, route: str) -> int:
    return plane.upstream.app[STATE].requests[route]


async def usage_entries(plane: DataPlane) -> list[dict[str, str]]:
    return [e for e in await plane.ledger.ledger_entries("acme") if e["type"] == "usage"]


# --------------------------------------------------------------------------- images


async def test_ten_hd_images_cost_ten_times_one_and_the_hold_covers_them(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        small = await plane.client.post(
            "/v1/images/generations", json={"prompt": "a cat", "size": "256x256"}, headers=AUTH
        )
        assert small.status == 200
        assert len((await small.json())["data"]) == 1
        assert await spent(plane) == SMALL
        hd = {"prompt": "a cat", "n": 10, "size": "1792x1024", "quality": "hd"}
        resp = await plane.client.post("/v1/images/generations", json=hd, headers=AUTH)
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 10
        assert await spent(plane) == SMALL + 10 * HD_WIDE
        entries = await usage_entries(plane)
        assert [entry["cost"] for entry in entries] == [str(SMALL), str(10 * HD_WIDE)]


async def test_exactly_enough_is_served_and_one_micro_less_is_refused_before_the_model(
    redis_url: str,
) -> None:
    hd = {"prompt": "a cat", "n": 10, "size": "1792x1024", "quality": "hd"}
    async with media_plane(redis_url, balance="1.199999") as plane:
        resp = await plane.client.post("/v1/images/generations", json=hd, headers=AUTH)
        assert resp.status == 402
        assert (await resp.json())["error"]["code"] == "insufficient_balance"
        assert served(plane, "POST /v1/images/generations") == 0
        account = await plane.account()
        assert (account.balance, account.held) == (1_199_999, 0)
    async with media_plane(redis_url, balance="1.20") as plane:
        resp = await plane.client.post("/v1/images/generations", json=hd, headers=AUTH)
        assert resp.status == 200
        await plane.settled()
        assert (await plane.account()).balance == 0


async def test_edits_and_variations_are_priced_from_their_form_fields(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        for path in ("/v1/images/edits", "/v1/images/variations"):
            form = aiohttp.FormData()
            form.add_field("image", b"\x89PNG" * 100, filename="in.png", content_type="image/png")
            form.add_field("prompt", "a hat")
            form.add_field("n", "3")
            form.add_field("size", "256x256")
            resp = await plane.client.post(path, data=form, headers=AUTH)
            assert resp.status == 200, await resp.text()
            assert len((await resp.json())["data"]) == 3
        assert await spent(plane) == 2 * 3 * SMALL


async def test_a_size_without_a_price_is_refused_before_the_model(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        body = {"prompt": "a cat", "size": "512x512", "quality": "hd"}
        resp = await plane.client.post("/v1/images/generations", json=body, headers=AUTH)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "unpriceable_request"
        assert "rule 'images'" in error["message"] and "hd_512x512" in error["message"]
        bad = await plane.client.post(
            "/v1/images/generations",
            data=b"{not json",
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert bad.status == 400
        assert served(plane, "POST /v1/images/generations") == 0
        assert await spent(plane) == 0


async def test_a_cost_beyond_the_bound_is_absorbed_not_charged(redis_url: str) -> None:
    # A rule whose bound prices one image whatever n says: the model returns three.
    one_image = {
        "expression": {
            "prices": {"image": "0.04"},
            "bound": "prices.image",
            "cost": "size(response.data) * prices.image",
        }
    }
    async with media_plane(redis_url, images=one_image) as plane:
        resp = await plane.client.post(
            "/v1/images/generations", json={"prompt": "x", "n": 3}, headers=AUTH
        )
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 3
        assert await spent(plane) == 40_000
        metrics = plane.sidecar.metrics
        assert metrics.absorbed.labels("USD", "images")._value.get() == 80_000
        [entry] = await usage_entries(plane)
        assert (entry["cost"], entry["absorbed"]) == ("40000", "80000")
        assert (await plane.account()).absorbed == 80_000


async def test_a_failing_cost_expression_charges_the_bound(redis_url: str) -> None:
    wrong_field = {
        "expression": {
            "prices": {"image": "0.04"},
            "defaults": {"n": 1},
            "bound": "int(request.n) * prices.image",
            "cost": "size(response.images) * prices.image",
        }
    }
    async with media_plane(redis_url, images=wrong_field) as plane:
        resp = await plane.client.post(
            "/v1/images/generations", json={"prompt": "x", "n": 2}, headers=AUTH
        )
        assert resp.status == 200
        assert await spent(plane) == 80_000
        metrics = plane.sidecar.metrics
        assert metrics.cost_expression_errors.labels("images")._value.get() == 1


# --------------------------------------------------------------------------- audio


async def test_speech_is_charged_per_input_character(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        text = "Hello, world! " * 100  # 1400 characters at $15 per million
        resp = await plane.client.post(
            "/v1/audio/speech", json={"model": "tts-1", "input": text, "voice": "alloy"},
            headers=AUTH,
        )  # fmt: skip
        assert resp.status == 200
        assert len(await resp.read()) == 100 * len(text)
        assert await spent(plane) == math.ceil(len(text) * 15 / 1)  # 15 micro-units each


def audio_form(seconds: float, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(
        "file", b"\0" * int(seconds * 32_000), filename="a.wav", content_type="audio/wav"
    )
    form.add_field("model", "whisper-1")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_transcription_holds_by_upload_size_and_charges_the_reported_seconds(
    redis_url: str,
) -> None:
    async with media_plane(redis_url) as plane:
        resp = await plane.client.post(
            "/v1/audio/transcriptions", data=audio_form(2.5), headers=AUTH
        )
        assert resp.status == 200
        assert (await resp.json())["usage"] == {"type": "duration", "seconds": 3}
        assert await spent(plane) == 3 * 100
        verbose = await plane.client.post(
            "/v1/audio/translations",
            data=audio_form(1.2, response_format="verbose_json"),
            headers=AUTH,
        )
        assert verbose.status == 200
        assert await spent(plane) == 3 * 100 + 2 * 100
        # A plain-text answer says nothing of its length: the bound (size-based) is charged.
        text = await plane.client.post(
            "/v1/audio/transcriptions", data=audio_form(1, response_format="text"), headers=AUTH
        )
        assert text.status == 200
        # body_bytes is the whole form: 32000 bytes of audio plus a few hundred of fields.
        bound = await spent(plane) - 500
        assert math.ceil(32_000 / 2000) * 100 < bound <= math.ceil(33_000 / 2000) * 100


async def test_an_upload_too_large_for_the_balance_is_refused(redis_url: str) -> None:
    async with media_plane(redis_url, balance="0.0015") as plane:
        # 10 s of PCM is 320 kB: held at 2000 bytes a second that is 160 s = 0.016.
        resp = await plane.client.post(
            "/v1/audio/transcriptions", data=audio_form(10), headers=AUTH
        )
        assert resp.status == 402
        assert served(plane, "POST /v1/audio/transcriptions") == 0


# --------------------------------------------------------------------------- responses, video


async def test_responses_api_json_and_stream(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        body = {"model": "standin", "input": "one two three", "max_output_tokens": 8}
        resp = await plane.client.post("/v1/responses", json=body, headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["usage"]["output_tokens"] == 8
        expected = math.ceil((3 * 500_000 + 8 * 1_500_000) / MICRO)
        assert await spent(plane) == expected
        streamed = await plane.client.post(
            "/v1/responses", json={**body, "stream": True, "stop_after": 5}, headers=AUTH
        )
        assert streamed.status == 200
        text = await streamed.text()
        assert "response.completed" in text
        final = json.loads(text.strip().split("\n")[-1].removeprefix("data: "))
        assert final["response"]["usage"]["output_tokens"] == 5
        assert await spent(plane) == expected + math.ceil((3 * 500_000 + 5 * 1_500_000) / MICRO)


async def test_video_is_charged_per_second_and_resolution(redis_url: str) -> None:
    async with media_plane(redis_url) as plane:
        body = {"model": "sora-2", "prompt": "waves", "seconds": "8", "size": "1792x1024"}
        resp = await plane.client.post("/v1/videos", json=body, headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["status"] == "completed"
        assert await spent(plane) == 8 * 500_000
        default = await plane.client.post("/v1/videos", json={"prompt": "waves"}, headers=AUTH)
        assert default.status == 200
        assert await spent(plane) == 8 * 500_000 + 4 * 100_000


# --------------------------------------------------------------------------- KServe v2


async def test_kserve_inference_is_charged_by_gpu_time_within_the_timeout_bound(
    redis_url: str,
) -> None:
    async with media_plane(redis_url) as plane:
        body = {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            "parameters": {"compute_ms": 300},
        }
        resp = await plane.client.post("/v2/models/resnet/infer", json=body, headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["model_name"] == "resnet"
        cost = await spent(plane)
        entry = (await usage_entries(plane))[0]
        upstream_ms = int(entry["upstream_ms"])
        assert upstream_ms >= 300
        assert cost == math.ceil(upstream_ms * 1100 / 1000)
        assert cost <= 30 * 1100  # the bound: 30 s of GPU time


# --------------------------------------------------------------------------- simple-form examples


async def test_embeddings_and_legacy_completions_from_the_token_example(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        manifest = yaml.safe_load((EXAMPLES / "pricebook.yaml").read_text())
        await use_pricebook(plane, manifest)
        resp = await plane.client.post(
            "/v1/embeddings", json={"model": "standin", "input": ["a b c", "d e"]}, headers=AUTH
        )
        assert resp.status == 200
        embeddings = await spent(plane)
        assert 0 < embeddings <= 50_000
        resp = await plane.client.post(
            "/v1/completions",
            json={"model": "standin", "prompt": "one two", "max_tokens": 4},
            headers=AUTH,
        )
        assert resp.status == 200
        completion = await spent(plane) - embeddings
        assert completion == 100 + math.ceil(2 * 0.5) + math.ceil(4 * 1.5)
