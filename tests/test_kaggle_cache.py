"""The Kaggle preset path, offline: a tiny Gemma saved with KerasHub's `save_to_preset` into
kagglehub's own cache layout loads through the same `kaggle://` handle a user writes, and scores
exactly like the model it was saved from. kagglehub answers from its cache (the completion
markers say the files are there), so no network and no Kaggle account are involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.sources import (
    build_tiny_model,
    load_model_source,
    tiny_tokenizer_proto,
)

HANDLE = "keras/gemma3-tiny/keras/tiny_test/1"


def test_a_kaggle_handle_loads_a_preset_from_kagglehubs_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kagglehub.cache import Cache, get_cached_path
    from kagglehub.handle import parse_model_handle

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    tiny = build_tiny_model()
    handle = parse_model_handle(HANDLE)
    preset = Path(get_cached_path(handle))
    assert preset.is_relative_to(tmp_path)  # kagglehub's layout, under the test's cache
    tiny.backbone.save_to_preset(str(preset))
    (preset / "assets/tokenizer").mkdir(parents=True)
    (preset / "assets/tokenizer/vocabulary.spm").write_bytes(tiny_tokenizer_proto(seed=0))
    cache = Cache()
    for path in preset.rglob("*"):
        if path.is_file():  # kagglehub marks each downloaded file complete
            cache.mark_as_complete(handle, str(path.relative_to(preset)))
    cache.mark_as_complete(handle)

    loaded = load_model_source(f"kaggle://{HANDLE}")

    assert loaded.name == f"kaggle://{HANDLE}"
    texts = ["you are lovely", "you people are awful"]
    want = AgileClassifier(tiny, jit_compile=False).p_positive(texts)
    got = AgileClassifier(loaded, jit_compile=False).p_positive(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
