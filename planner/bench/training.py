"""`pilot models train`: a byte-level target and a much smaller draft, trained on local text.

Speculative decoding pays off only when the draft agrees with the target often, and that is a
property of trained weights: random checkpoints agree by chance. The corpus is the Python
standard library's own source (on every machine that runs pilot); both models read bytes
(the engine's byte-level tokenizer: id = byte, BOS 256, EOS 257), so they share a tokenizer.
The trainer is a plain PyTorch Llama whose parameter names are Hugging Face's, so its
state_dict is written straight into a checkpoint the engine (and transformers) load.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from engine import rope_inv_freq
from engine.device import native_bf16
from engine.model_zoo import write_checkpoint

BOS, EOS = 256, 257
VOCAB = 320  # bytes + BOS/EOS, padded to a multiple of 64

# Parameter counts: target ~13M (52 MB in fp32, so a decode step is dominated by reading its
# weights, not by fixed per-step costs), draft ~0.2M (~60x fewer, a step ~8x cheaper on the
# engine). SMALL_TARGET (~3.2M) is for tests, which only need trained weight statistics.
TARGET: dict[str, Any] = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                          "num_attention_heads": 8, "num_key_value_heads": 4}
SMALL_TARGET: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                                "num_attention_heads": 8, "num_key_value_heads": 4}
DRAFT: dict[str, Any] = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2}


def model_config(shape: dict[str, Any], max_positions: int = 1024) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": max_positions,
            "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": BOS,
            "eos_token_id": EOS, "torch_dtype": "float32", **shape}


# -- corpus ------------------------------------------------------------------------------------

def stdlib_corpus(max_bytes: int = 16 << 20) -> torch.Tensor:
    """The standard library's .py files, concatenated in a fixed order, as byte ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


# -- a trainable Llama with Hugging Face parameter names ---------------------------------------

class _Norm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _Block(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d = h // heads
        self.heads, self.kv_heads, self.head_dim = heads, kv, d
        self.input_layernorm = _Norm(h, cfg["rms_norm_eps"])
        self.post_attention_layernorm = _Norm(h, cfg["rms_norm_eps"])
        self.self_attn = nn.Module()
        for name, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            setattr(self.self_attn, name, nn.Linear(h, out, bias=False))
        self.self_attn.o_proj = nn.Linear(heads * d, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.mlp.up_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.mlp.down_proj = nn.Linear(cfg["intermediate_size"], h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TrainableLlama(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.model.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.model.norm = _Norm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        freqs = torch.outer(torch.arange(cfg["max_position_embeddings"]).float(),
                            rope_inv_freq(d, cfg["rope_theta"], None))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, self.cos[:t], self.sin[:t])
        return self.lm_head(self.model.norm(x))


# -- training ----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    path: Path
    steps: int
    final_loss: float  # nats per byte, mean of the last steps
    seconds: float


def train_model(shape: dict[str, Any], out: str | Path, corpus: torch.Tensor, seconds: float,
                max_steps: int | None = None, batch_size: int = 16, seq_len: int = 256,
                lr: float = 3e-3, seed: int = 0, label: str = "model") -> TrainResult:
    """Train for `seconds` of wall time (or `max_steps`), then write the checkpoint to `out`."""
    if corpus.numel() <= seq_len + 1:
        raise ValueError(f"corpus of {corpus.numel()} bytes is shorter than seq_len={seq_len}")
    torch.manual_seed(seed)
    cfg = model_config(shape)
    model = TrainableLlama(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    start, losses, step = time.perf_counter(), [], 0
    with Progress(TextColumn(f"training {label}"), BarColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True) as progress:
        task = progress.add_task(label, total=max_steps or seconds, loss="-")
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (max_steps is not None and step >= max_steps):
                break
            # Short warm-up, then cosine decay over the step budget, or else the time budget.
            frac = step / max_steps if max_steps else min(1.0, elapsed / seconds)
            scale = min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            offsets = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=generator)
            window = torch.stack([corpus[o:o + seq_len + 1] for o in offsets.tolist()])
            # bf16 autocast where the CPU has bf16 arithmetic (2-3x faster steps); emulated, it is
            # slower than fp32. Master weights stay fp32 either way.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16()):
                logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            progress.update(task, completed=step if max_steps else min(seconds, time.perf_counter() - start),
                            loss=f"{losses[-1]:.3f}")
    tail = losses[-20:] or [float("nan")]
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    path = write_checkpoint(sorted(state.items()), cfg, out)
    return TrainResult(path, step, sum(tail) / len(tail), time.perf_counter() - start)


def train_pair(out: str | Path, seconds: float = 300.0, max_steps: int | None = None,
               corpus_bytes: int = 16 << 20, seed: int = 0, batch_size: int = 8,
               seq_len: int = 256, target_shape: dict[str, Any] | None = None,
               draft_shape: dict[str, Any] | None = None) -> tuple[TrainResult, TrainResult]:
    """A target and a draft under `out`/target and `out`/draft; the target gets 80% of the time
    (its steps cost ~10x the draft's). With `max_steps` each trains that many steps within the
    time (with `seconds` infinite, exactly that many, as tests do on any host)."""
    corpus = stdlib_corpus(corpus_bytes)
    out = Path(out)
    common = dict(max_steps=max_steps, batch_size=batch_size, seq_len=seq_len)
    target = train_model(target_shape or TARGET, out / "target", corpus, seconds * 0.8, seed=seed,
                         label="target", **common)
    draft = train_model(draft_shape or DRAFT, out / "draft", corpus, seconds * 0.2, seed=seed + 1,
                        label="draft", **common)
    return target, draft
