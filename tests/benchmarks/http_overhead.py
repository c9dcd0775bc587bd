"""What serving over HTTP costs: one configuration measured in process and through `pilot serve`
(the client in another process), in one run, with the ratio.

    python tests/benchmarks/http_overhead.py llama-110m     # or: tiny
"""

import sys
import tempfile

import numpy as np

from engine import EngineConfig
from engine.model_zoo import make_checkpoint
from planner.measure.http import OverHTTP
from planner.measure.profiler import InProcess
from planner.spec.workload import Workload

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-110m"
d = tempfile.mkdtemp()
m = make_checkpoint(shape, d + "/m", seed=0, dtype="bfloat16" if shape != "tiny" else "float32")
cfg = EngineConfig(model=str(m), max_num_seqs=8, max_num_batched_tokens=512)
w = Workload.from_flags("128", "64", concurrency=1, num_requests=16)
rows = {}
for name, M in (("in-process", InProcess), ("over HTTP", OverHTTP)):
    h = M(cfg, w)
    r = h.measure(w, "concurrency", 4)
    itl = np.concatenate([x.latency.itl_s for x in r.requests])
    ttft = [x.latency.ttft_s for x in r.requests]
    tok = sum(x.output_tokens for x in r.requests) / r.duration_s
    rows[name] = (np.median(ttft) * 1e3, np.median(itl) * 1e3, np.percentile(itl, 95) * 1e3, tok)
    h.close()
print(f"{shape}: concurrency 4, 16 requests of 128 in / 64 out")
print("| path | TTFT p50 ms | ITL p50 ms | ITL p95 ms | output tok/s |")
print("|---|---|---|---|---|")
for k, v in rows.items():
    print(f"| {k} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} | {v[3]:.0f} |")
a, b = rows["in-process"], rows["over HTTP"]
print(f"| HTTP / in-process | {b[0]/a[0]:.2f}x | {b[1]/a[1]:.2f}x | {b[2]/a[2]:.2f}x | {b[3]/a[3]:.2f}x |")
