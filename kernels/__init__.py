"""Triton kernels beside their torch references (the patch that puts them into transformers models is
`longtune.models.patch`).

Each kernel module holds the Triton kernel, its torch reference, and an autograd
function that picks one (`backend.use_triton`). `longtune.models.patch.apply_kernels` swaps them
into Llama, Qwen2/3 and Mistral models. Nothing here imports the rest of longtune.
"""
