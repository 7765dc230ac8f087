"""Generated package ice.evaluator.v1 (see protos/generate.py)."""
