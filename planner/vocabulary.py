"""The words a plan is written in, defined once: the activation classes of a decoder layer and the places a plan
sends their chunks to, the tiers off the GPU, and where optimizer state and weights may live.

The planner decides in these words, plan files are written in them, and the offload runtime carries them out in
them. This module is torch-free and imports nothing, so every planner module can use it; offload/ reads it
through planner/plan.py (the one planner module the runtime imports), which re-exports it beside the Plan.
"""

# The classes a decoder layer's saved activations fall in (planner/inventory.py says what each holds), in the
# order plan files, the MILP's variables and `longtune plan`'s table list them: another order changes the
# bytes of every plan file written.
CLASSES = ("input", "attn", "pre", "post")

# Where a plan sends a chunk of a class: kept on the device, dropped and made again in the backward, or a tier.
GPU = "gpu"
RECOMPUTE = "recompute"
HOST, CXL, NVME = "host", "cxl", "nvme"
TIER_NAMES = (HOST, CXL, NVME)  # memory off the GPU: what the runtime can hold activations and state in

# Where optimizer state and decoder weights may live (memory.optimizer, memory.params; planner/problem.StateOption).
STATE_PLACES = (GPU, "cpu", NVME)
