"""Recommendation benchmark (a script, not a test): `python tests/benchmarks/bench_recommend.py
[--preset quick] [--help]`.

Same as `pilot bench recommend`: recommendations on held-out workloads for two models, launched
and measured on this machine, against a measured grid of configurations (issue 6).
"""

from planner.cli.bench import app as bench_app

if __name__ == "__main__":
    bench_app(["recommend", *__import__("sys").argv[1:]])
