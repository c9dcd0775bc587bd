"""Engine benchmark (a script, not a test): `python tests/benchmarks/bench_engine.py [--help]`.

Same as `pilot bench engine`: pilot vs transformers on llama-110m, float32 and bfloat16.
"""

from planner.cli.bench import app as bench_app

if __name__ == "__main__":
    bench_app(["engine", *__import__("sys").argv[1:]])
