"""`ModelRunner`: executes one scheduled step on the model and samples the next tokens.

It owns the device, the weights and the KV cache; it knows nothing about queues or policies.
"""

from __future__ import annotations

import logging
import os

import torch

from engine.config import EngineConfig
from engine.device import available_host_memory, resolve_device, resolve_dtype, usable_cpus
from engine.host_memory import keep_freed_memory
from engine.kernels import cpu as cpu_kernels
from engine.kernels import gpu as gpu_kernels
from engine.kernels.cpu_layers import DecodeLayers
from engine.layers.attention import AttentionMetadata
from engine.loader import load_model
from engine.model_config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.parallel.distributed import TensorParallel, send_step
from engine.rules import num_kv_blocks
from engine.sampler import row_probs, sample
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import DraftProposer, verify
from engine.step_inputs import StepInputBuilder

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_positions: int,
                 tp: TensorParallel = TensorParallel()) -> None:
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.device = resolve_device(config.device)
        if tp.enabled and self.device.type == "cuda":  # a GPU per rank
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", tp.rank)))
        self.dtype = resolve_dtype(config.dtype, model_config)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or usable_cpus())
            keep_freed_memory()
        torch.manual_seed(config.seed)
        self.block_size = config.block_size
        self.model = load_model(config.model, model_config, self.dtype, self.device, max_positions,
                                config.quantization, config.quantization_group_size, tp,
                                portable=config.torch_compile)
        self.draft: LlamaForCausalLM | None = None
        self.draft_config: ModelConfig | None = None
        if config.speculative_model is not None:
            self.draft_config = _draft_config(config.speculative_model, model_config, max_positions)
            self.draft = load_model(config.speculative_model, self.draft_config, self.dtype,
                                    self.device, max_positions)
        self.num_kv_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        # Decode attention straight from the block cache where a kernel exists: the compiled C
        # one on the CPU, Triton on CUDA; otherwise gathered copies through PyTorch's attention.
        self.use_cpu_kernel = cpu_kernels.available(self.dtype, self.device) and not config.torch_compile
        self.inputs = StepInputBuilder(
            self.block_size, self.device, self.attn_dtype,
            "cpu" if self.use_cpu_kernel else "triton" if gpu_kernels.available(self.device.type) else None)
        for model in (self.model, self.draft):
            if model is not None and self.use_cpu_kernel and DecodeLayers.supported(model):
                model.decode_layers = DecodeLayers(model)
        # Decode-only steps: the batch and context lengths vary from step to step, so shapes are
        # dynamic from the start rather than recompiled for each new one.
        self.compiled = torch.compile(self.model, dynamic=True) if config.torch_compile else None
        self.proposer = (DraftProposer(self.draft, self.inputs, self.generator,
                                       config.num_speculative_tokens or 1, max_positions)
                         if self.draft is not None else None)

    @property
    def decode_backend(self) -> str | None:
        """The decode-attention kernel steps use ("cpu", "triton"), None for gathered copies;
        the draft proposer's steps follow it too (they share `inputs`)."""
        return self.inputs.decode_backend

    @decode_backend.setter
    def decode_backend(self, backend: str | None) -> None:
        self.inputs.decode_backend = backend

    # -- KV cache -----------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        """A block's keys and values in every layer (this rank's heads), the draft's too: the
        two share blocks."""
        per_token = sum(2 * len(model.layers) * _kv_features(model)
                        for model in (self.model, self.draft) if model is not None)
        return per_token * self.block_size * torch.tensor([], dtype=self.dtype).element_size()

    def _num_kv_blocks(self) -> int:
        cuda = self.device.type == "cuda"
        free, total = torch.cuda.mem_get_info(self.device) if cuda else (available_host_memory(), 0)
        return num_kv_blocks(self.config, self.kv_bytes_per_block,
                             self.config.max_model_len or self.model_config.max_position_embeddings,
                             self.device.type, free, total)

    def _allocate_kv_cache(self) -> None:
        self.kv_cache = self._bind_cache(self.model, self.model_config)
        if self.draft is not None and self.draft_config is not None:
            self.draft_kv_cache = self._bind_cache(self.draft, self.draft_config)

    def _bind_cache(self, model: LlamaForCausalLM, cfg: ModelConfig) -> torch.Tensor:
        num_slots = self.num_kv_blocks * self.block_size
        # Uninitialised on purpose (no GBs zero-filled at start-up): attention only ever gathers
        # slots that hold written tokens, padding included (see _prepare).
        cache = torch.empty(cfg.num_hidden_layers, 2, num_slots, _kv_features(model),
                            dtype=self.dtype, device=self.device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = cache[i, 0]
            layer.self_attn.v_cache = cache[i, 1]
        return cache

    # -- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[list[int] | None]:
        """Run the step. Per scheduled sequence: None mid-prefill, else its new tokens (one, or
        with speculative decoding the accepted drafts and one more)."""
        order, input_ids, positions, meta = self.inputs.build(out.scheduled)
        hidden = self._forward(input_ids, positions, meta)
        rows: list[int] = []
        spans: dict[int, slice] = {}  # scheduled index -> its rows among `rows`
        row = 0
        for idx in order:
            item = out.scheduled[idx]
            row += item.num_new_tokens
            if item.samples:
                width = 1 + len(item.spec_token_ids)
                spans[idx] = slice(len(rows), len(rows) + width)
                rows.extend(range(row - width, row))
        result: list[list[int] | None] = [None] * len(out.scheduled)
        if not spans:
            return result
        logits = self.model.compute_logits(hidden[rows])
        plain = [idx for idx in spans if not out.scheduled[idx].spec_token_ids]
        if plain:
            seqs = [out.scheduled[i].seq for i in plain]
            tokens = sample(logits[[spans[i].start for i in plain]], [s.params for s in seqs],
                            [s.generator or self.generator for s in seqs])
            for idx, token in zip(plain, tokens):
                result[idx] = [token]
        drafted = [idx for idx in spans if out.scheduled[idx].spec_token_ids]
        # The target's distributions at every sampled drafted row, in one call.
        sampled = [idx for idx in drafted if not out.scheduled[idx].seq.params.greedy]
        target_probs: dict[int, torch.Tensor] = {}
        if sampled:
            rows_of = [r for idx in sampled for r in range(spans[idx].start, spans[idx].stop)]
            params = [out.scheduled[idx].seq.params for idx in sampled
                      for _ in range(spans[idx].stop - spans[idx].start)]
            probs = row_probs(logits[rows_of], params)
            first = 0
            for idx in sampled:
                width = spans[idx].stop - spans[idx].start
                target_probs[idx] = probs[first:first + width]
                first += width
        for idx in drafted:
            item = out.scheduled[idx]
            seq = item.seq
            result[idx] = verify(logits[spans[idx]], item.spec_token_ids, seq.draft_probs,
                                 seq.params, seq.generator or self.generator, target_probs.get(idx))
        return result

    def propose(self, seqs: list[Sequence]) -> None:
        """Speculative decoding: the draft's next proposals for these decoding sequences."""
        if self.proposer is not None and seqs:
            self.proposer.propose(seqs)

    @torch.inference_mode()
    def logits_all(self, item: ScheduledSequence) -> torch.Tensor:
        """Logits at every computed position of one sequence: [num_new_tokens, vocab]."""
        _, input_ids, positions, meta = self.inputs.build([item])
        return self.model.compute_logits(self._forward(input_ids, positions, meta))

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self.tp.enabled:  # the other ranks run the same pass on their shards
            send_step(input_ids, positions, meta)
        return self.run_model(input_ids, positions, meta)

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """This rank's forward pass: compiled for decode-only steps when asked, else eager."""
        if self.compiled is not None and not meta.prefills:
            return self.compiled(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)


def _draft_config(path: str, target: ModelConfig, max_positions: int) -> ModelConfig:
    draft = ModelConfig.from_dir(path)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_model: the draft's vocab_size={draft.vocab_size} differs from "
                         f"the target's {target.vocab_size}; they must share a tokenizer")
    if draft.max_position_embeddings < max_positions:
        raise ValueError(f"speculative_model: the draft's max_position_embeddings="
                         f"{draft.max_position_embeddings} is below max_model_len={max_positions}")
    if draft.is_moe:
        raise ValueError("speculative_model: a mixture-of-experts draft is not supported")
    return draft


def _kv_features(model: LlamaForCausalLM) -> int:
    """Key (or value) features per token and layer in this rank's cache."""
    attn = model.layers[0].self_attn
    return attn.num_kv_heads * attn.head_dim
