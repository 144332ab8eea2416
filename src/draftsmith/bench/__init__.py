"""Benchmark pieces that do not depend on the engine: sandboxed execution, HumanEval, line completion, reports."""
