"""Triton kernels beside their torch references, and the patches that put them into models (issue: kernels)."""
