"""`ModelRunner`: executes one scheduled step on the model and samples the next tokens.

It owns the device, the weights and the KV cache; it knows nothing about queues or policies.
"""

from __future__ import annotations

import logging
import os

import torch

from engine import tensor_parallel
from engine.config import EngineConfig
from engine.distributed import TensorParallel
from engine.host_memory import keep_freed_memory
from engine.kernels import cpu as cpu_kernels
from engine.kernels import gpu as gpu_kernels
from engine.kernels.cpu_layers import DecodeLayers
from engine.layers.attention import AttentionMetadata, DecodeGroup, DecodeKernelArgs, PrefillSpan
from engine.loader import load_model
from engine.model_config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampler import row_probs, sample
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import DraftProposer, verify

logger = logging.getLogger(__name__)

# Most context tokens gathered for one decode group: keeps one layer's gathered keys and values
# for the group (fp32, 8 MiB each at 256 kv features) within the last-level cache of a small CPU.
DECODE_GROUP_TOKENS = 8192
# Continuations of a context up to this many tokens are attended like decodes, row by row.
ROW_BY_ROW_MAX_TOKENS = 8
# So are a step's prompts and prefill chunks, given a decode kernel, when they average at most
# this many tokens; with only decode-like rows left, the CPU runs the step's layers as the fused
# decode calls. Prefill otherwise attends each prompt in a call of its own and runs the layers op
# by op. Measured (bf16, 2 cores, AMD EPYC; op by op -> row by row): tiny, a 16-token prompt
# 0.54 -> 0.28 ms and a dozen 1.68 -> 0.99 ms; h256, a dozen 6.5 -> 4.6 ms; llama-110m, eight of
# 128 tokens 480 -> 436 ms. Longer prompts lose: row by row each token re-reads its context, and
# tiny's 256-token prompt took 1.31x as long.
ROW_BY_ROW_MEAN_PREFILL = 128

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    if name == "auto":
        name = model_config.torch_dtype if model_config.torch_dtype in DTYPES else "float32"
    return DTYPES[name]


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, max_len: int, device_type: str,
                  free_bytes: int, total_bytes: int = 0) -> int:
    """The KV blocks an engine with `config` allocates, given its device's free memory (after
    the weights) and, on CUDA, its total; the planner sizes simulated caches with this too."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_memory_bytes
    if budget is None:
        if device_type == "cuda":
            budget = int(total_bytes * config.gpu_memory_utilization) - (total_bytes - free_bytes)
        else:
            # Enough for every sequence at full length, but never more than a quarter of RAM.
            wanted = config.max_num_seqs * max_len // config.block_size * bytes_per_block
            budget = min(wanted, free_bytes // 4)
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"kv cache budget of {budget} bytes holds no block of {bytes_per_block} bytes; "
            "raise kv_cache_memory_bytes (or gpu_memory_utilization)")
    return int(blocks)


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
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
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
        self.decode_backend = ("cpu" if self.use_cpu_kernel
                               else "triton" if gpu_kernels.available(self.device.type) else None)
        for model in (self.model, self.draft):
            if model is not None and self.use_cpu_kernel and DecodeLayers.supported(model):
                model.decode_layers = DecodeLayers(model)
        # Decode-only steps: the batch and context lengths vary from step to step, so shapes are
        # dynamic from the start rather than recompiled for each new one.
        self.compiled = torch.compile(self.model, dynamic=True) if config.torch_compile else None
        self.proposer = (DraftProposer(self, self.draft, config.num_speculative_tokens or 1, max_positions)
                         if self.draft is not None else None)

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
        order, input_ids, positions, meta = self._prepare(out.scheduled)
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
        _, input_ids, positions, meta = self._prepare([item])
        return self.model.compute_logits(self._forward(input_ids, positions, meta))

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self.tp.enabled:  # the other ranks run the same pass on their shards
            tensor_parallel.send_step(input_ids, positions, meta)
        return self.run_model(input_ids, positions, meta)

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """This rank's forward pass: compiled for decode-only steps when asked, else eager."""
        if self.compiled is not None and not meta.prefills:
            return self.compiled(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    def _additive(self, blocked: torch.Tensor) -> torch.Tensor:
        return torch.zeros(blocked.shape, dtype=self.attn_dtype, device=self.device).masked_fill_(
            blocked, float("-inf"))

    def _prepare(self, items: list[ScheduledSequence]
                 ) -> tuple[list[int], torch.Tensor, torch.Tensor, AttentionMetadata]:
        # Decodes, and short continuations of a context (speculative verification, a draft
        # catching up), are attended row by row from the block cache, each token reading its
        # own prefix; prompts and longer chunks go through the prefill path, unless they are
        # short enough to go row by row too.
        prefilling = [it for it in items if not it.is_decode]
        short = self.decode_backend is not None and prefills_row_by_row(
            len(prefilling), sum(it.num_new_tokens for it in prefilling))
        decodes = sorted((i for i, it in enumerate(items) if short or _row_by_row(it)),
                         key=lambda i: items[i].context_len)
        prefills = [i for i, it in enumerate(items) if not (short or _row_by_row(it))]
        order = decodes + prefills
        bs, dev = self.block_size, self.device
        row_items = [idx for idx in decodes for _ in range(items[idx].num_new_tokens)]
        decode_ctx = [p + 1 for idx in decodes for p in range(items[idx].start, items[idx].context_len)]

        # Built as Python lists and converted once: a dozen small tensor ops here cost more than
        # a batch-1 decode step's attention.
        token_ids: list[int] = []
        position_list: list[int] = []
        slot_list: list[int] = []
        for idx in order:
            it = items[idx]
            table = it.seq.block_table
            token_ids.extend(it.token_ids)
            position_list.extend(range(it.start, it.context_len))
            slot_list.extend(table[p // bs] * bs + p % bs for p in range(it.start, it.context_len))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        positions = torch.tensor(position_list, dtype=torch.long, device=dev)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_list, dtype=torch.long, device=dev),
                                 num_decode_tokens=len(row_items), compute_dtype=self.attn_dtype)

        def block_tables(indices: list[int]) -> torch.Tensor:
            tables = [items[idx].seq.block_table for idx in indices]
            width = max(len(t) for t in tables)
            return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)

        def context_slots(indices: list[int]) -> torch.Tensor:  # [N, width * bs]
            return (block_tables(indices).unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(1)

        if decodes and self.decode_backend is not None:
            meta.decode_kernel = DecodeKernelArgs(
                block_tables=block_tables(row_items), context_lens=torch.tensor(decode_ctx, device=dev),
                max_context=max(decode_ctx), block_size=bs, backend=self.decode_backend)
            decode_groups = []
        else:
            decode_groups = _decode_groups(decode_ctx)
        for first, last in decode_groups:
            ctx = decode_ctx[first:last]
            longest = max(ctx)
            slots = context_slots(row_items[first:last])[:, :longest].contiguous()  # one layout: one compiled graph
            group = DecodeGroup(start=first, context_slots=slots)
            if min(ctx) != longest:
                lens = torch.tensor(ctx, device=dev)
                padded = torch.arange(longest, device=dev) >= lens.unsqueeze(1)
                group.mask = self._additive(padded).view(len(ctx), 1, 1, longest)
                # Masked, but must still read written memory: NaN * 0 would poison the output.
                group.context_slots = torch.where(padded, slots[:, :1], slots)
            meta.decode_groups.append(group)

        start = len(row_items)
        for idx in prefills:
            it = items[idx]
            span = PrefillSpan(start=start, length=it.num_new_tokens)
            if it.start > 0:
                span.context_slots = context_slots([idx])[0, :it.context_len]
                keys = torch.arange(it.context_len, device=dev)
                queries = torch.arange(it.start, it.context_len, device=dev)
                span.mask = self._additive(keys.unsqueeze(0) > queries.unsqueeze(1))
            meta.prefills.append(span)
            start += it.num_new_tokens
        return order, input_ids, positions, meta


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


def prefills_row_by_row(num_prefill_seqs: int, num_prefill_tokens: int) -> bool:
    """Whether a step whose prefills (`StepComposition`'s count and tokens) are these attends
    them row by row, where the runner has a decode kernel: the planner prices steps by this
    (elementwise, on NumPy arrays of steps)."""
    return (num_prefill_seqs > 0) & (num_prefill_tokens <= ROW_BY_ROW_MEAN_PREFILL * num_prefill_seqs)


def _row_by_row(item: ScheduledSequence) -> bool:
    return item.num_new_tokens == 1 or (item.start > 0 and item.num_new_tokens <= ROW_BY_ROW_MAX_TOKENS)


def _decode_groups(context_lens: list[int]) -> list[tuple[int, int]]:
    """Split context lengths (mostly ascending) into [first, last) runs of at most
    DECODE_GROUP_TOKENS tokens once padded to the run's longest."""
    groups, first, longest = [], 0, 0
    for i, length in enumerate(context_lens):
        longest = max(longest, length)
        if i > first and (i - first + 1) * longest > DECODE_GROUP_TOKENS:
            groups.append((first, i))
            first, longest = i, length
    if context_lens:
        groups.append((first, len(context_lens)))
    return groups
