"""Tokenizers: Mistral's SentencePiece model (offline, from `mistral-common`), a checkpoint's own
`tokenizer.model` / `tokenizer.json`, and a byte-level vocabulary for tiny from-scratch models.

All share one small interface: `encode(text, bos=True, eos=False)`, `decode(ids)`, `bos_id`,
`eos_id`, `pad_id`, `vocab_size`, `save(folder)`. BOS/EOS follow Mistral: a BOS starts every
prompt; EOS ends a training answer; neither is ever produced by `decode`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

BYTE_TOKENIZER_FILE = "hatlm_tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259)."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        Path(folder, BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab_size": 259}) + "\n")


class SentencePieceTokenizer:
    """A SentencePiece `tokenizer.model` (Mistral-7B-v0.1's by default: 32000 pieces)."""

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # Mistral has no pad piece; padding positions are masked anyway, so EOS stands in.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        special = {self.bos_id, self.eos_id}
        return self.sp.decode([i for i in ids if i not in special])

    def save(self, folder: str | Path) -> None:
        dst = Path(folder, "tokenizer.model")
        if dst.resolve() != self.model_file.resolve():
            shutil.copyfile(self.model_file, dst)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` read with the `tokenizers` library."""

    def __init__(self, file: str | Path, bos_token: str = "<s>", eos_token: str = "</s>") -> None:
        from tokenizers import Tokenizer as _Tok

        self.file = Path(file)
        try:
            self.tok = _Tok.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        bos, eos = self.tok.token_to_id(bos_token), self.tok.token_to_id(eos_token)
        if bos is None or eos is None:
            raise ValueError(f"{file}: no {bos_token!r}/{eos_token!r} tokens; hatlm needs Mistral's BOS/EOS")
        self.bos_id, self.eos_id, self.pad_id = bos, eos, eos

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def save(self, folder: str | Path) -> None:
        dst = Path(folder, "tokenizer.json")
        if dst.resolve() != self.file.resolve():
            shutil.copyfile(self.file, dst)


def default_tokenizer_path() -> Path:
    """Mistral-7B-v0.1's SentencePiece model as shipped inside the `mistral-common` package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the installed mistral-common does not ship tokenizer.model.v1; "
            "reinstall it (pip install 'mistral-common>=1.5')"
        )
    return path


def load_tokenizer(folder: str | Path | None = None) -> Tokenizer:
    """The folder's own tokenizer if it has one, else Mistral-7B-v0.1's (offline)."""
    if folder is not None:
        folder = Path(folder)
        if (folder / BYTE_TOKENIZER_FILE).exists():
            return ByteTokenizer()
        if (folder / "tokenizer.model").exists():
            return SentencePieceTokenizer(folder / "tokenizer.model")
        if (folder / "tokenizer.json").exists():
            return HFTokenizer(folder / "tokenizer.json")
    return SentencePieceTokenizer(default_tokenizer_path())


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8.

    SentencePiece byte-fallback pieces (and single bytes) can split a character across tokens;
    decoding each token alone would print U+FFFD. We decode the whole sequence so far (so
    SentencePiece's leading-space rule is applied as in a full decode) and only release text once
    it no longer ends in a replacement character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
