"""Generated package ice.learner (see protos/generate.py)."""
