"""Triton kernels for ZoomR's decode step, each with a pure-torch reference of identical semantics."""
