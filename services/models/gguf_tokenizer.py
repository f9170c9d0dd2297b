"""Build a Hugging Face tokenizer from the vocabulary stored in a GGUF file, without torch.

transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` reads the file with a
reader that imports torch (transformers 5). We read the same fields with the ``gguf``
package and hand them to transformers' torch-free builder (the part that turns a GGUF
vocabulary into a ``tokenizers`` backend), then save it with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# GGUF key (after "tokenizer.ggml.") -> name in transformers' tokenizer dict.
_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_tokenizer_fields(reader: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, tokenizer_dict, tokenizer_config)`` from a ``gguf.GGUFReader``."""
    arch = str(_field(reader, "general.architecture"))
    tok: dict[str, Any] = {}
    for key, name in _TOKENIZER_KEYS.items():
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            tok[name] = value
    if "tokens" not in tok:
        raise ValueError("the GGUF file carries no tokenizer vocabulary")
    config: dict[str, Any] = {}
    context = _field(reader, f"{arch}.context_length")
    if context is not None:
        config["model_max_length"] = int(context)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    for gguf_key, name in (("add_bos_token", "add_bos_token"), ("add_eos_token", "add_eos_token")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[name] = bool(value)
    if tok.get("tokenizer_type") == "llama":
        # sentencepiece vocabularies that do not say otherwise get a BOS (as llama.cpp does)
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tok["tokens"][int(token_id)]
    return arch, tok, config


def build_tokenizer(reader: Any, *, chat_template: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` for the vocabulary of ``reader``.

    ``chat_template`` is used when the file has none (Gemma 3 270M is a base model).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    arch, tok_dict, config = read_tokenizer_fields(reader)
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    config.update(extra)
    if chat_template and not config.get("chat_template"):
        config["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def save_tokenizer(reader: Any, out_dir: Path, *, chat_template: str | None = None) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (and the template) into ``out_dir``."""
    build_tokenizer(reader, chat_template=chat_template).save_pretrained(str(out_dir))
