"""The activation runtime carries out a plan inside autograd and changes nothing but memory.

Every plan (keep, offload to host or NVMe, recompute; each class, token splits of 0, 1/4, 1/2 and all of the
chunks; mixed plans from the solver) gives the plain transformers model's loss and every parameter gradient
(fp32 on the CPU: max abs difference <= 1e-6 x the gradient's norm), with one document per row and with
packed documents; what the runtime stashes per class equals the planner's inventory byte for byte; its
measured residency equals the plan's prediction; a slow tier is hidden by prefetch when the depth allows.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longtune.offload.runtime import MemoryRuntime, RuntimeOptions
from longtune.planner.inventory import LayerShape, class_bytes_per_token
from longtune.planner.evaluate import margin_bytes
from longtune.planner.milp import min_gpu_budget
from longtune.planner.plan import make_plan, plan_of
from longtune.planner.problem import CLASSES, Machine, ModelShape, Tier, build_problem

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
G = 4  # chunks per class
SEQ = 48


def tiny(model_type: str, layers: int = 2) -> dict:
    cfg = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
           "tie_word_embeddings": False}
    if model_type == "qwen3":
        cfg["head_dim"] = 16  # != hidden / heads
    if model_type == "gemma":
        cfg["head_dim"] = 8  # GemmaConfig's default is 256
    return cfg


def build(cfg: dict, dtype=torch.float32):
    c = dict(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c), attn_implementation="sdpa",
                                             dtype=dtype)
    model.config.use_cache = False
    return model.train()


def machine(link_gbps: float = 10.0) -> Machine:
    return Machine("test", 1e12, 1e12, 0.5, 0.5, (Tier("host", 1e12, link_gbps * 1e9, link_gbps * 1e9),
                                                   Tier("nvme", 1e12, link_gbps * 5e8, link_gbps * 5e8)))


def problem(cfg: dict, tokens: int = SEQ, dtype: str = "float32", depth: int = 1, budget: float = 1e12, chunks: int = G,
            **kw):
    shape = ModelShape.from_hf_config(cfg, dtype)
    return build_problem(shape, tokens, kw.pop("machine", None) or machine(), budget, chunks=chunks, prefetch_depth=depth,
                         **kw)


def uniform(layers: int, **classes) -> list[dict]:
    """Every layer the same; a class not named stays on the GPU."""
    return [{c: dict(classes.get(c, {"gpu": G})) for c in CLASSES} for _ in range(layers)]


def grads_of(model, ids, position_ids=None, labels=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=position_ids, labels=ids if labels is None else labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_plan(model, plan, ids, tmp_path, position_ids=None, depth: int = 1, delay: float = 0.0, lagging=False):
    runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cpu"), activations=True, prefetch_depth=depth,
                                                        nvme_path=str(tmp_path / "nvme"), copy_delay_s=delay,
                                                        lagging_copies=lagging))
    try:
        with runtime.step(1):
            got = grads_of(model, ids, position_ids)
        return got, runtime
    finally:
        runtime.close()


def assert_same(ref, got, rel: float = 1e-6):
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=0), (got[0], ref[0])
    assert ref[1].keys() == got[1].keys()
    for name, g in ref[1].items():
        err = (got[1][name] - g).abs().max().item()
        assert err <= rel * g.norm().item(), (name, err, g.norm().item())


@pytest.fixture(scope="module")
def models():
    """Each family's tiny model and its plain gradients (one document, and packed documents)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, SEQ))
    # Documents cross chunk edges; the last two do not start at position 0 (transformers starts a document
    # wherever positions do not step by +1, and so does the runtime)
    packed_pos = torch.cat([torch.arange(n) + first for n, first in ((5, 0), (17, 0), (1, 30), (25, 3))]).unsqueeze(0)
    out = {}
    for family in FAMILIES:
        model = build(tiny(family))
        out[family] = (model, ids, grads_of(model, ids), packed_pos, grads_of(model, ids, packed_pos))
    return out


def class_plans():
    """(class, place, chunks there) for each class, place and token split."""
    for cls in CLASSES:
        places = ["host", "nvme"] + (["recompute"] if cls in ("pre", "post") else [])
        splits = [G] if cls == "attn" else [1, 2, G]  # 0 of the chunks is the all-kept plan
        for place in places:
            for n in splits:
                yield cls, place, n


