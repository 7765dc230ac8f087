"""Generated package ice.localizer.v1 (see protos/generate.py)."""
