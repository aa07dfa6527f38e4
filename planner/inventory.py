"""Analytic activation inventory of one decoder layer of a supported family (longtune.models.families).

Lists the tensors autograd saves for backward in transformers 5.24 with attn_implementation="sdpa", per token,
so the planner can price keeping / offloading / recomputing each activation class without importing torch.
`longtune.planner.profile.measure_layer` measures the same list with saved_tensors_hooks; tests keep them equal.

Attention kernel modelled: the flash path of `F.scaled_dot_product_attention` (CUDA
`_scaled_dot_product_flash_attention`, CPU `_scaled_dot_product_flash_attention_for_cpu`; both save q, k, v, out,
logsumexp). transformers takes it when the causal mask is skipped (no padding, no packing mask, seq_len below the
sliding window if the model has one) and then passes `enable_gqa=True` (head_dim <= 256), so k/v are saved with
num_kv_heads, NOT repeated to num_heads. With an explicit mask (e.g. Mistral-v0.1 beyond its 4096 window)
transformers repeats k/v and the kernel changes: this formula does not apply.

Per token (s = dtype_bytes, h = hidden, I = intermediate, d = head_dim, nq/nkv = heads, q = nq*d, kv = nkv*d):
  input = 4h                                   (fp32 upcast of the layer input)
  pre   = 4 + 2s*h + s*(q + 2kv)  [+ qk_norm: (4+s)(q + kv) + 4(nq + nkv)]
  attn  = s*q + 4nq                            (out + fp32 logsumexp)
  post  = 4h + 4 + 2s*h + 4s*I
  shared (once per model) = 2s*d               (RoPE cos, sin)

Rules behind these numbers:
* Gemma's norm multiplies in fp32 (`(x * rstd) * (1 + w)`, cast after): it keeps its normalised values in fp32,
  4 bytes per element where Llama's keeps s (`LayerShape.norm_fp32_product`).
* RMSNorm computes in fp32: `x.float()`, pow/mul save the fp32 x (a copy in bf16, x itself in fp32: 4 bytes either way),
  rsqrt saves its fp32 result (1 float per normalised row), `weight * y.to(dtype)` saves y in the model dtype, and the
  Linear after the norm saves the norm's output weight*y: a norm keeps 4 + s + s bytes per element, not s.
* A tensor saved by several ops counts once (memory is per storage): q/k/v_proj share one saved input, gate/up too;
  the cos/sin views used by q and k are the model's one pair; o_proj's input is the kernel's own output (see below).
* Parameters (Linear/norm weights) are not activations. Adds (residuals, bias) and views save nothing.
* RoPE `q*cos + rotate_half(q)*sin` saves only cos/sin (the constant operand of each mul): model-level, `shared`.
* sdpa returns (b, nq, t, d) as a transposed view of a (b, t, nq, d) buffer (CPU and CUDA flash), so transformers'
  `transpose(1, 2).contiguous()` before o_proj copies nothing: the attention output is held once.
* logsumexp is fp32, one value per query head per token.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one torch-free module of longtune the planner reads: which families exist and how their layers differ.
from longtune.models.families import family, head_dim as config_head_dim

from .vocabulary import CLASSES  # the per-layer classes the planner chooses among; "shared" is model-level

_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def normalize_dtype(dtype: str) -> str:
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return name


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    dtype: str = "bfloat16"
    norm_fp32_product: bool = False  # Gemma: the norms keep their normalised values in fp32

    @property
    def dtype_bytes(self) -> int:
        return _DTYPES[normalize_dtype(self.dtype)]

    @classmethod
    def from_hf_config(cls, d: dict, dtype: str) -> LayerShape:
        """From a transformers config dict (`config.to_dict()` or config.json)."""
        f = family(d.get("model_type"))  # other families add norms / gates that these formulas do not count
        return cls(
            hidden=d["hidden_size"],
            intermediate=d["intermediate_size"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d["num_key_value_heads"],  # required: the absent default differs per config class
            head_dim=config_head_dim(d),
            qk_norm=f.qk_norm,
            dtype=normalize_dtype(dtype),
            norm_fp32_product=f.norm_offset != 0,
        )


@dataclass(frozen=True)
class SavedTensor:
    name: str
    part: str  # "input" | "pre" | "attn" | "post" | "shared"
    bytes_per_token: float
    dtype: str


def layer_inventory(shape: LayerShape) -> list[SavedTensor]:
    """Every tensor one decoder layer saves for backward (batch 1, per token), plus the model-level RoPE cos/sin."""
    h, inter, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    s, dt, f32 = shape.dtype_bytes, normalize_dtype(shape.dtype), "float32"
    normed_bytes, normed_dtype = (4, f32) if shape.norm_fp32_product else (s, dt)

    def t(name, part, nbytes, dtype=dt):
        return SavedTensor(name, part, float(nbytes), dtype)

    def rmsnorm(name, part_x, part_rest, width, rows=1, out_saved=True):
        # x upcast to fp32 (saved by pow and mul), rsqrt per row (fp32), normalised y cast back to the model dtype
        # (saved by `weight * y`), and the output weight*y if the next op saves it (a Linear saves its input)
        out = [t(f"{name}.x_fp32", part_x, 4 * width, f32), t(f"{name}.rstd", part_rest, 4 * rows, f32),
               t(f"{name}.normed", part_rest, normed_bytes * width, normed_dtype)]
        return out + [t(f"{name}.out", part_rest, s * width)] if out_saved else out

    # input: what the input RMSNorm keeps of the layer input -- its fp32 upcast (4h even in bf16, where a checkpoint
    # of the raw input would need only s*h); in fp32 it is the input tensor itself.
    inv = rmsnorm("input_layernorm", "input", "pre", h)  # .out: q/k/v_proj's shared saved input (counted once)
    if shape.qk_norm:  # on the (t, heads, d) view of the projections, one rstd per head; RoPE does not save .out
        inv += rmsnorm("self_attn.q_norm", "pre", "pre", q, shape.num_heads, out_saved=False)
        inv += rmsnorm("self_attn.k_norm", "pre", "pre", kv, shape.num_kv_heads, out_saved=False)
    inv += [
        t("self_attn.q_rope", "pre", s * q),  # RoPE outputs, saved by the kernel as its q and k
        t("self_attn.k_rope", "pre", s * kv),
        t("self_attn.v_proj.out", "pre", s * kv),  # the kernel's v is a transposed view of v_proj's output
        # The kernel allocates out as (b, t, heads, d) and returns a transposed view, so transformers'
        # `transpose(1, 2).contiguous()` is a no-op and o_proj saves this same storage (counted once).
        t("self_attn.sdpa.out", "attn", s * q),
        t("self_attn.sdpa.logsumexp", "attn", 4 * shape.num_heads, f32),
    ]
    inv += rmsnorm("post_attention_layernorm", "post", "post", h)  # x = residual + attn; .out: gate/up's input
    inv += [  # SwiGLU: down(act(gate(x)) * up(x))
        t("mlp.gate_proj.out", "post", s * inter),  # saved by act (silu saves its input)
        t("mlp.act.out", "post", s * inter),  # saved by the mul (with up.out)
        t("mlp.up_proj.out", "post", s * inter),
        t("mlp.down_proj.in", "post", s * inter),
        t("rotary_emb.cos", "shared", s * d),  # computed once per forward, shared by all layers
        t("rotary_emb.sin", "shared", s * d),
    ]
    return inv


def runtime_inventory(shape: LayerShape, kernels: frozenset[str] = frozenset()) -> list[SavedTensor]:
    """Every tensor the activation runtime (offload/activations.py) stashes for one layer, per token.

    The runtime cuts the layer into the classes itself, so this is what it keeps, not what plain transformers
    would: the input is the layer input itself (model dtype; a norm that saves its own input refers to that copy,
    so in fp32 the input norm's upcast costs nothing more); `pre` is the pre part's saved tensors plus its outputs
    q/k/v (the attention backward's inputs); `attn` the attention output and logsumexp; `post` the post part's.
    `kernels` names the longtune kernels patched in ("rmsnorm", "swiglu"; "rope" saves what stock RoPE saves):
    stock RMSNorm's fp32 upcast of a bf16 input is kept as the input itself (the dispatcher casts it again in
    backward, exactly), so in bf16 the runtime keeps less than plain transformers: no fp32 copy of the layer
    input or of the residual; the RMSNorm kernel saves its input, the fp32 rstd and (through the next Linear)
    its output, nothing more;
    the SwiGLU kernel saves gate and up, and down_proj the product.
    """
    h, inter, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    s, dt, f32 = shape.dtype_bytes, normalize_dtype(shape.dtype), "float32"
    fused_norm, fused_mlp = "rmsnorm" in kernels, "swiglu" in kernels
    normed_bytes, normed_dtype = (4, f32) if shape.norm_fp32_product else (s, dt)

    def t(name, part, nbytes, dtype=dt):
        return SavedTensor(name, part, float(nbytes), dtype)

    def norm(name, part, width, rows=1, x_new=True, out_saved=True):
        """x_new: the norm's input is a storage of this class, not the stashed layer input (which costs nothing
        more). Either way the input is kept once, in its own dtype: the stock norm's fp32 upcast of a bf16 input
        is stored as the bf16 input and cast again when backward asks for it (offload/dispatch.py)."""
        out = [t(f"{name}.x", part, s * width)] if x_new else []
        out.append(t(f"{name}.rstd", part, 4 * rows, f32))
        if not fused_norm:
            out.append(t(f"{name}.normed", part, normed_bytes * width, normed_dtype))
        return out + ([t(f"{name}.out", part, s * width)] if out_saved else [])

    inv = [t("input", "input", s * h)]
    inv += norm("input_layernorm", "pre", h, x_new=False)
    if shape.qk_norm:  # on the q/k projections' outputs (new storages), one rstd per head; RoPE saves no .out
        inv += norm("self_attn.q_norm", "pre", q, shape.num_heads, out_saved=False)
        inv += norm("self_attn.k_norm", "pre", kv, shape.num_kv_heads, out_saved=False)
    inv += [t("q", "pre", s * q), t("k", "pre", s * kv), t("v", "pre", s * kv),
            t("attn.out", "attn", s * q), t("attn.logsumexp", "attn", 4 * shape.num_heads, f32)]
    # post: o_proj saves the attention output (the attn class); r = x + o_proj(.) is new
    inv += norm("post_attention_layernorm", "post", h)
    if fused_mlp:
        inv += [t("mlp.gate", "post", s * inter), t("mlp.up", "post", s * inter), t("mlp.down_proj.in", "post", s * inter)]
    else:
        inv += [t("mlp.gate_proj.out", "post", s * inter), t("mlp.act.out", "post", s * inter),
                t("mlp.up_proj.out", "post", s * inter), t("mlp.down_proj.in", "post", s * inter)]
    inv += [t("rotary_emb.cos", "shared", s * d), t("rotary_emb.sin", "shared", s * d)]
    return inv


def attention_backward_workspace(shape: LayerShape, keys: int, queries: int) -> dict[str, float]:
    """Bytes alive at the peak of one query chunk's attention backward on a GPU (offload/attention.py,
    `attention_backward_chunk`), beside the layer's K, V and their gradient sums. Its largest kernel call is
    the chunk's `queries` against up to `keys` earlier keys of their document; per item (s = the dtype's bytes,
    q = nq x d, kv = nkv x d):

      dq_sum          queries x q x 4      the chunk's dq, summed over its kernel calls in fp32
      block_dq        queries x q x s      the call's shares of dq, dk and dv, before they are added
      block_dkv       2 x keys x kv x s
    bf16/fp16, FlashAttention-2's backward (mha_bwd), inside the kernel:
      kernel_dq_accum queries x (q + nq) x 4   its fp32 dq accumulator and softmax_d
      kernel_dkv      2 x keys x q x s     grouped heads (nq > nkv): dk, dv per query head before the group sums
    fp32, the memory-efficient kernel, which takes no grouped heads (the block's items in fp32):
      repeated_kv     2 x keys x q x 4     K and V repeated to nq heads
      block_dkv       2 x keys x q x 4     their gradients, per query head (summed per group after)

    What the kernels allocate for themselves is from FlashAttention-2's source; the rest is what
    tests/test_attention_core.py measures on the meta device (offload/live_bytes.py)."""
    s, nq, nkv, d = shape.dtype_bytes, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q, kv = nq * d, nkv * d
    out = {"dq_sum": queries * q * 4.0, "block_dq": queries * q * float(s), "block_dkv": 2.0 * keys * kv * s}
    if s < 4:
        out |= flash_backward_inside(nq, nkv, d, s, keys, queries)
    elif nq > nkv:
        out["repeated_kv"] = 2.0 * keys * q * 4
        out["block_dkv"] = 2.0 * keys * q * 4
    return out


def flash_backward_inside(nq: int, nkv: int, head_dim: int, dtype_bytes: int, keys: int, queries: int
                          ) -> dict[str, float]:
    """What FlashAttention-2's backward (mha_bwd) allocates inside the kernel call for `queries` against `keys`:
    its fp32 dq accumulator and softmax_d and, with grouped heads, dk and dv per query head before the group
    sums. A dry run allocates as much around the call on the meta device (offload/attention.py).

    Why offload/ imports this (the one planner name it reads besides planner/plan.py): it is a fact of the kernel
    that both sides need, not a decision of a plan. The planner counts these bytes in a layer's attention
    backward workspace; the dry run, whose meta kernel allocates nothing, holds as much around each call at the
    shapes that call has (per attention block, which no plan records). One formula, so the count and what the
    dry run measures against it cannot drift apart; torch-free, so the planner stays so."""
    q = nq * head_dim
    out = {"kernel_dq_accum": queries * (q + nq) * 4.0}
    if nq > nkv:
        out["kernel_dkv"] = 2.0 * keys * q * dtype_bytes
    return out


def class_bytes_per_token(shape: LayerShape, kernels: frozenset[str] = frozenset(), runtime: bool = True) -> dict[str, float]:
    """Bytes per token per class: the CLASSES of one layer (input, attn, pre, post) and shared (whole model, once).

    runtime=True: what the activation runtime stashes (what a plan moves); False: what plain transformers saves.
    """
    out = dict.fromkeys((*CLASSES, "shared"), 0.0)
    for x in (runtime_inventory(shape, kernels) if runtime else layer_inventory(shape)):
        out[x.part] += x.bytes_per_token
    return out