@pytest.mark.parametrize("family", FAMILIES)
def test_every_class_place_and_token_split_is_exact(family, models, tmp_path):
    model, ids, ref, _, _ = models[family]
    P = problem(tiny(family))
    cases = [(None, "gpu", 0), *class_plans()]
    for cls, place, n in cases:
        counts = {} if cls is None else {cls: {place: n, **({"gpu": G - n} if n < G else {})}}
        plan = plan_of(P, uniform(2, **counts))
        got, runtime = run_plan(model, plan, ids, tmp_path)
        assert_same(ref, got)
        assert runtime.dispatcher.stash.unplanned_bytes == 0, (cls, place, n)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_each_layers_input_gradient_is_written_over_its_output_gradient(family, models, tmp_path, monkeypatch):
    """One full-length gradient a layer: the input gradient goes over the output gradient the runtime made (the layer
    above's, or its final norm's, run chunk by chunk), in every layer, and the gradients stay exact."""
    from longtune.offload.activations import ActivationRuntime

    model, ids, ref, _, _ = models[family]
    same: list[bool] = []
    backward = ActivationRuntime._backward

    def recording(self, st, dy):
        dx, grads = backward(self, st, dy)
        same.append(dx.data_ptr() == dy.data_ptr())
        return dx, grads

    monkeypatch.setattr(ActivationRuntime, "_backward", recording)
    got, _ = run_plan(model, plan_of(problem(tiny(family)), uniform(2, post={"recompute": 2, "gpu": 2})), ids, tmp_path)
    assert_same(ref, got)
    assert same == [True, True]


def test_the_final_norms_input_gradient_goes_over_the_fused_losss_gradient(tmp_path, monkeypatch):
    """With the fused loss, which writes the hidden states' gradient over the final norm's output, the norm's input
    gradient goes over that in turn, and the last layer's over it: one full-length gradient from the head down, and
    the loss and gradients of the same model without the runtime."""
    from longtune.models.patch import apply_kernels
    from longtune.offload.activations import ActivationRuntime

    model = build(tiny("llama"))
    apply_kernels(model, rmsnorm=False, rope=False, swiglu=False, fused_ce=True, ce_chunk_tokens=16)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    ref = grads_of(model, ids)
    same: list[bool] = []
    for name in ("_norm_backward", "_backward"):
        def recording(self, *args, _original=getattr(ActivationRuntime, name)):
            dx, grads = _original(self, *args)
            same.append(dx.data_ptr() == args[1].data_ptr())
            return dx, grads
        monkeypatch.setattr(ActivationRuntime, name, recording)
    got, _ = run_plan(model, plan_of(problem(tiny("llama")), uniform(2, pre={"host": 2, "gpu": 2})), ids, tmp_path)
    assert_same(ref, got)
    assert same == [True, True, True]  # the norm, then layers 1 and 0


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_are_exact(family, models, tmp_path):
    """Attention never crosses a document: per-document calls of the core, equal to transformers' masked sdpa."""
    model, ids, _, pos, ref = models[family]
    P = problem(tiny(family))
    plan = plan_of(P, [uniform(1, input={"host": G}, pre={"recompute": 2, "gpu": 2}, attn={"nvme": G},
                               post={"recompute": 1, "host": 3})[0],
                       uniform(1, pre={"host": G}, post={"recompute": G})[0]])
    got, _ = run_plan(model, plan, ids, tmp_path, pos)
    assert_same(ref, got)


