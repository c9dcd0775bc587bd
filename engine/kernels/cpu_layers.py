"""Decode steps on the CPU through one compiled call per decoder layer (decoder_layer_cpu.c).

The C side runs the same kernels in the same order as the model's Python forward, so the two
paths agree (tested); this one only skips the Python between the kernels. It covers dense
Llama-family layers whose linears use the engine's own kernels (dense or int8/int4) and steps
made only of decodes; anything else takes the Python forward.
"""

from __future__ import annotations

import ctypes
from ctypes import c_double, c_float, c_int64, c_void_p
from typing import TYPE_CHECKING

import torch

from engine.kernels import cpu as cpu_kernels
from engine.layers.attention import AttentionMetadata
from engine.parallel import distributed

if TYPE_CHECKING:
    from engine.layers.linear import Linear
    from engine.models.llama import LlamaForCausalLM

MAX_GROUP, MAX_HEAD_DIM = 16, 256  # as paged_attention_cpu.c
_PEER_TIMEOUT = -100  # as decoder_layer_cpu.c
_KERNEL_LAYOUTS = ("panels", "int8", "int4")


class _Linear(ctypes.Structure):
    _fields_ = [("weight", c_void_p), ("scales", c_void_p), ("mins", c_void_p), ("bias", c_void_p),
                ("out_features", c_int64), ("in_features", c_int64), ("group", c_int64),
                ("bits", c_int64), ("dot", c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", c_void_p), ("post_attention_norm", c_void_p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("k_cache", c_void_p), ("v_cache", c_void_p),
                ("heads", c_int64), ("kv_heads", c_int64), ("head_dim", c_int64),
                ("hidden", c_int64), ("intermediate", c_int64), ("eps", c_float), ("scale", c_float)]


class _Step(ctypes.Structure):
    _fields_ = [("batch", c_int64), ("positions", c_void_p), ("slots", c_void_p),
                ("block_tables", c_void_p), ("context_lens", c_void_p), ("max_blocks", c_int64),
                ("block_size", c_int64), ("cos", c_void_p), ("signed_sin", c_void_p),
                ("x", c_void_p), ("residual", c_void_p), ("h", c_void_p), ("qkv", c_void_p),
                ("attn", c_void_p), ("gate_up", c_void_p), ("act", c_void_p),
                ("is_bf16", c_int64), ("num_threads", c_int64), ("attention_threads", c_int64),
                ("tp_region", c_void_p), ("tp_rank", c_int64), ("tp_size", c_int64),
                ("tp_slot_bytes", c_int64), ("tp_generation", c_int64), ("tp_timeout_s", c_double)]


def _linear(layer: Linear) -> _Linear:
    bias = None if layer.bias is None else layer.bias.data_ptr()
    if layer.layout == "panels":
        return _Linear(layer.weight.data_ptr(), None, None, bias, layer.out_features,
                       layer.in_features, 0, 0, 0)
    q = layer.quantized
    assert isinstance(q, cpu_kernels.PackedQuantized)
    return _Linear(q.qweight.data_ptr(), q.scales.data_ptr(),
                   None if q.mins is None else q.mins.data_ptr(), bias, layer.out_features,
                   layer.in_features, q.group_size, q.bits, int(q.dot))


class DecodeLayers:
    """Runs every decoder layer of a decode-only step as one C call each."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model  # keeps every tensor the structs point into alive
        self.dtype = model.embed_tokens.weight.dtype
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                _linear(attn.qkv_proj), _linear(attn.o_proj), _linear(mlp.gate_up_proj),
                _linear(mlp.down_proj), attn.k_cache.data_ptr(), attn.v_cache.data_ptr(),
                attn.num_heads, attn.num_kv_heads, attn.head_dim, model.config.hidden_size,
                mlp.intermediate_size, layer.input_layernorm.eps, attn.scale))
        self._run = cpu_kernels.load().pilot_decoder_layer  # type: ignore[union-attr]
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step), ctypes.c_int]

    @staticmethod
    def supported(model: LlamaForCausalLM) -> bool:
        cfg = model.config
        embed = model.embed_tokens.weight
        if (cfg.is_moe or cpu_kernels.load() is None or not cpu_kernels.fused_supported(embed)
                or not cpu_kernels.available(embed.dtype, embed.device)):
            return False
        if model.tp.enabled and distributed.shared_memory() is None:
            return False  # the layer's all-reduces run in C, through the shared-memory region
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        if cfg.num_attention_heads % cfg.num_key_value_heads or group > MAX_GROUP or cfg.head_dim > MAX_HEAD_DIM:
            return False
        return all(linear.layout in _KERNEL_LAYOUTS
                   for layer in model.layers
                   for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                  layer.mlp.gate_up_proj, layer.mlp.down_proj))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, hidden] embeddings of B decode tokens -> (last layer's output, residual)."""
        cfg, args = self.model.config, meta.decode_kernel
        assert args is not None
        batch = x.shape[0]
        first = self.layers[0]
        x = x.contiguous()
        residual = torch.empty_like(x)
        buffers = {name: x.new_empty(batch, width) for name, width in (
            ("h", cfg.hidden_size), ("qkv", first.qkv.out_features), ("attn", first.o.in_features),
            ("gate_up", first.gate_up.out_features), ("act", first.down.in_features))}
        threads = torch.get_num_threads()
        work = batch * first.kv_heads * args.max_context
        rotary = self.model.rotary
        step = _Step(batch, positions.data_ptr(), meta.slot_mapping.data_ptr(),
                     args.block_tables.data_ptr(), args.context_lens.data_ptr(),
                     args.block_tables.shape[1], args.block_size, rotary.cos.data_ptr(),
                     rotary.signed_sin.data_ptr(), x.data_ptr(), residual.data_ptr(),
                     *(buffers[n].data_ptr() for n in ("h", "qkv", "attn", "gate_up", "act")),
                     int(x.dtype == torch.bfloat16), threads,
                     threads if work > cpu_kernels.PARALLEL_ATTENTION_WORK else 1)
        comm = distributed.shared_memory() if self.model.tp.enabled else None
        if comm is not None:
            step.tp_region, step.tp_rank, step.tp_size = comm.region.data_ptr(), comm.rank, comm.size
            step.tp_slot_bytes, step.tp_generation = comm.SLOT_BYTES, comm.generation
            step.tp_timeout_s = distributed.PEER_TIMEOUT_S
        try:
            for i, layer in enumerate(self.layers):
                status = self._run(ctypes.byref(layer), ctypes.byref(step), i == 0)
                if status == _PEER_TIMEOUT:
                    raise RuntimeError(f"tensor-parallel all-reduce in layer {i}: a rank did not "
                                       f"arrive within {distributed.PEER_TIMEOUT_S:.0f} s")
                if status != 0:
                    raise RuntimeError(f"CPU decoder-layer kernel failed in layer {i} (status {status})")
        finally:
            if comm is not None:
                comm.generation = step.tp_generation
        return x, residual
