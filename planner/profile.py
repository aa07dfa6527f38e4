"""Measured activation inventory of one decoder layer: what autograd really saves (checks planner/inventory.py).

torch/transformers are imported inside the function so that `longtune.planner` stays torch-free at import.
"""

from __future__ import annotations

from .inventory import SavedTensor, normalize_dtype


def measure_layer(hf_config: dict, dtype: str = "float32", seq_len: int = 64, device: str = "cpu") -> list[SavedTensor]:
    """Tensors saved for backward by decoder layer 0 of a (tiny) model built from `hf_config`, per token.

    Runs the layer at seq_len and 2*seq_len tokens; each saved tensor's bytes per token is the difference over
    seq_len, which drops constant-size tensors (none on CPU; the CUDA kernel's RNG seed/offset) exactly.
    device="cuda" would measure the CUDA flash kernel instead (not exercised by the CPU tests).
    """
    a, b = (_record(hf_config, dtype, n, device) for n in (seq_len, 2 * seq_len))
    if [x[:3] for x in a] != [x[:3] for x in b]:  # same ops save the same tensors in the same order
        raise RuntimeError("saved-tensor sequence depends on seq_len; cannot take per-token differences")
    return [SavedTensor(name, part, (nb_b - nb_a) / seq_len, dt)
            for (name, part, dt, nb_a), (*_, nb_b) in zip(a, b) if nb_b != nb_a]


def _record(hf_config: dict, dtype: str, seq_len: int, device: str) -> list[tuple[str, str, str, int]]:
    """(name, part, dtype, storage bytes) of each distinct storage layer 0 saves, in order of first save."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch_dtype = getattr(torch, normalize_dtype(dtype))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch_dtype).to(device).train()
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def ptr(t):
        return t.untyped_storage().data_ptr()

    # Attribution is by the storage's PRODUCER, not by who saves it: the kernel saves q/k/v made by RoPE/v_proj
    # ("pre") next to its own out/logsumexp ("attn"). Module hooks give where we are; a dispatch mode sees every op,
    # so it can tell RoPE (pre), the kernel (attn) and what follows it (post) apart, all inside self_attn.forward.
    producer: dict[int, tuple[str, str]] = {}  # storage ptr -> (part, name)
    where: list[str] = []  # stack of running module paths within layer 0 ("" = the layer itself)
    state = {"phase": None}  # None outside layer 0; "pre" until the attention kernel ran, then "post"

    def push(name):
        def hook(mod, args, kwargs):
            where.append(name)
            if name == "":  # layer 0 starts: its hidden-state input is the "input" class
                state["phase"] = "pre"
                producer[ptr(args[0] if args else kwargs["hidden_states"])] = ("input", "hidden_states")
        return hook

    def pop(name):
        def hook(mod, args, kwargs, out):
            where.pop()
            if name == "":
                state["phase"] = None
            elif name == "rotary_emb":  # cos/sin: computed once per forward, used by every layer
                for n, t in zip(("cos", "sin"), out):
                    producer[ptr(t)] = ("shared", f"rotary_emb.{n}")
        return hook

    handles = []
    for name, mod in [*layer.named_modules(), ("rotary_emb", model.model.rotary_emb)]:
        handles.append(mod.register_forward_pre_hook(push(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(pop(name), with_kwargs=True))

    class Producers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if state["phase"] is None:
                return out
            op = func.overloadpacket.__name__
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            in_ptrs = {ptr(a) for a in ins}
            if "scaled_dot_product" in op:  # the attention kernel: its outputs are "attn", what follows is "post"
                part, state["phase"] = "attn", "post"
            elif op == "_to_copy" and ins and producer.get(ptr(ins[0]), ("",))[0] == "input":
                part = "input"  # the norm's fp32 upcast of the layer input stands for the input (x itself in fp32)
            else:
                part = state["phase"]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for i, t in enumerate(o for o in outs if isinstance(o, torch.Tensor)):
                # views/in-place alias an input; new storages overwrite stale entries (freed addresses get reused)
                if ptr(t) not in in_ptrs:
                    producer[ptr(t)] = (part, f"{where[-1] or 'layer'}.{op}" + (f"[{i}]" if i else ""))
            return out

    saved: dict[int, tuple[str, str, str, int]] = {}

    def pack(t):
        p = ptr(t)
        if state["phase"] is not None and p not in params and p not in saved:
            part, name = producer.get(p, ("?", "unknown"))
            saved[p] = (name, part, str(t.dtype).removeprefix("torch."), t.untyped_storage().nbytes())
        return t

    x = torch.randn(1, seq_len, config.hidden_size, dtype=torch_dtype, device=device, requires_grad=True)
    try:
        # Force the flash kernel (CPU: _scaled_dot_product_flash_attention_for_cpu, saves q, k, v, out, logsumexp,
        # like CUDA flash) -- it raises rather than silently falling back to the math path (s x s attention matrix).
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), Producers(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(inputs_embeds=x, use_cache=False)  # real mask/RoPE plumbing; only layer 0 is recorded
    finally:
        for h in handles:
            h.remove()
    return list(saved.values())
