"""Generated package ice.common (see protos/generate.py)."""
