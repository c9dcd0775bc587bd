"""Tensor parallelism: two CPU ranks (gloo) give the tokens one process gives.

Each test starts real worker processes through the engine, or real ranks through torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.model_zoo import make_checkpoint
from engine.quantization import quantize
from engine.quantize_checkpoint import quantize_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["def main(argv):\n    ", "import os\nimport sys\n", "class Queue:\n", "    return self."]
REPO = Path(__file__).resolve().parents[2]


def _generate(model: str, prompts=PROMPTS, params=GREEDY, dtype="float32", **kwargs) -> list[list[int]]:
    config = EngineConfig(model=model, dtype=dtype, num_threads=2, **kwargs)
    with LLM(config) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def _children() -> set[int]:
    """Live (not zombie) child processes of this one."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                found.add(int(entry))
    return found


def test_two_ranks_match_one_process_on_a_trained_model(trained_pair):
    target = str(trained_pair[0])
    assert _generate(target, tensor_parallel_size=2) == _generate(target)


def test_two_ranks_match_with_int8_weights(trained_pair):
    # At-load quantization happens before sharding, so each rank holds exactly the int8 weights
    # one process would, and the fused CPU kernels run on the shards.
    target = str(trained_pair[0])
    kwargs = {"quantization": "int8"}
    assert _generate(target, tensor_parallel_size=2, **kwargs) == _generate(target, **kwargs)


def test_bfloat16_logits_stay_within_rounding_of_one_process(trained_pair):
    # Each rank rounds its partial sum to bfloat16 before the all-reduce, so bf16 greedy runs may
    # part ways at a near tie (as in vLLM); the logits must still agree to bf16 precision.
    target = str(trained_pair[0])
    tokens = list(PROMPTS[0].encode()) * 4
    logits = []
    for size in (2, 1):
        with LLM(EngineConfig(model=target, dtype="bfloat16", num_threads=2, tensor_parallel_size=size)) as llm:
            logits.append(llm.score(tokens))
    scale = logits[1].abs().max()
    assert (logits[0] - logits[1]).abs().max() < 0.03 * scale
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean() > 0.9


def test_prequantized_int4_checkpoint_shards_along_whole_groups(trained_pair, tmp_path):
    target = str(trained_pair[0])
    quantized = str(quantize_checkpoint(target, tmp_path / "int4", "int4", group_size=64))
    assert _generate(quantized, tensor_parallel_size=2) == _generate(quantized)


def test_mixture_of_experts_with_gqa_shards_every_expert(tmp_path):
    model = str(make_checkpoint("mixtral-tiny", tmp_path / "moe", seed=1, dtype="float32"))
    prompts = [list(range(300, 300 + n)) for n in (3, 40, 11)]
    assert _generate(model, prompts, tensor_parallel_size=2) == _generate(model, prompts)


def test_speculative_decoding_and_scoring_under_tensor_parallelism(trained_pair):
    target, draft = map(str, trained_pair)
    spec = {"speculative_model": draft, "num_speculative_tokens": 3}
    config = EngineConfig(model=target, dtype="float32", num_threads=2, tensor_parallel_size=2, **spec)
    with LLM(config) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        logits = llm.score(outs[0].prompt_token_ids + outs[0].token_ids)
    assert [o.token_ids for o in outs] == _generate(target)
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0  # the draft was really used
    with LLM(EngineConfig(model=target, dtype="float32", num_threads=2)) as single:
        expected = single.score(outs[0].prompt_token_ids + outs[0].token_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_close_stops_the_worker_ranks(model_dir):
    before = _children()
    llm = LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=2, tensor_parallel_size=2))
    assert len(_children() - before) == 1  # rank 1
    llm.close()
    assert _children() - before == set()


def test_a_bad_checkpoint_fails_fast_and_leaves_no_ranks_behind(tmp_path):
    model = make_checkpoint("tiny", tmp_path / "broken", seed=0, dtype="float32")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    before, start = _children(), time.monotonic()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LLM(EngineConfig(model=str(model), dtype="float32", num_threads=2, tensor_parallel_size=2))
    assert time.monotonic() - start < 30
    assert _children() - before == set()


def test_shards_of_quantized_weights_dequantize_to_slices_of_the_whole():
    weight = torch.randn(64, 256)
    for method, group in (("int8", 256), ("int4", 64)):
        q = quantize(weight, method, group)
        whole = q.dequantize()
        torch.testing.assert_close(q.narrow(0, 16, 32).dequantize(), whole[16:48])
        torch.testing.assert_close(q.narrow(1, 128, 128).dequantize(), whole[:, 128:])
    with pytest.raises(ValueError, match="splits a quantization group of 64"):
        quantize(weight, "int4", 64).narrow(1, 32, 128)


def test_runs_under_torchrun(model_dir, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from engine import EngineConfig, LLM, SamplingParams
        config = EngineConfig(model={model_dir!r}, dtype="float32", num_threads=1, tensor_parallel_size=2)
        with LLM(config) as llm:
            outs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        print("TOKENS", json.dumps([o.token_ids for o in outs]))
    """))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    assert len(lines) == 1  # rank 0 alone returns from LLM(...); rank 1 serves it, then exits
    assert json.loads(lines[0].split(" ", 1)[1]) == _generate(model_dir)


_COLLECTIVES = """
import sys, torch
from engine.parallel import distributed
rank, init = int(sys.argv[1]), sys.argv[2]
distributed.join(rank, 2, "cpu", init)
comm = distributed.shared_memory()
assert comm is not None, "no shared-memory all-reduce"
tp = distributed.TensorParallel(rank, 2)
for dtype, n in ((torch.float32, 3_000_017), (torch.bfloat16, 5_000), (torch.float32, 7)):
    parts = [torch.randn(n, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(2)]
    x = parts[rank].clone()
    tp.all_reduce(x)  # 3M fp32 values: 12 MB, three slot-sized chunks
    expected = (parts[0].float() + parts[1].float()).to(dtype)
    assert torch.equal(x, expected), (dtype, n)
small = distributed.broadcast({"step": 1} if rank == 0 else None)
big = distributed.broadcast(bytes(range(256)) * 40_000 if rank == 0 else None)  # > a slot
assert small == {"step": 1} and big == bytes(range(256)) * 40_000
print("OK", rank, comm.generation)
distributed.leave()
"""


def test_shared_memory_collectives_between_two_processes(tmp_path):
    init = f"file://{tmp_path}/rendezvous"
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVES, str(rank), init], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    # Both ranks went through the same generations: 3 + 1 + 1 all-reduces, 2 broadcasts.
    assert sorted(out.split()[1] for out, _ in results) == ["0", "1"]
    assert len({out.split()[2] for out, _ in results}) == 1
