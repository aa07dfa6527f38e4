"""Config schema, model and data loading, the training loop, checkpoints and metrics."""

import logging

# transformers imports peft where installed (its LR schedules do), and peft imports bitsandbytes where installed;
# on a CPU with AVX512-BF16 bitsandbytes then tries to fetch a 4-bit kernel from the Hugging Face hub and logs a
# warning when it cannot. longtune uses no 4-bit kernel: quiet from the start (setting a level imports nothing).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
