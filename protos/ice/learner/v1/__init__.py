"""Generated package ice.learner.v1 (see protos/generate.py)."""
