"""Read a Gemma 3 GGUF's metadata: the `Gemma3Backbone` config and the SentencePiece model.

Both come from the GGUF's key-value metadata alone, no tensor is read. The SentencePiece model
is rebuilt from the GGUF vocabulary; llama.cpp marks `<unk>` as a control token and stores the
whitespace-run pieces with real spaces, both of which are reverted here, or the tokenization
would differ from the original Gemma tokenizer / llama.cpp. A GGUF whose layout KerasHub's
backbone cannot express (sliding-window pattern, RoPE bases or scaling) is refused.
"""

from __future__ import annotations

from typing import Any

import gguf
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = ["backbone_config", "build_sentencepiece_proto"]

# KerasHub's Gemma3Backbone hard-codes these (5 sliding layers then 1 global, RoPE bases 10k for
# sliding layers and 1M for global ones); a GGUF that disagrees cannot be represented faithfully.
_KERAS_SLIDING_PATTERN = 6
_KERAS_LOCAL_ROPE_BASE = 10_000.0
_KERAS_GLOBAL_ROPE_BASE = 1_000_000.0

_MISSING = object()


# --------------------------------------------------------------------------- metadata


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def backbone_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Gemma3Backbone kwargs from the GGUF metadata, refusing what KerasHub cannot express."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"expected a gemma3 GGUF, got architecture {arch!r}")

    def meta(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    head_dim = int(meta("attention.key_length"))
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise ValueError("Gemma3Backbone needs key_length == value_length")

    # llama.cpp defaults for gemma3 when the keys are absent (older GGUFs omit them).
    pattern = meta("attention.sliding_window_pattern", _KERAS_SLIDING_PATTERN)
    num_layers = int(meta("block_count"))
    if isinstance(pattern, list):  # newer GGUFs: one bool per layer (True = sliding)
        expected = [
            i % _KERAS_SLIDING_PATTERN < _KERAS_SLIDING_PATTERN - 1 for i in range(num_layers)
        ]
        if [bool(p) for p in pattern] != expected:
            raise ValueError(f"unsupported sliding-window layer pattern {pattern}")
    elif int(pattern) != _KERAS_SLIDING_PATTERN:
        raise ValueError(f"unsupported sliding_window_pattern {pattern}")
    local_base = float(meta("rope.freq_base_swa", _KERAS_LOCAL_ROPE_BASE))
    global_base = float(meta("rope.freq_base", _KERAS_GLOBAL_ROPE_BASE))
    if (local_base, global_base) != (_KERAS_LOCAL_ROPE_BASE, _KERAS_GLOBAL_ROPE_BASE):
        raise ValueError(f"unsupported RoPE bases local={local_base} global={global_base}")
    # Gemma 3 applies linear RoPE scaling only to the global layers (4B+ models, factor 8).
    scaling_type = meta("rope.scaling.type", "none")
    global_factor = float(meta("rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"unsupported RoPE scaling {scaling_type!r}")

    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    sliding_window = int(meta("attention.sliding_window"))
    return {
        "vocabulary_size": vocab,
        "image_size": None,
        "num_layers": num_layers,
        "num_query_heads": int(meta("attention.head_count")),
        "num_key_value_heads": int(meta("attention.head_count_kv")),
        "hidden_dim": int(meta("embedding_length")),
        "intermediate_dim": int(meta("feed_forward_length")),
        "head_dim": head_dim,
        # llama.cpp scales queries by 1/sqrt(head_dim) for every size but 27B (the same as HF's
        # query_pre_attn_scalar == head_dim); see KerasHub's converter.
        "query_head_dim_normalize": True,
        "use_query_key_norm": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": meta("attn_logit_softcapping", None),
        "final_logit_soft_cap": meta("final_logit_softcapping", None),
        "use_sliding_window_attention": sliding_window > 0,
        "sliding_window_size": sliding_window if sliding_window > 0 else 4096,
        "local_rope_scaling_factor": 1.0,
        "global_rope_scaling_factor": global_factor,
        "layer_norm_epsilon": float(meta("attention.layer_norm_rms_epsilon")),
    }


# --------------------------------------------------------------------------- tokenizer

_GGUF_TO_SP_TYPE = {
    int(gguf.TokenType.NORMAL): sp_pb2.ModelProto.SentencePiece.NORMAL,
    int(gguf.TokenType.UNKNOWN): sp_pb2.ModelProto.SentencePiece.CONTROL,  # only one may be UNK
    int(gguf.TokenType.CONTROL): sp_pb2.ModelProto.SentencePiece.CONTROL,
    int(gguf.TokenType.USER_DEFINED): sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
    int(gguf.TokenType.UNUSED): sp_pb2.ModelProto.SentencePiece.UNUSED,
    int(gguf.TokenType.BYTE): sp_pb2.ModelProto.SentencePiece.BYTE,
}


def build_sentencepiece_proto(reader: gguf.GGUFReader) -> bytes:
    """Serialized SentencePiece `ModelProto` equivalent to Gemma's original `tokenizer.model`.

    Gemma's tokenizer is BPE with byte fallback, no dummy prefix and no whitespace
    normalization; piece scores drive the merge order, so they are copied verbatim.
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') vocabulary, got {model!r}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    scores: list[float] = _field(reader, "tokenizer.ggml.scores")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    if not len(tokens) == len(scores) == len(types):
        raise ValueError("GGUF tokens, scores and token types differ in length")
    unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad_id = int(_field(reader, "tokenizer.ggml.padding_token_id", -1))

    proto = sp_pb2.ModelProto()
    for i, (token, score, token_type) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = proto.pieces.add()
        # SentencePiece pieces never hold a raw space; the GGUF un-escaped the whitespace runs.
        piece.piece = token.replace(" ", "\u2581")
        piece.score = float(score)
        piece.type = (
            sp_pb2.ModelProto.SentencePiece.UNKNOWN if i == unk_id else _GGUF_TO_SP_TYPE[token_type]
        )

    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
    # SentencePieceProcessor.bos_id()/eos_id()/pad_id() look the ids up through these pieces.
    spec.unk_piece = tokens[unk_id]
    spec.bos_piece = tokens[bos_id]
    spec.eos_piece = tokens[eos_id]
    if pad_id >= 0:
        spec.pad_piece = tokens[pad_id]

    add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    for norm in (proto.normalizer_spec, proto.denormalizer_spec):
        norm.name = "identity"
        norm.add_dummy_prefix = add_prefix
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
    return proto.SerializeToString()
