"""Slow thinking: the near-line contextual reasoning instruction (CRI) pipeline and its cache."""
