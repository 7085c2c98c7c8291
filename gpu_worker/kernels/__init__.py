"""Triton kernels of the fast frame step."""
