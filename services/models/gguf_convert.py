"""Convert a llama.cpp GGUF file into a directory that ``mlx_lm.load()`` reads.

Only the ``gguf`` package (numpy) is used: every tensor is de-quantized on the CPU, so
no torch is needed and any GGUF block type the package knows (Q4_0/Q4_1/Q8_0/Q4_K/Q5_0/
Q6_K/...) works. Supported architectures: ``llama`` and ``gemma3``.

The output holds ``config.json`` (mlx-lm / Hugging Face field names), one
``model.safetensors`` and the tokenizer files written by transformers (chat template
included when the GGUF has one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.models.gguf_tokenizer import save_tokenizer

# Stored weight dtype. float16 rather than bfloat16: fp16 keeps 3 more mantissa bits of the
# de-quantized values, and the sidecar casts to float32 on Linux CPU anyway (float32 +
# OpenBLAS is ~10x faster than bf16 there). Not re-quantized: MLX 4-bit g64 re-quantization
# of SmolLM2 broke its answers (docs/../shared/reference/models.md).
DEFAULT_DTYPE = "float16"


class GGUFConversionError(RuntimeError):
    """The GGUF file cannot be converted (unknown architecture, missing tensor, ...)."""


@dataclass(frozen=True)
class GGUFInfo:
    """The metadata of a GGUF file that the converter uses."""

    architecture: str
    fields: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value ``key``; ``{arch}`` in the key is replaced by the architecture."""
        return self.fields.get(key.format(arch=self.architecture), default)

    def require(self, key: str) -> Any:
        """Like :meth:`get` but raise when the key is absent."""
        value = self.get(key)
        if value is None:
            raise GGUFConversionError(f"GGUF metadata lacks {key.format(arch=self.architecture)}")
        return value


