"""The fused loss's default chunk size: pure arithmetic, so the planner sizes the loss without importing torch."""

# Default chunk bounds (tokens), see default_chunk_size.
MIN_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 4096


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk when none is given: chunk logits about the size of hidden, within [256, 4096]."""
    ratio = -(-vocab_size // hidden_size)  # ceil(V / H)
    chunk = _next_power_of_2(-(-n_tokens // ratio))
    chunk = max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, chunk))
    return max(1, min(n_tokens, chunk))


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
