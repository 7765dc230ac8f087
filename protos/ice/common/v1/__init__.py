"""Generated package ice.common.v1 (see protos/generate.py)."""