def test_solver_plans_at_several_budgets_are_exact_and_measured_as_predicted(tmp_path):
    """Mixed plans straight from the solver (slow link: every kind of decision pays somewhere), 4 layers, batch 2:
    exact, and the runtime's measured device residency equals the plan's prediction at every position."""
    cfg = tiny("llama", layers=4)
    model = build(cfg)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, SEQ))
    ref = grads_of(model, ids)
    slow = machine(link_gbps=1e-6)  # so slow that offloading competes with recomputing
    base = problem(cfg, tokens=2 * SEQ, machine=slow)
    keep_all = plan_of(base, uniform(4)).predicted["peak_bytes"]["gpu"]
    keep_all += margin_bytes(keep_all) * 1.01  # the budget that keeps everything: the solver keeps a margin below it
    low = min_gpu_budget(base, gap=0)
    seen = set()
    for frac in (0.0, 0.3, 0.6, 1.0):
        plan = make_plan(base.with_budget(low + frac * (keep_all - low)), gap=0)
        seen |= {p for layer in plan.layers for d in layer.values() for p in d}
        got, runtime = run_plan(model, plan, ids, tmp_path)
        assert_same(ref, got)
        r = runtime.dispatcher.residency
        expected = plan.evaluation().residency
        for position, kinds in expected.items():
            assert r.phase_peaks.get(position, 0) == pytest.approx(sum(kinds.values()), abs=64 * G * 8), position
        assert r.device_peak <= plan.predicted["activation_peak_bytes"] + 64 * G * 8
    assert {"gpu", "recompute", "host"} <= seen  # the budgets spanned real trade-offs


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_recomputed_chunks_queries_keys_and_values_are_counted(family, models, tmp_path):
    """The runtime's count of device bytes holds a recomputed pre chunk's q, k and v (the graph's outputs, not
    saved tensors) while it lives, as the plan's recompute row does: measured equals planned at every position.
    Before: 16 KB short on the tiny Llama, 24 KB on Qwen3, where pre is recomputed."""
    model, ids, ref, _, _ = models[family]
    plan = plan_of(problem(tiny(family)), uniform(2, pre={"recompute": G}))
    got, runtime = run_plan(model, plan, ids, tmp_path)
    assert_same(ref, got)
    measured = runtime.dispatcher.residency.phase_peaks
    for position, kinds in plan.evaluation().residency.items():
        assert measured.get(position, 0) == pytest.approx(sum(kinds.values()), abs=64 * G * 8), position


