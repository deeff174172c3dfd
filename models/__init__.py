"""Heads trained on cached features: probes, fusion heads, cross-validation and metrics."""
