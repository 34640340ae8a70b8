"""The moderator console in a real headless Chromium (the system's, driven by Playwright),
against the real broker and a real worker process (keyword classifiers for speed).

The page loads behind its token, shows the verdicts produced during the test, renders a hostile
comment as text, publishes a threshold that the worker then applies (and the page says so),
and sends a moderator's label to the labels topic. A wrong token gets nothing.

`MODERATION_SCREENSHOTS=docs/console pytest tests/test_console_browser.py` also writes the
README's screenshots (`make screenshots`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.control_topic import read_control
from adapters.tansu import free_port
from moderation_worker.console_settings import ConsoleSettings
from moderation_worker.loop_settings import LoopSettings
from moderation_worker.settings import ClassifierConfig, Settings
from tests.fixtures_broker import (
    BrokerInfo,
    TopicSet,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium)"
    ),
]
TOKEN = "ana-token-0123456789abcdef"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2"><b>scum</b>'
TEXTS = ["you are scum", "lovely match today", "vermin, all of them", "see you at the game",
         HOSTILE, "what a save", "get lost you vermin", "thanks for the ride"]  # fmt: skip
SCORER = {"classifiers": {"hate": ["scum", "vermin"]}}


def events(tag: str, n: int = 16) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        body = {"id": f"{tag}-{i}", "text": TEXTS[i % len(TEXTS)]}
        if i % 2:
            body["community"] = "gaming"
        out.append((f"{tag}-{i}".encode(), orjson.dumps(body)))
    return out


async def verdicts_of(broker: BrokerInfo, topics: TopicSet, tag: str, n: int) -> list[dict]:
    def mine(out: Any) -> list[dict]:
        return [v for v in out.verdicts if v["id"].startswith(f"{tag}-")]

    out = await read_outputs(broker, topics, until=lambda o: len(mine(o)) >= n, timeout=60)
    return mine(out)


async def test_the_console_in_a_real_browser(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    from aiohttp import web
    from playwright.async_api import async_playwright

    from moderation_worker.tools.console.app import make_console

    shots = os.environ.get("MODERATION_SCREENSHOTS")
    await create_topics(broker, [topics.input], partitions=2)
    env = worker_env(broker, topics, partitions=2, classifiers='[{"name": "hate"}]')
    worker = spawn_worker(env, scorer=SCORER)
    worker.wait_ready(timeout=120)  # a busy CI machine starts slowly
    settings = Settings(
        broker_url=broker.url,
        topic_replication_factor=1,
        input_topic=topics.input,
        verdict_topic=topics.verdicts,
        dlq_topic=topics.dlq,
        control_topic=topics.control,
        classifiers=[ClassifierConfig(name="hate")],
        loop=LoopSettings(labels_topic=f"{topics.input}.labels"),
        console=ConsoleSettings(users={"ana": TOKEN}, group_id=f"{topics.app_id}-console"),
    )
    app, _ = make_console(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        await produce(broker, topics.input, events("a"))
        await produce(broker, topics.input, [(b"bad", b"{not json")])
        await verdicts_of(broker, topics, "a", 16)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # No token, a wrong token: the login page with 401, and the API refuses.
            assert (await page.goto(base + "/")).status == 401
            assert (await page.goto(base + "/login?token=wrong-token-0000000000")).status == 401
            api = await page.request.get(base + "/api/overview")
            assert api.status == 401
            bearer = {"Authorization": "Bearer nope-nope-nope-nope"}
            assert (await page.request.get(base + "/api/recent", headers=bearer)).status == 401

            # The right token: the page, with this test's verdicts.
            response = await page.goto(base + f"/login?token={TOKEN}")
            assert response.status == 200 and page.url == base + "/"
            await page.wait_for_selector('tr.verdict-row[data-id="a-4"]', timeout=20_000)
            assert await page.text_content("#user") == "ana"
            hostile = page.locator('tr.verdict-row[data-id="a-4"] td.text')
            assert await hostile.text_content() == HOSTILE  # shown as text, not markup
            assert await hostile.locator("b, script, img").count() == 0
            assert await page.evaluate("window.__pwned") is None
            await page.wait_for_selector("#dead-letters li")
            assert "invalid_json" in await page.text_content("#dead-letters")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=f"{shots}/console.png", full_page=True)

            # A threshold set on the page reaches the worker; the page says when it has.
            await page.fill("#threshold-value", "0.93")
            await page.dispatch_event("#threshold-value", "change")
            await page.fill("#reason", "browser test")
            await page.click("#publish")
            await page.wait_for_function(
                "() => document.querySelector('#publish-status').textContent.includes('offset')"
            )
            await produce(broker, topics.input, events("b"))
            after = await verdicts_of(broker, topics, "b", 16)
            assert all(v["classifiers"]["hate"]["threshold"] == 0.93 for v in after)
            assert {v["classifiers"]["hate"]["threshold_source"] for v in after} == {"control"}
            await page.wait_for_function(
                "() => document.querySelector('#publish-status').textContent.includes('applied')",
                timeout=20_000,
            )
            records = await read_control(settings, topics.control)
            value = orjson.loads(records[-1][2])
            assert records[-1][1] == b"threshold/hate" and value["by"] == "ana"

            # A label given on the page (keyboard) arrives on the labels topic, with who.
            await page.wait_for_selector("#queue li.queue-item", timeout=20_000)
            first = await page.get_attribute("#queue li.queue-item.selected", "data-id")
            await page.keyboard.press("h")
            await page.wait_for_function(
                "() => document.querySelector('#label-status').textContent.includes('labelled')"
            )
            labels = await read_control(settings, settings.loop.labels_topic)
            sent = [orjson.loads(v) for _, _, v in labels]
            assert [(s["id"], s["label"], s["moderator"], s["classifier"]) for s in sent] == [
                (first, 1, "ana", "hate")
            ]
            if shots:  # a few more labels, so the curves have points to draw
                for _ in range(10):  # as a moderator would: the insults are hateful
                    text = await page.text_content("#queue li.queue-item.selected .text") or ""
                    await page.keyboard.press("h" if "scum" in text or "vermin" in text else "n")
                    await page.wait_for_timeout(300)
                await page.wait_for_timeout(2500)
                await page.screenshot(path=f"{shots}/console-after.png", full_page=True)
            assert errors == []
            await browser.close()
    finally:
        await runner.cleanup()
        await asyncio.sleep(0)
