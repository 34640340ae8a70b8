"""A team's own Faust app, with moderation added in a few lines (see the end of the module).

The app does its own work: its agent counts the records of a topic per key and publishes each
running count to another topic, and it serves its own `/health`. Moderation is installed beside
it under `/moderation`, so both pages answer. Started as Faust apps are, through Faust's CLI:

    python -m tests.user_app worker

Configured by the environment, as the broker tests set it: `USER_APP_ID` and
`USER_APP_OPTIONS` (JSON keyword arguments of `faust.App`) for the app, `USER_APP_CLICKS` and
`USER_APP_COUNTS` for its topics, `USER_APP_MODERATION_PREFIX` for where moderation's pages go,
`MODERATION_*` for moderation's settings (topics, batching).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import faust

from adapters.moderation import Moderation
from moderation_worker.settings import load_settings
from moderation_worker.tools.trivial_scorer import TrivialScorer

app = faust.App(os.environ["USER_APP_ID"], **json.loads(os.environ["USER_APP_OPTIONS"]))

clicks = app.topic(os.environ["USER_APP_CLICKS"], key_serializer="raw", value_serializer="raw")
click_counts = app.topic(
    os.environ["USER_APP_COUNTS"], key_serializer="raw", value_serializer="raw"
)
counted: Counter[bytes] = Counter()


@app.agent(clicks)
async def count_clicks(stream: faust.StreamT) -> None:
    async for key, _ in stream.items():
        counted[key] += 1
        await click_counts.send(key=key, value=str(counted[key]).encode())


@app.page("/health")
async def health(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
    return self.json({"app": "user-app", "clicks_counted": sum(counted.values())})


# Moderation, added to the app: comments in, verdicts and dead letters out.
settings = load_settings()
moderation = Moderation(
    settings,
    lambda: TrivialScorer(batch_size=settings.batch_size),
    web_prefix=os.environ["USER_APP_MODERATION_PREFIX"],
).install(app)


if __name__ == "__main__":
    app.main()
