"""Cold start: the flat weights file, the compile cache setting, and the cold-start tool.

Behaviour only, no timings (speed targets live in BENCHMARKS.md): the one-pass load from the
flat file gives the same probabilities as the model it was saved from; `[speed]
compile_cache_dir` is honoured (a folder fills on the first start, `off` leaves it empty);
`/health` answers only after every shape is compiled; the tool reports every phase.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras_hub
import numpy as np
import pytest

from moderation_worker.model import compile_cache, weights_cache
from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.sources import build_tiny_model
from moderation_worker.settings import Settings
from moderation_worker.speed_settings import SpeedSettings
from moderation_worker.tools.cold_start import measure_cold_start
from moderation_worker.tools.cold_start_report import CPU_ROWS, PHASES, render

TEXTS = ["you are lovely", "you people are awful", "hello " * 40, ""]


def _flat_copy(model: LoadedModel, folder: Path) -> tuple[LoadedModel, weights_cache.FlatLoad]:
    weights_cache.save_flat(model.backbone, folder, {"tokenizer.model": model.tokenizer.proto})
    backbone, load = weights_cache.load_flat(folder, keras_hub.models.Gemma3Backbone.from_config)
    return LoadedModel(backbone, model.tokenizer, model.name), load


def test_flat_weights_load_in_one_pass_with_identical_probabilities(tmp_path: Path) -> None:
    original = build_tiny_model(seed=3)
    copy, load = _flat_copy(original, tmp_path / "flat")
    assert load.one_pass and load.nbytes > 0
    assert weights_cache.is_complete(tmp_path / "flat")
    for a, b in zip(original.backbone.weights, copy.backbone.weights, strict=True):
        assert a.path == b.path and np.array_equal(a.numpy(), b.numpy())
    want = AgileClassifier(original, batch_size=4, length_buckets=(32,)).predict_proba(TEXTS)
    got = AgileClassifier(copy, batch_size=4, length_buckets=(32,)).predict_proba(TEXTS)
    assert np.array_equal(want, got)


def test_flat_weights_fall_back_to_assigning_when_keras_cannot_defer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Keras without the deferred-variable internals costs speed, never correctness."""

    def unsupported(build: object, arrays: object) -> None:
        raise weights_cache._DeferredUnsupported("simulated")

    monkeypatch.setattr(weights_cache, "_build_deferred", unsupported)
    original = build_tiny_model(seed=5)
    copy, load = _flat_copy(original, tmp_path / "flat")
    assert not load.one_pass
    for a, b in zip(original.backbone.weights, copy.backbone.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


def test_flat_weights_refuse_a_short_file_or_another_architecture(tmp_path: Path) -> None:
    folder = weights_cache.save_flat(build_tiny_model(seed=0).backbone, tmp_path / "flat")
    other = build_tiny_model(seed=0, num_layers=3).backbone
    arrays = weights_cache.read_arrays(folder)
    with pytest.raises(ValueError, match="differ"):
        weights_cache.build_with_weights(lambda: other.from_config(other.get_config()), arrays)
    data = (folder / weights_cache.WEIGHTS_FILE).read_bytes()
    (folder / weights_cache.WEIGHTS_FILE).write_bytes(data[:-64])
    with pytest.raises(ValueError, match="bytes"):
        weights_cache.read_arrays(folder)


def test_compile_cache_setting_default_off_and_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private environment: `enable` sets process-wide variables (and JAX's config).
    env = {k: v for k, v in os.environ.items() if "XLA" not in k and not k.startswith("JAX_")}
    monkeypatch.setattr(os, "environ", env | {"MODERATION_CACHE_DIR": str(tmp_path / "cache")})
    monkeypatch.setattr(compile_cache, "_update_jax_config", lambda: None)
    assert SpeedSettings().compile_cache_dir is None
    assert compile_cache.resolve(None) == tmp_path / "cache" / "compile"
    for off in ("", "off", "OFF"):
        assert SpeedSettings(compile_cache_dir=off).compile_cache_dir == "off"
    assert compile_cache.enable("off") == {}  # off: no backend is told of any folder
    assert not any("XLA" in k or k.startswith("JAX_") for k in os.environ)
    assert compile_cache.cached_files("off") == 0

    os.environ["TF_XLA_FLAGS"] = "--tf_xla_auto_jit=0"  # the user's own flags stay
    dirs = compile_cache.enable(tmp_path / "mine")
    assert dirs["tensorflow"].parent == tmp_path / "mine"
    flags = os.environ["TF_XLA_FLAGS"]
    assert flags.startswith("--tf_xla_auto_jit=0 ") and str(dirs["tensorflow"]) in flags
    assert compile_cache.enable(tmp_path / "other") and os.environ["TF_XLA_FLAGS"] == flags


@pytest.mark.broker
def test_cold_start_tool_reports_every_phase_and_fills_the_cache(broker, tmp_path: Path) -> None:
    """Two real worker starts on the tiny model (one shape, no 'before' start: < 60 s)."""
    base = Settings(model="tiny", lora_weights="none", length_buckets=(), input_partitions=1)
    report = measure_cold_start(
        base,
        broker_url=broker.url,
        embedded=broker.embedded,
        compile_dir=tmp_path / "compile",
        before=False,
        out_dir=tmp_path / "logs",
        timeout=120.0,
    )
    first, second = report.starts
    assert [s.error for s in report.starts] == [None, None]
    for start in report.starts:
        missing = [key for key, _ in PHASES if start.phases.get(key) is None]
        assert missing == [], (start.label, missing, start.phases)
        assert start.weights_format == "random" and len(start.shapes) == 1  # one shape
        # `/health` first answered after the warm-up had compiled every shape.
        p = start.phases
        warmed_up = p["imports"] + p["preflight"] + p["load"] + p["warm_up"]
        assert start.health_up_s is not None and start.health_up_s >= warmed_up
        assert start.compile_cache == str(tmp_path / "compile")
        assert all(start.cpu.get(key) is not None for key, _ in CPU_ROWS), start.cpu
        rss, peak = start.rss_mib["verdict"], start.rss_mib["peak"]
        assert rss is not None and peak is not None and 50 < rss <= peak, start.rss_mib
    assert first.cache_files_after > 0  # the setting is honoured: the folder fills
    assert second.cache_files_after >= first.cache_files_after
    text = "\n".join(render(report))
    assert all(label in text for _, label in PHASES + CPU_ROWS)
    assert "Worker resident memory after its first verdict, MiB" in text
