"""The small encoder through a real worker process on the real broker: alone (`model =
encoder:PATH`), and as one classifier of a policy beside a LoRA classifier on Gemma."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from adapters.tansu import free_port
from moderation_worker.model.encoder import build_tiny_encoder, train_encoder
from moderation_worker.model.lora import file_sha256
from moderation_worker.tools.worker_process import WorkerProcess
from tests.fixtures_broker import (
    REPO_ROOT,
    BrokerInfo,
    TopicSet,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def encoder_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    y = (rng.random(64) < 0.5).astype(int)
    texts = [f"you are {'awful' if v else 'lovely'} today" for v in y]
    clf = train_encoder(build_tiny_encoder(), texts, y, texts[:16], y[:16], epochs=2, verbose=0)
    prefix = tmp_path_factory.mktemp("encoder") / "tiny-hate"
    clf.save(prefix)
    return prefix


async def run_worker(broker, topics, tmp_path, tag: str, **settings) -> list[dict]:
    await create_topics(broker, [topics.input], partitions=2)
    env = os.environ | worker_env(broker, topics, partitions=2, **settings)
    env.pop("MODERATION_CONFIG_FILE", None)
    command = [sys.executable, "-m", "moderation_worker.cli", "worker"]
    worker = WorkerProcess(env, tmp_path / f"{tag}.log", free_port(), command=command,
                           cwd=REPO_ROOT)  # fmt: skip
    worker.start()
    try:
        worker.wait_ready(timeout=120)
        texts = ["you are awful today", "you are lovely today"]
        records = [
            (f"{tag}-{i}".encode(), orjson.dumps({"id": f"{tag}-{i}", "text": texts[i % 2]}))
            for i in range(8)
        ]
        await produce(broker, topics.input, records)
        out = await read_outputs(broker, topics, until=lambda o: len(o.verdicts) >= 8, timeout=60)
    finally:
        worker.stop()
    return out.verdicts


async def test_a_fine_tuned_encoder_is_the_worker_model(
    broker: BrokerInfo, topics: TopicSet, tmp_path: Path, encoder_prefix: Path
) -> None:
    model = f"encoder:{encoder_prefix}"
    verdicts = await run_worker(broker, topics, tmp_path, "alone", model=model, lora_weights="none")
    sha = file_sha256(f"{encoder_prefix}.encoder.weights.h5")
    assert {v["model"]["base_model"] for v in verdicts} == {"tiny-bert:0"}
    assert {v["model"]["lora_sha256"] for v in verdicts} == {sha}
    p = {v["id"]: v["p_hateful"] for v in verdicts}
    assert all(p[f"alone-{i}"] > p[f"alone-{i + 1}"] for i in range(0, 8, 2))  # awful > lovely


async def test_an_encoder_and_a_lora_classifier_in_one_policy(
    broker: BrokerInfo, topics: TopicSet, tmp_path: Path, encoder_prefix: Path
) -> None:
    classifiers = [
        {"name": "hate", "lora": "none"},
        {"name": "encoder", "lora": f"encoder:{encoder_prefix}", "mode": "shadow"},
    ]
    verdicts = await run_worker(broker, topics, tmp_path, "mixed", model="tiny",
                                classifiers=orjson.dumps(classifiers).decode())  # fmt: skip
    for v in verdicts:
        assert set(v["classifiers"]) == {"hate", "encoder"}
        assert v["classifiers"]["encoder"]["mode"] == "shadow" and v["primary"] == "hate"
        assert v["classifiers"]["hate"]["lora_sha256"] is None


def test_score_runs_the_encoder_like_the_gemma_classifier(
    tmp_path: Path, encoder_prefix: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moderation_worker.cli import main

    comments = tmp_path / "comments.jsonl"
    comments.write_text('{"id": "a", "text": "you are awful today"}\n{"id": "b", "text": ""}\n')
    assert main(["score", "--model", f"encoder:{encoder_prefix}", str(comments)]) == 0
    out = capsys.readouterr()
    (verdict,) = [orjson.loads(line) for line in out.out.splitlines() if line]
    assert verdict["id"] == "a" and verdict["model"]["base_model"] == "tiny-bert:0"
    assert "empty_text" in out.err + out.out  # the empty comment is a dead letter, not a crash
    bad = ["score", "--model", f"encoder:{encoder_prefix}", "--lora", "x.lora.h5", str(comments)]
    assert main(bad) == 2
    assert "takes no LoRA weights" in capsys.readouterr().err


def test_evaluate_runs_the_encoder(tmp_path: Path, encoder_prefix: Path) -> None:
    from moderation_worker.cli import main

    rows = [("you are awful today", 1), ("you are lovely today", 0)] * 30
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "eval"
    args = ["evaluate", "--model", f"encoder:{encoder_prefix}", "--data", str(data)]
    assert main([*args, "--out", str(out)]) == 0
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["model"]["base_model"] == "tiny-bert:0" and report["roc_auc"] > 0.9
