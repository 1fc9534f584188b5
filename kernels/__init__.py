"""Tensor post-processing ops with a plain-PyTorch reference for each."""