def test_uneven_chunks_fit_their_planned_regions(tmp_path):
    """With the tokens not a multiple of the chunk count, chunks differ by a token (offload/activations.chunk_bounds);
    the plan sizes every chunk as the largest (planner/problem.chunk_tokens), so offloaded chunks fit their regions
    and the device holds no more than the plan says. Before: the plan sized each as tokens/chunks, the larger last
    chunks did not fit and stayed on the device, unplanned."""
    cfg = tiny("llama")
    model = build(cfg)
    torch.manual_seed(3)
    seq = 4 * G + 3
    ids = torch.randint(0, 256, (1, seq))
    ref = grads_of(model, ids)
    P = problem(cfg, tokens=seq)
    plan = plan_of(P, uniform(2, input={"gpu": 1, "host": 3}, attn={"nvme": G}, pre={"gpu": 2, "host": 2},
                              post={"gpu": 1, "nvme": 3}))
    got, runtime = run_plan(model, plan, ids, tmp_path)
    assert_same(ref, got)
    assert runtime.dispatcher.stash.unplanned_bytes == 0
    assert runtime.dispatcher.residency.device_peak <= plan.predicted["activation_peak_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_stashes_the_planners_inventory_byte_for_byte(family, dtype, tmp_path):
    cfg = tiny(family)
    model = build(cfg, getattr(torch, dtype))
    ids = torch.randint(0, 256, (1, 64))
    P = problem(cfg, tokens=64, dtype=dtype)
    _, runtime = run_plan(model, plan_of(P, uniform(2)), ids, tmp_path)
    per_token = class_bytes_per_token(LayerShape.from_hf_config(cfg, dtype))
    for l in range(2):
        for cls in CLASSES:
            assert runtime.dispatcher.class_bytes[l, cls] == per_token[cls] * 64, (l, cls)


@pytest.mark.parametrize("family,kernels", [("qwen3", ("rmsnorm",)), ("qwen3", ("swiglu",)),
                                            ("qwen3", ("rmsnorm", "rope", "swiglu")), ("gemma", ("rmsnorm", "rope"))])
def test_inventory_with_kernels(family, kernels, tmp_path):
    """With longtune's kernels patched in, the runtime saves what the kernels save, as the planner counts."""
    from longtune.models.patch import apply_kernels

    cfg = tiny(family)
    model = build(cfg)
    apply_kernels(model, **{k: k in kernels for k in ("rmsnorm", "rope", "swiglu")}, fused_ce=False)
    ids = torch.randint(0, 256, (1, 32))
    plain = grads_of(model, ids)
    P = problem(cfg, tokens=32, kernels=frozenset(kernels))
    got, runtime = run_plan(model, plan_of(P, uniform(2, pre={"recompute": 2, "host": 2}, post={"host": G})), ids, tmp_path)
    assert_same(plain, got, rel=1e-5)
    full = class_bytes_per_token(LayerShape.from_hf_config(cfg, "float32"), frozenset(kernels))
    assert runtime.dispatcher.class_bytes[0, "post"] == full["post"] * 32
    assert runtime.dispatcher.class_bytes[0, "input"] == full["input"] * 32


def test_bf16_plans_match_plain_bf16(tmp_path):
    """bf16: the same plans give the plain bf16 model's loss and gradients to bf16 rounding (the attention of a
    chunk's queries merges its key blocks' outputs, each rounded to bf16 once: offload/attention.py)."""
    cfg = tiny("llama")
    model = build(cfg, torch.bfloat16)
    ids = torch.randint(0, 256, (1, SEQ))
    ref = grads_of(model, ids)
    P = problem(cfg, dtype="bfloat16")
    got, _ = run_plan(model, plan_of(P, uniform(2, input={"host": G}, pre={"recompute": 2, "nvme": 2},
                                              attn={"host": G}, post={"recompute": 3, "gpu": 1})), ids, tmp_path)
    assert torch.allclose(got[0], ref[0], rtol=2 ** -8, atol=0), (got[0], ref[0])
    for name, g in ref[1].items():
        assert (got[1][name].float() - g.float()).abs().max() <= 2 ** -7 * g.float().norm(), name


def test_autocast_runs_attention_in_autocasts_dtype_as_the_plain_model_does(tmp_path):
    """fp32 weights under bf16 autocast: the plain model's SDPA casts q, k and v to bf16 (flash attention in
    bf16); the runtime's attention did in fp32 (the slow path on a GPU, twice the bytes of its output). Now it
    runs in bf16 too: the attention output stashed is bf16 (the planner's bf16 count), and the loss and
    gradients are the plain autocast model's to bf16 rounding."""
    cfg = tiny("llama")
    model = build(cfg)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(4))
    plan = plan_of(problem(cfg), uniform(2, input={"host": G}, pre={"recompute": 2, "host": 2}, attn={"host": G},
                                         post={"recompute": G}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads_of(model, ids)
        got, runtime = run_plan(model, plan, ids, tmp_path)
    bf16 = class_bytes_per_token(LayerShape.from_hf_config(cfg, "bfloat16"))
    assert runtime.dispatcher.class_bytes[0, "attn"] == bf16["attn"] * SEQ
    assert got[0].item() == pytest.approx(ref[0].item(), rel=2 ** -7)
    for name, g in ref[1].items():
        assert (got[1][name] - g).abs().max() <= 2 ** -6 * g.norm(), name


def test_unsupported_architecture_is_named(tmp_path):
    from longtune.models.layers import UnsupportedModel, check_supported

    with pytest.raises(UnsupportedModel, match="llama, mistral, qwen2, qwen3"):
        check_supported(AutoConfig.for_model("gpt2"), 64)
    mistral = AutoConfig.for_model("mistral", sliding_window=32)
    with pytest.raises(UnsupportedModel, match="sliding-window attention"):
        check_supported(mistral, 64)


def test_a_slow_tier_is_hidden_when_prefetch_depth_allows(tmp_path):
    """Every copy takes `delay` on the host-to-device mover. The backward of a layer (made slow on purpose) hides
    its prefetch of the layer below: compute never waits on it. With no compute to hide behind (a fast layer),
    the wait is measured, about `delay` per layer. One chunk per class: one copy out per layer, one back (with G
    chunks, the forward's G copies out per layer were most of the test's time)."""
    cfg = tiny("llama", layers=4)
    model = build(cfg)
    ids = torch.randint(0, 256, (1, SEQ))
    plan = plan_of(problem(cfg, chunks=1), [{c: {"host" if c == "input" else "gpu": 1} for c in CLASSES} for _ in range(4)])
    delay = 0.4  # well above a tiny layer's own backward, even on a loaded machine
    slow_backward = [0.0]

    def slow(module, grad_in, grad_out):  # the layer's backward takes longer than one copy
        time.sleep(slow_backward[0])

    hooks = [layer.register_full_backward_hook(slow) for layer in model.model.layers]
    try:
        waits = {}
        for name, pause in (("hidden", 2 * delay), ("exposed", 0.0)):
            slow_backward[0] = pause
            _, runtime = run_plan(model, plan, ids, tmp_path, delay=delay)
            waits[name] = runtime.h2d.stall_s()
    finally:
        for h in hooks:
            h.remove()
    # Hidden: only the first prefetch (issued at the end of the forward, behind a head much faster than a copy)
    # can be waited on. Exposed: each layer's prefetch lands after its backward is ready to start.
    assert waits["hidden"] < 1.5 * delay, waits
    assert waits["exposed"] > 2 * delay, waits


# --- copies that lag as on a GPU (offload/movers.py, lagging-device mode) -------------------------------------

LAGGING_LAYERS = 5
MIXED = [  # every tier and token split somewhere, a different mix per layer
    uniform(1, input={"nvme": G}, pre={"recompute": 2, "host": 2}, attn={"host": G}, post={"nvme": 1, "gpu": 3})[0],
    uniform(1, input={"host": G}, pre={"nvme": G}, attn={"nvme": G}, post={"recompute": G})[0],
    uniform(1, input={"nvme": 2, "gpu": 2}, attn={"nvme": G}, post={"host": 2, "recompute": 2})[0],
    uniform(1, pre={"host": 1, "gpu": 3}, attn={"host": G}, post={"nvme": G})[0],
    uniform(1, input={"nvme": G}, pre={"nvme": G}, attn={"nvme": G}, post={"host": G})[0],
]


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_when_copies_lag_as_on_a_gpu(family, depth, tmp_path):
    """Lagging-device mode: a copy runs only when compute or the host must have it done, so a destination read
    or a source reused without waiting gives wrong gradients here as it would on a GPU. Every tier, token
    splits, packed documents, prefetch depth 0-4 (at 0 every layer's buffers are the same bytes): the plain
    model's loss and gradients."""
    cfg = tiny(family, layers=LAGGING_LAYERS)
    model = build(cfg)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1, SEQ))
    pos = torch.cat([torch.arange(n) for n in (20, 3, 25)]).unsqueeze(0)
    ref = grads_of(model, ids, pos)
    plan = plan_of(problem(cfg, depth=depth), MIXED)
    got, runtime = run_plan(model, plan, ids, tmp_path, pos, depth=depth, lagging=True)
    assert_same(ref, got)
    stash = runtime.dispatcher.stash
    assert stash.unplanned_bytes == 0
    assert runtime.h2d.lagging and not runtime.h2d._queue
    assert 0 < stash.nvme_read == stash.nvme_written  # each layer read back once (not again ahead of a prefetch)
    if depth == 0:  # one layer's buffers: at every position the device holds what the plan says (no next layer's)
        for position, kinds in plan.evaluation().residency.items():
            assert runtime.dispatcher.residency.phase_peaks.get(position, 0) == \
                pytest.approx(sum(kinds.values()), abs=64 * G * 8), position