def read_metadata(reader: Any) -> GGUFInfo:
    """Scalar and string metadata of a ``gguf.GGUFReader`` (token tables are skipped)."""
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 1:
            continue  # the vocabulary, merges, scores: large and read by transformers instead
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed here
            continue
    arch = fields.get("general.architecture")
    if not arch:
        raise GGUFConversionError("GGUF metadata has no general.architecture")
    return GGUFInfo(architecture=str(arch), fields=fields)


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of ``attn_q``/``attn_k`` (llama architecture).

    llama.cpp's converter reorders each head's rows from (2, d/2) to (d/2, 2) for its
    interleaved RoPE; mlx-lm's llama uses the Hugging Face half-split layout.
    """
    out_dim = weight.shape[0]
    if out_dim % (2 * n_head):
        raise GGUFConversionError(f"cannot un-permute {weight.shape} for {n_head} heads")
    rest = weight.shape[1:]
    w = weight.reshape(n_head, out_dim // n_head // 2, 2, *rest)
    return w.swapaxes(1, 2).reshape(weight.shape)


# --- per-architecture rules -------------------------------------------------------------

_LAYER_NAMES_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}

_LAYER_NAMES = {
    "llama": {**_LAYER_NAMES_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_LAYER_NAMES_COMMON,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face / mlx-lm name of GGUF tensor ``gguf_name``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] in ("weight", "bias"):
        mapped = _LAYER_NAMES[arch].get(parts[2])
        if mapped is not None:
            return f"model.layers.{parts[1]}.{mapped}.{parts[3]}"
    raise GGUFConversionError(f"no mapping for GGUF tensor {gguf_name!r} ({arch})")


def _f32(value: Any) -> float:
    # GGUF stores float32: 9.999999747e-06 is the float32 nearest 1e-05; write the short form.
    return float(f"{float(value):.7g}")


def _llama_config(info: GGUFInfo) -> dict[str, Any]:
    n_embd = int(info.require("{arch}.embedding_length"))
    n_head = int(info.require("{arch}.attention.head_count"))
    head_dim = int(info.get("{arch}.rope.dimension_count", n_embd // n_head))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "num_hidden_layers": int(info.require("{arch}.block_count")),
        "intermediate_size": int(info.require("{arch}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(info.get("{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(info.require("{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(info.get("{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(info.require("{arch}.context_length")),
        "attention_bias": False,
        "mlp_bias": False,
    }


def _gemma3_config(info: GGUFInfo) -> dict[str, Any]:
    n_head = int(info.require("{arch}.attention.head_count"))
    head_dim = int(info.get("{arch}.attention.key_length", 256))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": int(info.require("{arch}.embedding_length")),
        "num_hidden_layers": int(info.require("{arch}.block_count")),
        "intermediate_size": int(info.require("{arch}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(info.get("{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(info.require("{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(info.get("{arch}.rope.freq_base", 1_000_000.0)),
        # llama.cpp hard-codes the local base for gemma3 rather than storing it.
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(info.get("{arch}.attention.sliding_window", 512)),
        # Layers 5, 11, 17 are global; llama.cpp's gemma3 uses the same fixed pattern.
        "sliding_window_pattern": 6,
        "max_position_embeddings": int(info.require("{arch}.context_length")),
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _gemma3_tensor(name: str, array: np.ndarray, info: GGUFInfo) -> np.ndarray:
    # llama.cpp stores Gemma's RMSNorm weights as (1 + w); mlx-lm adds the 1 itself.
    if name.endswith("norm.weight"):
        return array - 1.0
    return array


def _llama_tensor(name: str, array: np.ndarray, info: GGUFInfo) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return unpermute_rope_rows(array, int(info.require("{arch}.attention.head_count")))
    if name.endswith("attn_k.weight"):
        n_head = int(info.require("{arch}.attention.head_count"))
        return unpermute_rope_rows(array, int(info.get("{arch}.attention.head_count_kv", n_head)))
    return array


@dataclass(frozen=True)
class _ArchRules:
    config: Callable[[GGUFInfo], dict[str, Any]]
    tensor: Callable[[str, np.ndarray, GGUFInfo], np.ndarray]


_ARCHS = {
    "llama": _ArchRules(_llama_config, _llama_tensor),
    "gemma3": _ArchRules(_gemma3_config, _gemma3_tensor),
}

SUPPORTED_ARCHITECTURES = tuple(_ARCHS)


def _token_id(info: GGUFInfo, key: str) -> int | None:
    value = info.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def build_config(info: GGUFInfo, *, vocab_size: int, tied: bool, dtype: str) -> dict[str, Any]:
    """``config.json`` contents for mlx-lm from the GGUF metadata."""
    rules = _ARCHS.get(info.architecture)
    if rules is None:
        raise GGUFConversionError(
            f"GGUF architecture {info.architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    config = rules.config(info)
    config["vocab_size"] = vocab_size
    config["tie_word_embeddings"] = tied
    config["torch_dtype"] = dtype
    bos, eos, pad = (
        _token_id(info, k) for k in ("bos_token_id", "eos_token_id", "padding_token_id")
    )
    if bos is not None:
        config["bos_token_id"] = bos
    eos_ids = [i for i in (eos,) if i is not None]
    eot = _token_id(info, "eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    if info.architecture == "gemma3":
        # Gemma's turn end <end_of_turn> (106) also ends generation; llama.cpp may not store it.
        for extra in (106,):
            if extra not in eos_ids:
                eos_ids.append(extra)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if pad is not None:
        config["pad_token_id"] = pad
    return config


def convert_weights(
    reader: Any, info: GGUFInfo, *, dtype: str = DEFAULT_DTYPE, progress: bool = False
) -> dict[str, np.ndarray]:
    """De-quantize every tensor of ``reader`` into numpy arrays under mlx-lm names."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    rules = _ARCHS[info.architecture]
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.float32
    out: dict[str, np.ndarray] = {}
    tensors = tqdm(reader.tensors, desc="de-quantizing", unit="tensor", disable=not progress)
    for t in tensors:
        array = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (columns) first
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        array = rules.tensor(t.name, array, info)
        out[hf_tensor_name(t.name, info.architecture)] = array.astype(np_dtype, copy=False)
    return out


def convert_gguf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = False,
    config_overrides: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Convert ``gguf_path`` into ``out_dir`` (created); return the written config.

    ``config_overrides`` are merged last into ``config.json``; ``chat_template`` is given
    to the tokenizer when the file has none.
    """
    import mlx.core as mx
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    info = read_metadata(reader)
    if info.architecture not in _ARCHS:
        raise GGUFConversionError(
            f"GGUF architecture {info.architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    weights = convert_weights(reader, info, dtype=dtype, progress=progress)
    embed = weights["model.embed_tokens.weight"]
    config = build_config(
        info, vocab_size=int(embed.shape[0]), tied="lm_head.weight" not in weights, dtype=dtype
    )
    config.update(config_overrides or {})
    mx_dtype = getattr(mx, dtype)
    mx.save_safetensors(
        str(out_dir / "model.safetensors"),
        {k: mx.array(v).astype(mx_dtype) for k, v in weights.items()},
        metadata={"format": "mlx"},
    )
    del weights
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(reader, out_dir, chat_template=chat_template)
    return config
