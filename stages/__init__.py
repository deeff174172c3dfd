"""Thin DVC stage entries: each reads its params section and calls one library function."""
