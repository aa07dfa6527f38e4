"""Triton kernels beside their torch references, and the patch that puts them into transformers models.

Each kernel module holds the Triton kernel, its torch reference, and an autograd
function that picks one (`backend.use_triton`). `patch.apply_kernels` swaps them
into Llama, Qwen2/3 and Mistral models. Nothing here imports the rest of longtune.
"""
