"""Speculative decoding: what a draft is worth (``speedup``: expected speedup and break-even acceptance)."""
