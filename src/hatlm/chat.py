"""Chat messages → prompt token ids, for `hatlm serve`'s /v1/chat/completions.

Two sources of the format, in this order:
1. the checkpoint's own template: `chat_template` in its tokenizer_config.json (a Jinja template, as
   Hugging Face ships them), rendered in a sandbox with `add_generation_prompt=True`;
2. Mistral's instruct format `<s>[INST] … [/INST] answer</s>[INST] … [/INST]`, produced by
   mistral-common (offline, its bundled v1 SentencePiece model). For a model on that very tokenizer
   its token ids are used as they are; for any other tokenizer (e.g. the byte vocabulary of tiny
   models) each BOS/EOS-delimited segment is decoded back to text and re-encoded, so that the
   special tokens stay special.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hatlm.errors import UserError

ROLES = ("system", "user", "assistant")


class ChatFormatter:
    """`encode(messages) -> token ids`; `source` names the template used (reported to clients)."""

    def __init__(self, tokenizer: Any, folder: str | Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = None
        self.bos_token, self.eos_token = "<s>", "</s>"
        cfg_file = Path(folder, "tokenizer_config.json") if folder is not None else None
        if cfg_file is not None and cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{cfg_file}: not readable JSON ({e})") from None
            template = cfg.get("chat_template")
            if isinstance(template, list):  # HF's named-template form: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            if isinstance(template, str) and template.strip():
                self.template = _compile(template, cfg_file)
                self.bos_token = _token_text(cfg.get("bos_token"), "<s>")
                self.eos_token = _token_text(cfg.get("eos_token"), "</s>")
        self.source = "checkpoint chat_template" if self.template is not None else "mistral-common [INST] (v1)"
        self._mistral = None

    # ------------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        msgs = _check_messages(messages)
        if self.template is not None:
            return self._encode_template(msgs)
        return self._encode_mistral(msgs)

    def _encode_template(self, msgs: list[dict[str, str]]) -> list[int]:
        import jinja2

        try:
            text = self.template.render(
                messages=msgs, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the checkpoint's chat template rejected these messages: {e}") from None
        return self._encode_with_specials(text)

    def _encode_with_specials(self, text: str) -> list[int]:
        """Encode rendered template text, mapping the literal BOS/EOS strings to their ids."""
        tok = self.tokenizer
        ids: list[int] = []
        bos_first = text.startswith(self.bos_token)
        if bos_first:
            text = text[len(self.bos_token) :]
        ids.append(tok.bos_id)  # a prompt always starts with BOS (as every hatlm prompt does)
        for i, part in enumerate(text.split(self.eos_token)):
            if i:
                ids.append(tok.eos_id)
            if part:
                ids.extend(tok.encode(part, bos=False))
        return ids

    def _encode_mistral(self, msgs: list[dict[str, str]]) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        mt = self._mistral_tokenizer()
        try:
            request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in msgs])
            tokens = mt.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as e:
            raise UserError(f"messages cannot be put in Mistral's [INST] format: {e}") from None
        if self._same_vocab():
            return list(tokens)
        # Another tokenizer: carry the text of each segment between BOS/EOS over, keep the specials.
        inner = mt.instruct_tokenizer.tokenizer
        bos, eos = inner.bos_id, inner.eos_id
        out: list[int] = []
        seg: list[int] = []

        def flush() -> None:
            if seg:
                text = inner.decode(seg)
                # SentencePiece drops a segment's leading space on decode; "</s>▁[INST]" keeps it.
                after_eos = bool(out) and out[-1] == self.tokenizer.eos_id
                if after_eos and inner._model.id_to_piece(seg[0]).startswith("\u2581"):
                    text = " " + text
                out.extend(self.tokenizer.encode(text, bos=False))
                seg.clear()

        for t in tokens:
            if t in (bos, eos):
                flush()
                out.append(self.tokenizer.bos_id if t == bos else self.tokenizer.eos_id)
            else:
                seg.append(t)
        flush()
        return out

    def _same_vocab(self) -> bool:
        from hatlm.tokenizer import SentencePieceTokenizer, default_tokenizer_path

        tok = self.tokenizer
        if not isinstance(tok, SentencePieceTokenizer):
            return False
        try:
            return tok.model_file.resolve() == default_tokenizer_path().resolve() or (
                tok.model_file.read_bytes() == default_tokenizer_path().read_bytes()
            )
        except OSError:
            return False

    def _mistral_tokenizer(self):
        if self._mistral is None:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            self._mistral = MistralTokenizer.v1()  # bundled with the package: no download
        return self._mistral


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialisation)
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _compile(template: str, source: Path):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: chat_template is not a valid Jinja template: {e}") from None


def _check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content):
                raise UserError(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out
