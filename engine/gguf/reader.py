"""A GGUF file (llama.cpp's format) read through the `gguf` package: its metadata as a Hugging
Face `config.json`, its tensors under Hugging Face names, dequantized to float32.

llama.cpp's converter reorders the rows of Llama's q and k projections, per head, from the
halves that Hugging Face's rotary embedding rotates into interleaved pairs; reading a `llama`
file undoes that, so the weights match the original checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.model_config import CheckpointError

# Architectures whose tensors map onto the engine's Llama-family model, and the
# model_type each becomes.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Quantization types read (dequantized by the gguf package's reference code): the float types,
# the legacy 32-wide blocks and the K-quants.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be imported; the message names the file and what is wrong."""


@dataclass
class GGUFFile:
    path: Path
    architecture: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # GGUF name -> gguf.ReaderTensor

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        from gguf import GGUFReader

        path = Path(path)
        if not path.is_file():
            raise GGUFError(f"{path}: no such file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
        try:
            reader = GGUFReader(path)
        except (ValueError, KeyError, IndexError, OSError) as err:
            raise GGUFError(f"{path}: unreadable GGUF ({err}); truncated or corrupt?") from None
        size = path.stat().st_size
        tensors = {}
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                f"the file has {size}")
            tensors[t.name] = t
        metadata = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                metadata[key] = field.contents()
            except (ValueError, IndexError) as err:
                raise GGUFError(f"{path}: metadata {key} is unreadable ({err})") from None
        architecture = metadata.get("general.architecture")
        if architecture not in ARCHITECTURES:
            raise GGUFError(f"{path}: general.architecture={architecture!r} is not supported; "
                            f"supported: {', '.join(ARCHITECTURES)}")
        if "rope_freqs.weight" in tensors:
            raise GGUFError(f"{path}: rope_freqs.weight (Llama 3.1-style rope scaling) is not supported")
        for t in tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise GGUFError(f"{path}: tensor {t.name} is {t.tensor_type.name}, not supported; "
                                f"supported: {', '.join(SUPPORTED_TYPES)}")
        return cls(path, architecture, metadata, tensors)

    def field(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>` from the metadata; an error naming it where it is required."""
        name = f"{self.architecture}.{key}"
        if name in self.metadata:
            return self.metadata[name]
        if default is None:
            raise GGUFError(f"{self.path}: metadata {name} is missing")
        return default

    def config(self) -> dict[str, Any]:
        """The Hugging Face config.json of the model in this file."""
        heads = int(self.field("attention.head_count"))
        hidden = int(self.field("embedding_length"))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = int(self.field("vocab_size", len(tokens) if tokens else 0)) or None
        if vocab is None:
            raise GGUFError(f"{self.path}: neither {self.architecture}.vocab_size nor tokenizer.ggml.tokens")
        head_dim = int(self.field("attention.key_length", hidden // heads))
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if self.architecture == "llama" else "Qwen2ForCausalLM"],
            "model_type": ARCHITECTURES[self.architecture],
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": int(self.field("feed_forward_length")),
            "num_hidden_layers": int(self.field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self.field("context_length")),
            "rms_norm_eps": float(self.field("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.field("rope.freq_base", 10000.0)),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "torch_dtype": "bfloat16",
        }
        for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
            if name in self.metadata:
                cfg[key] = int(self.metadata[name])
        scaling = self.metadata.get(f"{self.architecture}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise GGUFError(f"{self.path}: {self.architecture}.rope.scaling.type={scaling!r} is not supported")
        return cfg

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGUF type the file holds."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def hf_name(self, name: str) -> str:
        if name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
        raise GGUFError(f"{self.path}: tensor {name} has no counterpart in a {self.architecture} model")

    def dequantize(self, name: str, tensor: Any) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        kind = tensor.tensor_type
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.asarray(tensor.data, dtype=np.float32)
        else:
            values = quants.dequantize(np.asarray(tensor.data), kind).astype(np.float32, copy=False)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions fastest first
        values = values.reshape(shape)
        if self.architecture == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = int(self.field("attention.head_count" if name.split(".")[-2] == "attn_q"
                                   else "attention.head_count_kv"))
            values = values[unpermute_rows(values.shape[0], heads)]
        return values


    def q4_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A Q4_0 or Q4_1 matrix as it is stored, without rounding anything: 4-bit values 0..15
        [rows, cols] and a float32 scale and min per row and block of 32, w = q * scale + min
        (Q4_0 has no min of its own: its values are q - 8, so min = -8 * scale)."""
        from gguf import GGMLQuantizationType

        tensor = self.tensors[name]
        kind = tensor.tensor_type
        if kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            raise GGUFError(f"{self.path}: tensor {name} is {kind.name}, not Q4_0 or Q4_1")
        rows, cols = (int(n) for n in reversed(tensor.shape.tolist()))
        size = 18 if kind == GGMLQuantizationType.Q4_0 else 20  # bytes a block of 32
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // 32, size)
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == GGMLQuantizationType.Q4_1:
            low_bound, packed = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:]
        else:
            low_bound, packed = -8 * scale, blocks[..., 2:]
        # Byte j of a block holds value j in its low nibble and value j + 16 in its high one.
        q = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(rows, cols)
        if self.architecture == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = int(self.field("attention.head_count" if name.split(".")[-2] == "attn_q"
                                   else "attention.head_count_kv"))
            order = unpermute_rows(rows, heads)
            q, scale, low_bound = q[order], scale[order], low_bound[order]
        return q, scale, low_bound


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved rotary pairs back into Hugging Face's halves:
    GGUF row i holds Hugging Face row `forward[i]`."""
    forward = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(forward)


def permute_rows(rows: int, heads: int) -> np.ndarray:
    """The converter's own order (Hugging Face to GGUF), for writing test files."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
