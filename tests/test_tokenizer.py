"""Tokenizers: Mistral v1 SentencePiece (offline, from mistral-common), bytes, streaming decode,
and which tokenizer a folder gets."""

from __future__ import annotations

import pytest

from hatlm.tokenizer import (
    BYTE_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    default_tokenizer_path,
    load_tokenizer,
)

# Multi-byte UTF-8 of every length; 🦜 and 鱻 are not in Mistral's vocabulary, so SentencePiece
# spells them with byte-fallback pieces <0xF0> <0x9F> … that split the character across tokens.
TEXT = "héllo → 世界 🙂 🦜 鱻!"


@pytest.fixture(scope="module")
def sp() -> SentencePieceTokenizer:
    return load_tokenizer()  # no folder → Mistral-7B-v0.1's model shipped in mistral-common


def test_mistral_v1_sentencepiece(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.model_file == default_tokenizer_path() and sp.model_file.name == "tokenizer.model.v1"
    assert sp.vocab_size == 32000 and sp.bos_id == 1 and sp.eos_id == 2
    ids = sp.encode("Hello world")
    assert ids == [1, 22557, 1526]  # BOS, then Mistral's pieces ▁Hello ▁world
    assert sp.encode("Hello world", bos=False, eos=True) == [22557, 1526, 2]
    for text in ("Hello world", "The quick brown fox.\nJumps over 12 lazy dogs!", TEXT):
        assert sp.decode(sp.encode(text, eos=True)) == text  # BOS/EOS never appear in the text


def test_sentencepiece_byte_fallback_is_exercised(sp):
    pieces = [sp.sp.id_to_piece(i) for i in sp.encode("🦜", bos=False)]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and len(ids) == len(TEXT.encode("utf-8")) + 2
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT


@pytest.mark.parametrize("which", ["bytes", "sentencepiece"])
def test_stream_decoder_never_emits_half_characters(which, sp):
    tok = ByteTokenizer() if which == "bytes" else sp
    ids = tok.encode(TEXT)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # It did hold text back: some tokens produced nothing because they ended mid-character.
    assert pieces.count("") > 1


def test_load_tokenizer_picks_the_folder_tokenizer(tmp_path, sp):
    # No tokenizer file in the folder → the offline default.
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)

    byte_dir = tmp_path / "bytes"
    byte_dir.mkdir()
    ByteTokenizer().save(byte_dir)
    assert (byte_dir / BYTE_TOKENIZER_FILE).exists()
    assert isinstance(load_tokenizer(byte_dir), ByteTokenizer)

    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    sp.save(sp_dir)
    got = load_tokenizer(sp_dir)
    assert isinstance(got, SentencePieceTokenizer) and got.model_file == sp_dir / "tokenizer.model"
    assert got.encode(TEXT) == sp.encode(TEXT)

    # A tokenizer.json (Hugging Face `tokenizers`) with Mistral's BOS/EOS.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    hf.save(str(json_dir / "tokenizer.json"))
    got = load_tokenizer(json_dir)
    assert isinstance(got, HFTokenizer) and (got.bos_id, got.eos_id) == (1, 2)
    assert got.encode("hello world", eos=True) == [1, 3, 4, 2]
