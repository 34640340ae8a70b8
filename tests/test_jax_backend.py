"""The JAX backend gives TensorFlow's probabilities: scoring, LoRA, a classifier set, training.

The GPU image runs Keras on JAX; everything else (development, CI) runs TensorFlow. The scoring
path is written in `keras.ops` so that both run the same code, and this test is what holds
that claim: a tiny Gemma 3 with random weights is saved once (`save_to_preset`) with a LoRA
adapter whose factors are non-zero, and `tests/jax_child.py` does the same work on those files
here under TensorFlow and in a child process under `KERAS_BACKEND=jax` (CPU): zero-shot
scores over several length buckets, scores with the adapter, a `ClassifierSet` with rows of
both classifiers mixed in each batch, one epoch of LoRA training from the same adapter, and
the zero-shot classifier again after the LoRA one wrote into their shared backbone.
Probabilities must agree within 1e-4. Keras picks its backend once per process, hence the child.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from moderation_worker.model.lora import LoraAdapter, LoraMetadata
from moderation_worker.model.lora_slot import adapter_slot
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.model.sources import build_tiny_model, load_preset, tiny_tokenizer_proto
from tests.jax_child import probe

# jax is looked up, not imported: this process runs TensorFlow
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is in the test extra: pip install -c requirements.lock -e '.[test]'",
)

ATOL = 1e-4
CHILD = Path(__file__).with_name("jax_child.py")
# Prompt lengths 45 to 128 tokens (head and tail take 42): with two rows per batch and
# buckets (48, 80), the three batches run three different shapes, the last one truncated.
TEXTS = [
    "you are lovely",
    "i hate you awful stupid people",
    "thanks friend, great video " * 3,
    "everyone here is terrible and nobody likes this thread " * 2,
    "the movie was good " * 12,
    "zebra quokka " * 40,
]
LENGTH_BUCKETS = (48, 80)
TRAIN_TEXTS = [
    "you are lovely and kind",
    "thanks friend, great video",
    "nice song today",
    "we love this city",
    "i hate you awful stupid people",
    "everyone here is terrible",
    "go away angry idiots",
    "nobody wants you stupid people",
]
TRAIN_LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
# one epoch of two steps; every training prompt padded to 64 tokens: one compiled train step
TRAINING = {
    "rank": 4,
    "epochs": 1,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "seed": 7,
    "length_bucket": 64,
}


def _save_base_and_adapter(root: Path) -> tuple[str, Path]:
    """The tiny Gemma as a preset directory (TF-drawn weights) and a LoRA adapter for it with
    random, non-zero factors; returns the preset path and the adapter's `.lora.h5`."""
    preset = root / "preset"
    build_tiny_model(seed=0).backbone.save_to_preset(str(preset))
    (preset / "assets/tokenizer").mkdir(parents=True)
    (preset / "assets/tokenizer/vocabulary.spm").write_bytes(tiny_tokenizer_proto(seed=0))

    base = load_preset(str(preset))  # its name (the path) is the adapter's base model
    slot = adapter_slot(base.backbone)
    slot.enable(TRAINING["rank"])
    rng = np.random.default_rng(11)
    factors = {
        index: (
            rng.normal(0.0, 0.3, tuple(layer.lora_kernel_a.shape)),
            rng.normal(0.0, 0.3, tuple(layer.lora_kernel_b.shape)),
        )
        for index, layer in slot.lora_layers().items()
    }
    metadata = LoraMetadata(base.name, PromptSettings(), TRAINING["rank"])
    adapter = LoraAdapter(factors, metadata).save(root / "adapter")
    return str(preset), adapter.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same probe on JAX (a child, started first) and TensorFlow (this process, while the
    child runs); both results and the adapters each trained."""
    root = tmp_path_factory.mktemp("jax_backend")
    preset, adapter = _save_base_and_adapter(root)
    spec = {
        "preset": preset,
        "adapter": str(adapter),
        "texts": TEXTS,
        "length_buckets": list(LENGTH_BUCKETS),
        "batch_size": 2,
        "train_texts": TRAIN_TEXTS,
        "train_labels": TRAIN_LABELS,
        "training": TRAINING,
    }
    # JAX always compiles with XLA (the GPU image's path). TensorFlow runs its own graph
    # executor, so the reference comes from a different compiler, and compiles 5x faster.
    jax_spec = {**spec, "jit_compile": True, "trained_out": str(root / "trained_jax")}
    spec_path, out_path = root / "spec.json", root / "jax.json"
    spec_path.write_bytes(orjson.dumps(jax_spec))
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # LLVM -O0: XLA's own (HLO) passes all run, the CPU code is just optimised less.
        # Compiling is most of the child's time (hundreds of small eager-op programs).
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
    }
    log = root / "jax_child.log"  # a file, not a pipe: nobody reads while TF runs
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, str(CHILD), str(spec_path), str(out_path)],
            env=env,
            stdout=stderr,
            stderr=stderr,
        ) as child,
    ):
        try:
            tf_run = probe({**spec, "jit_compile": False, "trained_out": str(root / "trained_tf")})
            child.wait(timeout=300)
        finally:
            child.kill()  # only if the TF side or the wait failed; a no-op once it exited
    assert child.returncode == 0, f"JAX child failed:\n{log.read_text()[-4000:]}"
    return {
        "tf": tf_run,
        "jax": orjson.loads(out_path.read_bytes()),
        "adapter": LoraAdapter.load(adapter),
        "trained_tf": LoraAdapter.load(root / "trained_tf"),
        "trained_jax": LoraAdapter.load(root / "trained_jax"),
    }


def _max_delta(runs: dict[str, Any], key: str) -> float:
    tf_p, jax_p = np.asarray(runs["tf"][key]), np.asarray(runs["jax"][key])
    assert tf_p.shape == jax_p.shape and np.isfinite(jax_p).all()
    return float(np.abs(tf_p - jax_p).max())


def test_the_child_ran_on_jax_and_the_parent_on_tensorflow(runs: dict[str, Any]) -> None:
    assert runs["tf"]["backend"] == "tensorflow"
    assert runs["jax"]["backend"] == "jax"
    assert runs["jax"]["devices"] and all("cpu" in d.lower() for d in runs["jax"]["devices"])


def test_jax_scoring_runs_no_eager_pass_per_batch(runs: dict[str, Any]) -> None:
    """An unbuilt layer (the prefix cache once was) makes Keras on JAX run the whole model
    eagerly before every `predict_on_batch`: an extra forward pass per batch on a GPU."""
    assert runs["jax"]["unbuilt_layers"] == []


def test_zero_shot_probabilities_match_across_length_buckets(runs: dict[str, Any]) -> None:
    p = np.asarray(runs["tf"]["zero_shot"])
    assert p.shape == (len(TEXTS), 2) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(p[:, 1]) > 1e-3  # the texts score differently: a real comparison
    assert _max_delta(runs, "zero_shot") <= ATOL


def test_lora_probabilities_match(runs: dict[str, Any]) -> None:
    lora, zero_shot = np.asarray(runs["tf"]["lora"]), np.asarray(runs["tf"]["zero_shot"])
    assert np.abs(lora - zero_shot).max() > 1e-2  # the adapter really changes the scores
    assert _max_delta(runs, "lora") <= ATOL


@pytest.mark.parametrize("backend", ["tf", "jax"])
def test_a_classifier_sharing_the_backbone_scores_the_same_after_another_adapter(
    runs: dict[str, Any], backend: str
) -> None:
    """Zero-shot, then LoRA, then zero-shot again on one backbone: the adapter written into
    the LoRA variables between calls is the one each call reads (no stale model state)."""
    run = runs[backend]
    np.testing.assert_allclose(run["zero_shot_again"], run["zero_shot"][:2], atol=1e-6)


def test_a_classifier_set_with_mixed_rows_matches(runs: dict[str, Any]) -> None:
    tf_run = runs["tf"]
    # each row got its own classifier's adapter: zero-shot rows score as zero-shot, LoRA rows
    # as LoRA (checked on TensorFlow; the cross-backend comparison below then covers JAX)
    want = [
        tf_run["zero_shot" if name == "zero_shot" else "lora"][i][1]
        for i, name in enumerate(tf_run["set_names"])
    ]
    np.testing.assert_allclose(tf_run["set"], want, atol=1e-5)
    assert runs["jax"]["set_names"] == tf_run["set_names"]
    assert _max_delta(runs, "set") <= ATOL


def test_a_training_epoch_ends_at_the_same_adapter_and_probabilities(
    runs: dict[str, Any],
) -> None:
    tf_run, jax_run = runs["tf"], runs["jax"]
    assert tf_run["train_steps"] == jax_run["train_steps"] == 2
    np.testing.assert_allclose(jax_run["train_loss"], tf_run["train_loss"], rtol=1e-4)
    start, tf_fit, jax_fit = runs["adapter"], runs["trained_tf"], runs["trained_jax"]
    assert set(tf_fit.factors) == set(jax_fit.factors) == set(start.factors)
    moved = max(np.abs(tf_fit.factors[i][1] - start.factors[i][1]).max() for i in start.factors)
    assert moved > 1e-3  # training changed the factors
    for index, (a, b) in tf_fit.factors.items():
        np.testing.assert_allclose(jax_fit.factors[index][0], a, atol=ATOL)
        np.testing.assert_allclose(jax_fit.factors[index][1], b, atol=ATOL)
    trained, lora = np.asarray(tf_run["trained"]), np.asarray(tf_run["lora"])
    assert np.abs(trained - lora).max() > 1e-3  # and with them the scores
    assert _max_delta(runs, "trained") <= ATOL
