"""What is alive on the GPU when, written once.

The MILP's memory rows (milp.py), the plan evaluator (evaluate.py), the arena's buffer lifetimes (arena.py)
and the runtime's expected residency (what offload/ measures against) all come from these functions. They
take per-layer quantities that may be numbers or PuLP expressions alike (only + and * by numbers are used).

Time steps of one micro-batch, for layers 0..L-1: forward of layer l is step l, the LM head is step L, the
backward of layer j is step 2L - j. With prefetch depth d:

  staging.<l>   layer l's offloaded bytes on their way out: written during forward l, drained during
                forward l+1 (the head, for the last layer)                     alive [l, l+1]
                (d = 0: drained at the end of forward l                        alive [l, l])
  prefetch.<l>  layer l's offloaded bytes coming back: requested when the backward of layer l+d starts (at
                the head for the last d layers), used by the backward of l    alive [max(L, 2L-l-d), 2L-l]
                (d = 0: requested when its own backward starts, and waited for: one layer's buffers in
                all, the copies not hidden behind any compute)
  kept          a layer's kept chunks: from its forward to the end of its backward
  recompute     one recomputed chunk at a time, inside a layer's backward

Memory at a position: what every plan holds (`fixed`: weights, gradients and optimizer state where they
live, RoPE tables), the position's workspace (the head's, or one layer's), the kept chunks of the layers not
yet back-propagated, the arena (staging and prefetch buffers are views into one block held for the whole
step, so every row counts it whole), and the recompute chunk. The forward positions are implied by the
backward ones (fewer kept chunks, the same or a smaller workspace).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # problem.py builds the state's rows with state_rows below
    from .problem import Problem

# The runtime aligns each stored storage (a dozen a chunk) to 64 bytes: a layer's region for a tier holds its
# chunks' bytes plus this slack per chunk, rounded up to 512 bytes (arena.layer_region_bytes). The arena rows
# count each offloaded chunk with REGION_SLACK_BYTES + 512 more, an upper bound of what the regions take.
REGION_SLACK_BYTES = 1024
ARENA_CHUNK_OVERHEAD = REGION_SLACK_BYTES + 512


def nvme_ring_slots(prefetch_depth: int) -> int:
    """Host buffers the NVMe tier's activations pass through (offload/stash.py), each the size of the largest
    layer's NVMe region: a layer's bytes wait in one from its forward until written, and come back through
    one a layer before their prefetch; depth + 2 of them never collide (depth 0: the slot the backward copies
    out of and the one the next layer's read fills). They are host memory: the host tier holds them beside its
    own activations and the state. (Fewer would only wait: the stash claims a slot once nothing uses it.)"""
    return prefetch_depth + 2


def positions(num_layers: int) -> list[str]:
    """The positions of the memory rows, in step order: the head, then the backward of L-1 down to 0."""
    return ["head"] + [f"backward {j}" for j in reversed(range(num_layers))]


def staging_lifetime(l: int, num_layers: int, depth: int = 1) -> tuple[int, int]:
    return l, l + (1 if depth else 0)


def prefetch_lifetime(l: int, num_layers: int, depth: int) -> tuple[int, int]:
    L = num_layers
    return max(L, 2 * L - l - depth), 2 * L - l


def _total(xs):
    total = 0
    for x in xs:
        total = total + x
    return total


def _prefix_sums(xs: Sequence) -> list:
    """[x0, x0 + x1, ...]: a layer's row counts the kept chunks of the layers at and below it."""
    out, total = [], 0
    for x in xs:
        total = total + x
        out.append(total)
    return out


def arena_live(problem: Problem, off: Sequence) -> list:
    """Bytes of staging + prefetch buffers alive at every time step (the arena must hold the largest)."""
    L, d = problem.num_layers, problem.prefetch_depth
    terms: list[list] = [[] for _ in range(2 * L + 1)]
    for l in range(L):
        for start, end in (staging_lifetime(l, L, d), prefetch_lifetime(l, L, d)):
            for t in range(start, end + 1):
                terms[t].append(off[l])
    return [_total(x) for x in terms]


def activation_residency(problem: Problem, kept: Sequence, off: Sequence, recompute: Sequence) -> dict[str, dict]:
    """Saved-activation bytes on the device per position and kind (kept / staging / prefetch / recompute): the
    runtime's expected residency, compared kind by kind with what it measures. `recompute[j]` is the largest
    chunk layer j recomputes (the memory rows reserve the step's largest in every row instead: a tighter LP)."""
    L, d = problem.num_layers, problem.prefetch_depth
    prefetch: list[list] = [[] for _ in range(2 * L + 1)]
    for l in range(L):
        start, end = prefetch_lifetime(l, L, d)
        for t in range(start, end + 1):
            prefetch[t].append(off[l])
    out = {"head": {"kept": _total(kept), "staging": off[L - 1] if d else 0, "prefetch": _total(prefetch[L]),
                    "recompute": 0}}
    prefixes = _prefix_sums(kept)
    for j in reversed(range(L)):
        out[f"backward {j}"] = {"kept": prefixes[j], "staging": 0, "prefetch": _total(prefetch[2 * L - j]),
                                "recompute": recompute[j]}
    return out


def state_rows(num_layers: int, *, rest_weights: float, layer_weights: float, streamed: bool, head_grads: float,
               embedding_grads: float, layer_grads: float, tied: bool) -> list[float]:
    """GPU bytes of the weights and gradients at each of `positions()` when the optimizer is off the GPU
    (offload/optimizer.py, offload/params.py); with it on the GPU: device_state_rows.

    Weights: the embeddings, final norm and head always; the decoder layers too, unless streamed
    (ParamStreamer): then each from its prefetch to its last use, so at the head the last layer alone (backward
    starts with it), in the backward of layer j that layer and the one prefetched below it, in the backward of
    layer 0 that layer alone.
    Gradients: each leaves for the host in its hook as soon as it is complete; the unit being back-propagated
    holds its own in its workspace (the head's in head_bytes, a layer's fp32 sum and cast in layer_workspace),
    so a row counts the gradient of the unit before it, whose copy the device may still be running as the next
    begins: the head's in the backward of the last layer, a layer's in the next one's. The backward of layer 0
    also bounds the embeddings' backward after it (their gradient beside layer 0's, nothing kept then; tied, the
    sum of theirs and the head's too). Tied
    embeddings: autograd holds the head's contribution until the embeddings' is added, through every row after
    the head (at the head it is the loss's weight gradient, in head_bytes).
    The forward rows are implied as before: two layers' weights, no gradient, no more kept chunks."""
    L = num_layers
    rows = [rest_weights + (1 if streamed else L) * layer_weights]
    for j in reversed(range(L)):
        weights = rest_weights + ((2 if j > 0 else 1) if streamed else L) * layer_weights
        grads = (0.0 if tied else head_grads) if j == L - 1 else layer_grads
        if j == 0:  # tied: and the sum autograd makes of theirs and the head's, beside both
            grads += (2 if tied else 1) * embedding_grads
        rows.append(weights + grads + (head_grads if tied else 0.0))
    return rows


def device_state_rows(num_layers: int, *, weights: float, moments: float, head_grads: float, embedding_grads: float,
                      layer_grads: float, tied: bool) -> list[float]:
    """GPU bytes of the state at each of `positions()` with the optimizer on the GPU (torch AdamW), one micro-batch a
    step in one process: the weights, and the moments from the first step on, the whole step; a gradient from the
    backward that makes it to the optimizer step (zero_grad sets them to None), so:
    at the head none (the head's weight gradient is in head_bytes while the loss makes it); in the backward of
    layer j the head's (with tied embeddings autograd holds it until the embeddings' is added) and those of the
    layers above j (layer j's own are in its workspace, layer_workspace); in the backward of layer 0 also the
    embeddings' dense gradient, which their backward makes after it, and with tied embeddings the sum autograd
    makes of it and the head's, beside both. That row bounds the optimizer step (torch's fused AdamW: every
    gradient, no temporaries).
    With accumulation the gradients of the first micro-batch stay through the next ones, and a data-parallel
    strategy keeps them in its buckets: there every gradient counts in every row (StateOption.gpu_bytes)."""
    L = num_layers
    rows = [weights + moments]
    for j in reversed(range(L)):
        embeddings = (2 if tied else 1) * embedding_grads if j == 0 else 0.0
        rows.append(weights + moments + head_grads + (L - 1 - j) * layer_grads + embeddings)
    return rows


def gpu_rows(problem: Problem, kept: Sequence, backward_phase, arena, state, unit: float = 1.0) -> list:
    """Total GPU memory at each of `positions()`: fixed + state + kept + arena (whole), and the head's bytes or,
    in a layer's backward, `backward_phase` (the larger of its two phases: backward_phase_bytes). `state`: the
    optimizer state's GPU bytes at each position (a list, StateOption.gpu_at), or one figure for all.

    The per-layer arguments are in the caller's unit; the problem's own byte figures are multiplied by `unit`."""
    L = problem.num_layers
    at = state if isinstance(state, (list, tuple)) else [state] * (L + 1)
    fixed = problem.fixed_total * unit
    rows = [fixed + at[0] + problem.head_bytes * unit + _total(kept) + arena]
    prefixes = _prefix_sums(kept)
    for i, j in enumerate(reversed(range(L)), start=1):
        rows.append(fixed + at[i] + prefixes[j] + arena + backward_phase)
    return rows


def backward_phase_bytes(problem: Problem, recompute: float) -> float:
    """A layer's workspace beyond its kept activations and the arena, the largest of its phases: a chunk's graph
    in backward with the recomputed chunk, a chunk's attention backward, and (conservatively, in the same row)
    the layer's forward (problem.layer_workspace)."""
    return max(problem.layer_workspace_bytes + recompute, problem.attention_phase_bytes, problem.forward_workspace_bytes)


def staging_window_s(problem: Problem) -> float:
    """Compute time a layer's copies to its tiers hide behind: the next layer's forward, during which its staging
    buffer drains (depth 0: none; it drains before the next layer starts)."""
    return problem.hides(problem.layer_fwd_s) if problem.prefetch_depth else 0.0


def prefetch_window_s(problem: Problem, j: int, recompute_s: Sequence[float]) -> float:
    """Compute time the prefetch of layer j hides behind: the backward of the layers between its request and
    its use (with their recompute), and the head when it is requested at the end of the forward."""
    L, d = problem.num_layers, problem.prefetch_depth
    window = sum(problem.layer_bwd_s + recompute_s[l] for l in range(j + 1, min(j + d, L - 1) + 1))
    if j + d >= L:
        window += problem.head_s
    return problem.hides(window)


def state_constant_s(problem: Problem, option) -> float:
    """Step time an optimizer/weights placement adds whatever the activations do: its own exposed time, the
    weights' forward fetch and the gradients' backward copy beyond their layer's compute."""
    if option is None:
        return 0.0
    L = problem.num_layers
    return (option.exposed_s + L * max(0.0, option.fwd_h2d_s - problem.hides(problem.layer_fwd_s))
            + L * max(0.0, option.bwd_d2h_s - problem.hides(problem.layer_bwd_s)))
