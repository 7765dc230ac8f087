"""Generated package ice.evaluator (see protos/generate.py)."""