def test_the_nvme_ring_waits_for_the_device_before_reusing_a_slot(tmp_path):
    """The review's bug: an NVMe read into a ring slot waited for the slot's previous read, not for the
    host-to-device copy out of it. On a GPU the host runs layers ahead of the device in backward (waits are the
    compute stream's, not the host's), so that copy may still be queued and then brings another layer's bytes.
    Here the host issues the whole backward without ever blocking on the device, and each layer's compute is
    a copy of its prefetched input queued where the compute would be: after its own prefetch, before the next
    layer's. The device (the lagging mover's queue) runs when the host must wait for it, and at the end."""
    cfg = tiny("llama", layers=6)
    model = build(cfg)
    depth = 1
    plan = plan_of(problem(cfg, depth=depth), uniform(6, input={"nvme": G}))
    runtime = MemoryRuntime(model, plan, RuntimeOptions(torch.device("cpu"), activations=True, prefetch_depth=depth,
                                                        nvme_path=str(tmp_path / "nvme"), lagging_copies=True))
    try:
        from longtune.offload.stash import SavedRef

        stash, layers = runtime.dispatcher.stash, range(6)
        torch.manual_seed(3)
        saved = [torch.randn(1, SEQ, 32) for _ in layers]  # each layer's input, a chunk's worth of bytes
        refs = []
        for l in layers:  # forward
            stash.begin_forward(l)
            refs.append(SavedRef(stash.put(l, "nvme", saved[l]), saved[l]))
            stash.end_forward(l)
        stash.prefetch(5)  # at the end of the forward, as the runtime does
        read = [torch.empty_like(t) for t in saved]
        for l in reversed(layers):  # the host's backward, in the runtime's order
            stash.prefetch(l - depth)
            runtime.h2d.copy(read[l], refs[l].tensor())  # layer l's compute reads its input, on the device
            stash.release(l)
        stash.finish()  # the host's NVMe reads have landed (the worst case: the device is later still)
        runtime.h2d.close()  # the device catches up
        for l in layers:
            assert torch.equal(read[l], saved[l]), f"layer {l} got another layer's activations"
    finally:
        runtime.close()
