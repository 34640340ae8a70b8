"""The scoring and training paths, run on whatever Keras backend this process has.

`tests/test_jax_backend.py` calls `probe(spec)` in its own (TensorFlow) process and runs this
file as a child with `KERAS_BACKEND=jax`, so both backends do exactly the same work on the
same saved files: a tiny Gemma 3 preset, a LoRA adapter and labelled rows. Keras chooses its
backend once per process, hence the child. Usage: `python tests/jax_child.py SPEC.json OUT.json`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __name__ == "__main__":  # run as a file: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402

from moderation_worker.model.classifier import AgileClassifier  # noqa: E402
from moderation_worker.model.classifier_set import ClassifierSet  # noqa: E402
from moderation_worker.model.lora import LoraAdapter  # noqa: E402
from moderation_worker.model.sources import load_preset  # noqa: E402
from moderation_worker.model.training import TrainingConfig, train_classifier  # noqa: E402

ZERO_SHOT, TUNED = "zero_shot", "tuned"


def _devices() -> list[str]:
    """The devices of the backend this process runs (what the parent checks)."""
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    return []


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Score `spec["texts"]` zero-shot, with the adapter, as a mixed set, and after training.

    The zero-shot and LoRA classifiers share one backbone, as a worker's do: each writes its
    adapter (or none) into the backbone's LoRA variables before its calls, and the zero-shot
    one scores again after the LoRA one (`zero_shot_again`, the first two texts). The set
    and the training load the base model afresh. Returns JSON-ready lists: probabilities
    `[text][label]`, the set's p(positive) per row, the training losses, and each part's
    seconds; the trained adapter is saved to `spec["trained_out"]`. `spec["jit_compile"]` is
    the classifiers' XLA switch.
    """
    texts: list[str] = spec["texts"]
    options = {
        "batch_size": int(spec["batch_size"]),
        "length_buckets": tuple(spec["length_buckets"]),
        "jit_compile": bool(spec["jit_compile"]),
    }
    out: dict[str, Any] = {"backend": keras.backend.backend(), "devices": _devices()}
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part], clock = round(now - clock, 2), now

    base = load_preset(spec["preset"])
    adapter = LoraAdapter.load(spec["adapter"], base_model=base.name)
    zero_shot = AgileClassifier(base, **options)
    out["zero_shot"] = zero_shot.predict_proba(texts).tolist()
    lap("zero_shot")

    tuned = AgileClassifier(base, adapter=adapter, **options)
    out["lora"] = tuned.predict_proba(texts).tolist()
    out["zero_shot_again"] = zero_shot.predict_proba(texts[:2]).tolist()
    lap("lora")

    base = load_preset(spec["preset"])
    rules = ClassifierSet(base, {ZERO_SHOT: None, TUNED: adapter}, **options)
    names = [ZERO_SHOT if i % 2 == 0 else TUNED for i in range(len(texts))]
    out["set_names"] = names
    out["set"] = rules.p_positive(texts, names).tolist()
    lap("set")
    # Keras on JAX runs a model eagerly before every `predict_on_batch` while any of its
    # layers is unbuilt: the scoring models' unbuilt layers, after scoring.
    out["unbuilt_layers"] = sorted(
        {
            layer.name
            for model in (zero_shot.scorer.model, rules._model)
            for layer in model._flatten_layers()
            if not layer.built
        }
    )

    base = load_preset(spec["preset"])
    trained = train_classifier(
        base,
        spec["train_texts"],
        np.asarray(spec["train_labels"]),
        config=TrainingConfig(**spec["training"]),
        out=spec["trained_out"],
        verbose=0,
        init=adapter,  # the same start on both backends, not each backend's own RNG
    )
    out["train_loss"] = trained.training.history["loss"]
    out["train_steps"] = trained.training.steps
    lap("training")
    # every text in one batch: one more compiled shape, not one per bucket
    scored = AgileClassifier(base, adapter=trained.adapter, **{**options, "batch_size": len(texts)})
    out["trained"] = scored.predict_proba(texts).tolist()
    lap("trained")
    out["seconds"] = seconds
    return out


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = orjson.loads(Path(spec_path).read_bytes())
    Path(out_path).write_bytes(orjson.dumps(probe(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
