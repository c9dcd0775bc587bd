"""The Llama family, top to bottom: Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Mixtral (MoE).

One file, read in order: norm, attention, feed-forward (dense or mixture of experts), decoder
layer, model, and the mapping from Hugging Face checkpoint names onto these modules.
q/k/v and gate/up projections are fused into one matmul each, since decode is bound by the
number of passes over the weights and by per-op overhead. For the same reason, on the CPU the
element-wise steps (residual add + norm, rotary + cache write, SwiGLU's gate) are one compiled
call each where the kernels are built; the PyTorch lines beside them are the same computation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu as cpu_kernels
from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.linear import Linear
from engine.layers.rotary import RotaryEmbedding, RotaryStep, apply_rotary
from engine.model_config import ModelConfig
from engine.parallel.distributed import TensorParallel
from engine.quantization import QuantizedWeight, quantized_shapes
from engine.rules import check_scheme


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        if cpu_kernels.fused_supported(x):
            out = cpu_kernels.rms_norm(x, self.weight, self.eps, residual)  # updates residual
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale after casting back: the reference's order of rounding.
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True).add_(self.eps))
        return normed.to(x.dtype).mul_(self.weight)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class Attention(nn.Module):
    """This rank's heads; o_proj's output is its partial sum (the layer all-reduces it)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.num_heads = tp.local(config.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = tp.local(config.num_key_value_heads, "num_key_value_heads")
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        # Bound by the ModelRunner once it has sized the cache: [num_slots, kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, rope: RotaryStep, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size:].view(-1, kv_heads, d)
        if cpu_kernels.fused_supported(qkv):
            cpu_kernels.rope_and_cache(qkv, rope.positions, rope.rotary.cos, rope.rotary.signed_sin,
                                       heads, kv_heads, d, self.k_cache, self.v_cache, meta.slot_mapping)
            q = qkv[:, :self.q_size].view(-1, heads, d)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(-1, kv_heads, d)
            out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_written=True)
        else:
            # Queries and keys sit side by side in the fused output: rotate them in one pass.
            qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(-1, heads + kv_heads, d), *rope.rows())
            out = paged_attention(qk[:, :heads], qk[:, heads:], v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_kernels.fused_supported(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MixtureOfExperts(nn.Module):
    """Mixtral's sparse block: a router picks top-k experts per token, weights renormalised."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(config.hidden_size, config.num_local_experts)
        intermediate = tp.local(config.intermediate_size, "intermediate_size")
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, intermediate) for _ in range(config.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert_id in chosen.unique().tolist():
            token_idx, slot = torch.where(chosen == expert_id)
            expert_out = self.experts[expert_id](x[token_idx])
            out.index_add_(0, token_idx, (expert_out * weights[token_idx, slot, None]).to(x.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MixtureOfExperts(config, tp) if config.is_moe
            else MLP(config.hidden_size, tp.local(config.intermediate_size, "intermediate_size")))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RotaryStep,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns this layer's output and the residual stream before it: the next norm adds
        them, so each sum is made once, inside a fused add + norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.tp.all_reduce(self.self_attn(h, rope, meta))
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.tp.all_reduce(self.mlp(h)), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel(), portable: bool = False) -> None:
        """`portable`: linear layers keep PyTorch's layouts, for torch.compile."""
        super().__init__()
        self.config = config
        self.tp = tp
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta,
                                      config.rope_scaling, dtype)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A separate head even when tied: the head's copy is repacked for fast matmuls, the
        # embedding is read by row.
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # Set by the ModelRunner where the CPU kernels can run a decode step's layers in one
        # compiled call each (engine/kernels/cpu_layers.py): same kernels, no Python between.
        self.decode_layers: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        for module in self.modules():
            if isinstance(module, Linear):
                module.portable = portable

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        if self.decode_layers is not None and meta.decode_kernel is not None and not meta.prefills:
            x, residual = self.decode_layers(x, positions, meta)
        else:
            rope = RotaryStep(self.rotary, positions)
            for layer in self.layers:
                x, residual = layer(x, residual, rope, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- checkpoint mapping ---------------------------------------------------------------------

    def load_hf_weights(self, get: Callable[[str], torch.Tensor],
                        get_linear: Callable[[str], torch.Tensor | QuantizedWeight]) -> None:
        """Copy Hugging Face tensors into this model, keeping this rank's shard of each.
        `get(name)` returns a validated float tensor; `get_linear(prefix)` a linear layer's
        whole weight, float or quantized (a tied head's comes from the embedding). A MoE router
        is read through `get`, so it stays in float: its top-k choice is too sensitive to
        rounding (vLLM's quantized MoE keeps it in float too)."""
        cfg, tp = self.config, self.tp
        self.embed_tokens.weight.data.copy_(get("model.embed_tokens.weight"))
        self.norm.weight.data.copy_(get("model.norm.weight"))
        _set_linear(self.lm_head, [get_linear("lm_head")])
        d = cfg.head_dim
        heads = [tp.part(cfg.num_attention_heads, "num_attention_heads"),
                 tp.part(cfg.num_key_value_heads, "num_key_value_heads"),
                 tp.part(cfg.num_key_value_heads, "num_key_value_heads")]
        qkv = [slice(h.start * d, h.stop * d) for h in heads]  # rows of q, k, v
        inner = tp.part(cfg.intermediate_size, "intermediate_size")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.data.copy_(get(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.data.copy_(get(p + "post_attention_layernorm.weight"))
            attn = layer.self_attn
            _set_linear(attn.qkv_proj, [get_linear(p + f"self_attn.{n}_proj") for n in "qkv"], rows=qkv)
            if cfg.attention_bias:
                attn.qkv_proj.bias.data.copy_(torch.cat(
                    [get(p + f"self_attn.{n}_proj.bias")[rows] for n, rows in zip("qkv", qkv)]))
            _set_linear(attn.o_proj, [get_linear(p + "self_attn.o_proj")], cols=qkv[0])
            if isinstance(layer.mlp, MixtureOfExperts):
                layer.mlp.gate.weight.data.copy_(get(p + "block_sparse_moe.gate.weight"))
                for e, expert in enumerate(layer.mlp.experts):
                    q = f"{p}block_sparse_moe.experts.{e}."
                    _set_linear(expert.gate_up_proj, [get_linear(q + "w1"), get_linear(q + "w3")],
                                rows=[inner, inner])
                    _set_linear(expert.down_proj, [get_linear(q + "w2")], cols=inner)
            else:
                _set_linear(layer.mlp.gate_up_proj,
                            [get_linear(p + "mlp.gate_proj"), get_linear(p + "mlp.up_proj")],
                            rows=[inner, inner])
                _set_linear(layer.mlp.down_proj, [get_linear(p + "mlp.down_proj")], cols=inner)


Weight = torch.Tensor | QuantizedWeight


def _set_linear(linear: Linear, parts: list[Weight], rows: list[slice] | None = None,
                cols: slice | None = None) -> None:
    """Load one (possibly fused) linear layer from its checkpoint parts, stacked along outputs:
    of each part, the `rows` (outputs) or `cols` (inputs) this tensor-parallel rank holds."""
    if rows is not None:
        parts = [_narrow(part, 0, r) for part, r in zip(parts, rows)]
    if cols is not None:
        parts = [_narrow(part, 1, cols) for part in parts]
    if isinstance(parts[0], QuantizedWeight):
        linear.set_quantized(QuantizedWeight.cat(parts))  # type: ignore[arg-type]
    else:
        linear.weight.data.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])  # type: ignore[arg-type]


def _narrow(weight: Weight, dim: int, piece: slice) -> Weight:
    if piece.start == 0 and piece.stop == weight.shape[dim]:
        return weight
    return weight.narrow(dim, piece.start, piece.stop - piece.start)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Checkpoint name prefix -> [out, in] of every quantizable linear layer."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, int]] = {"lm_head": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj": (q, h), p + "self_attn.k_proj": (kv, h),
                       p + "self_attn.v_proj": (kv, h), p + "self_attn.o_proj": (h, q)})
        if cfg.is_moe:
            for e in range(cfg.num_local_experts):
                x = p + f"block_sparse_moe.experts.{e}."
                shapes.update({x + "w1": (i, h), x + "w3": (i, h), x + "w2": (h, i)})
        else:
            shapes.update({p + "mlp.gate_proj": (i, h), p + "mlp.up_proj": (i, h), p + "mlp.down_proj": (h, i)})
    return shapes


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this architecture must hold, with its shape;
    for a pre-quantized one (`cfg.quantization`), linear weights as their quantized parts."""
    h = cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, h)
    for prefix, (out_features, in_features) in linear_shapes(cfg).items():
        if cfg.quantization is not None:
            method, group = cfg.quantization
            bits, group = check_scheme(method, group, in_features)
            shapes.update(quantized_shapes(prefix, out_features, in_features, bits, group))
        elif prefix != "lm_head" or not cfg.tie_word_embeddings:
            shapes[prefix + ".weight"] = (out_features, in_features)
    return shapes
