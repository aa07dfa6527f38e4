"""A GGUF file's model config from its header alone: what the planner and the checks read, without torch or
transformers (which parse the whole file: 8 s for SmolLM2-135M) and without gguf's reader (2.4 s: it decodes
every tokenizer string). Only the key-value section and the tensor names are read.

GGUF layout (v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 key-value count, the key-values (u64-length
string key, u32 type, value), then per tensor a name, u32 n_dims, u64 dims, u32 type, u64 offset.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

# value types: uint8 int8 uint16 int16 uint32 int32 float32 bool string array uint64 int64 float64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# general.architecture -> transformers model_type, for the families longtune trains
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    """A scalar or a string; an array is skipped and stands for its length (the tokenizer's are all we meet)."""
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:  # a numeric array in one seek
            f.seek(count * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return count
    raise ValueError(f"unknown value type {kind}")


def read_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(key-values, tensor names); arrays come back as their length."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        fields = {}
        for _ in range(n_kv):
            key = _string(f)
            fields[key] = _value(f, _read(f, "<I"))
        names = []
        for _ in range(n_tensors):
            names.append(_string(f))
            f.seek(_read(f, "<I") * 8 + 4 + 8, 1)  # dims, type, offset
    return fields, names


def gguf_model_config(path: Path) -> Optional[dict[str, Any]]:
    """The transformers-style config of a GGUF model of a supported family, or None (then transformers reads it)."""
    try:
        fields, names = read_header(path)
    except (OSError, ValueError, struct.error):
        return None
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        return None

    def get(key):
        return fields.get(f"{arch}.{key}")

    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size") or fields.get("tokenizer.ggml.tokens"),
        "tie_word_embeddings": "output.weight" not in names,  # no separate LM head: it is the embedding
    }
    if get("attention.key_length"):  # Qwen3 and others whose head size is not hidden / heads
        config["head_dim"] = get("attention.key_length")
    return config
