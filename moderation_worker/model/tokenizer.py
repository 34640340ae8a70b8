"""SentencePiece tokenization for the scoring path, with the `sentencepiece` package itself.

KerasHub's Gemma tokenizers need tensorflow-text, which does not exist next to JAX on a GPU
image. The scoring path only needs `text -> ids`, which `sentencepiece` does on any backend, from
the very same model proto KerasHub would use, so ids are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import sentencepiece as spm


class SentencePieceTokenizer:
    """A thin, picklable wrapper around `SentencePieceProcessor` built from a serialized proto.

    Args:
        proto: the serialized `ModelProto` bytes (a `.model` file's content).
    """

    def __init__(self, proto: bytes) -> None:
        self.proto = bytes(proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.proto)
        self.special_ids = _special_ids(self.proto)

    def __getstate__(self) -> dict[str, bytes]:
        return {"proto": self.proto}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.__init__(state["proto"])

    @property
    def vocabulary_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else 0

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """A control, unknown or user-defined token (other than whitespace runs)."""
        return int(token_id) in self.special_ids

    def single_token_id(self, word: str) -> int:
        """The id of `word` when the tokenizer encodes it as exactly one known token.

        Raises ValueError otherwise: a label that spans two tokens cannot be scored by the
        probability of one next token, and that must fail when a classifier is built.
        """
        ids = self.encode(word)
        piece_id = self.piece_to_id(word)
        if len(ids) == 1 and ids[0] != self.unk_id:
            return ids[0]
        if piece_id != self.unk_id and piece_id >= 0 and self.id_to_piece(piece_id) == word:
            return piece_id
        pieces = [self.id_to_piece(i) for i in ids]
        raise ValueError(
            f"label {word!r} is not a single token of this vocabulary "
            f"(it encodes as {len(ids)} tokens: {pieces}); choose labels that are single tokens"
        )


def _special_ids(proto: bytes) -> frozenset[int]:
    """Ids of the pieces no comment should produce: control tokens (`<bos>`, `<start_of_turn>`,
    `<start_of_image>`, `<unusedN>`), the unknown token, and user-defined pieces such as
    `[multimodal]`. Whitespace runs are user-defined in Gemma's vocabulary but are ordinary
    text, so they stay."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(proto)
    kinds = pb.ModelProto.SentencePiece
    special = (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)
    return frozenset(
        i
        for i, piece in enumerate(model.pieces)
        if piece.type in special and piece.piece.replace("\u2581", " ").strip()
    )
