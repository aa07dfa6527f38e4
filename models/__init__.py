"""Everything longtune knows about Hugging Face model families, in one place.

- `families`: the supported families and what sets them apart (torch-free: the planner and the config checks
  read it before torch loads).
- `layers`: the decoder-layer stack of a model, and a layer cut into the parts the activation runtime runs.
- `patch`: the kernels put into a model of a family (RoPE passed explicitly, per attention module).

Adding a family is one entry in `families.FAMILIES` (README: "Adding a model family").
"""
