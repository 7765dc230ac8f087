"""Generated package ice.localizer (see protos/generate.py)."""
