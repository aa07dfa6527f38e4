"""CpuAdamW against torch.optim.AdamW: bitwise for the torch backend, 1e-6 relative for DeepSpeed's."""

from __future__ import annotations

import threading

import pytest
import torch

from longtune.offload import cpu_adam
from longtune.offload.cpu_adam import DEEPSPEED, TORCH_FUSED, AdamWHyper, CpuAdamW, bitwise_equal_to_torch_fused

# Odd sizes: no multiple of any SIMD width, so every kernel's scalar tail runs too.
SHAPES = [(7,), (33, 65), (1000, 3), (1,), (4099,)]
BETAS, EPS, WEIGHT_DECAY = (0.8, 0.95), 1e-6, 0.1
LRS = [1e-2, 3e-3, 5e-2, 1e-3, 2e-2]  # changing every step: catches an lr cached across calls


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in LRS]
    return params, grads


def run_torch_optim(params, grads, steps: int, **kind):
    """torch.optim.AdamW over copies of `params`; returns (params, exp_avgs, exp_avg_sqs, step counts)."""
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kind)
    for k in range(steps):
        opt.param_groups[0]["lr"] = LRS[k]
        for p, g in zip(ref, grads[k]):
            p.grad = g.clone()
        opt.step()
    states = [opt.state[p] for p in ref]
    return ([p.detach() for p in ref], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [float(s["step"]) for s in states])


def run_cpu_adam(adam: CpuAdamW, params, grads, steps: int):
    params = [p.clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for k in range(steps):
        adam.step(params, [g.clone() for g in grads[k]], exp_avgs, exp_avg_sqs, k + 1,
                  AdamWHyper(lr=LRS[k], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))
    return params, exp_avgs, exp_avg_sqs


def max_relative_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max over tensors of max|ours - ref| / max|ref|: an element near zero does not blow it up."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


def test_torch_backend_is_bitwise_torch_adamw_fused_with_its_step_count():
    params, grads = make_problem()
    adam = CpuAdamW("torch")
    assert adam.backend_name == TORCH_FUSED and bitwise_equal_to_torch_fused(adam.backend_name)
    for steps in (1, 3, 5):  # every prefix, so an off-by-one step count cannot hide behind a later step
        ours = run_cpu_adam(adam, params, grads, steps)
        *ref, counts = run_torch_optim(params, grads, steps, fused=True)
        assert counts == [float(steps)] * len(SHAPES)
        for name, a, b in zip(("params", "exp_avgs", "exp_avg_sqs"), ours, ref):
            for i, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), f"{name}[{i}] differs from torch.optim.AdamW(fused=True) after {steps} steps"


def test_step_count_matters():
    """The bitwise test above would be hollow if the count did not change the bits."""
    params, grads = make_problem()
    hyper = AdamWHyper(lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    out = []
    for step in (2, 3):
        p, m, v = [params[0].clone()], [torch.full(SHAPES[0], 0.1)], [torch.full(SHAPES[0], 0.01)]
        CpuAdamW("torch").step(p, [grads[0][0].clone()], m, v, step, hyper)
        out.append(p[0])
    assert not torch.equal(*out)


def test_torch_fused_is_within_1e_6_of_the_single_tensor_loop():
    params, grads = make_problem()
    fused = run_cpu_adam(CpuAdamW("torch"), params, grads, 5)
    *loop, _ = run_torch_optim(params, grads, 5, foreach=False)
    for name, a, b in zip(("params", "exp_avgs", "exp_avg_sqs"), fused, loop):
        rel = max_relative_diff(a, b)
        assert rel <= 1e-6, f"{name}: torch fused vs foreach=False max relative difference {rel:.3g}"


def test_same_bits_from_a_worker_thread():
    params, grads = make_problem(seed=1)
    main = run_cpu_adam(CpuAdamW("torch"), params, grads, 3)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", run_cpu_adam(CpuAdamW("torch"), params, grads, 3)))
    worker.start()
    worker.join()
    for a, b in zip(main, box["out"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(not cpu_adam.deepspeed_cpu_adam_built(),
                    reason="DeepSpeed's cpu_adam op is not built; tests never spend a minute compiling it")
def test_deepspeed_backend_within_1e_6_of_torch_fused():
    params, grads = make_problem()
    adam = CpuAdamW("deepspeed")
    assert adam.backend_name == DEEPSPEED and not bitwise_equal_to_torch_fused(adam.backend_name)
    ours = run_cpu_adam(adam, params, grads, 5)
    ref = run_cpu_adam(CpuAdamW("torch"), params, grads, 5)
    for name, a, b in zip(("params", "exp_avgs", "exp_avg_sqs"), ours, ref):
        rel = max_relative_diff(a, b)
        assert rel <= 1e-6, f"{name}: DeepSpeed vs torch fused max relative difference {rel:.3g}"
    # From a worker thread, with chunks smaller than a tensor so the chunk seams are crossed too. DeepSpeed
    # runs whole SIMD tiles (up to 8 x 16 floats) with FMAs and the ragged tail without, so a seam off a
    # tile boundary changes the rounding there: chunks are multiples of 128 elements (1000 fails here).
    box = {}
    cpu_adam._DS_CHUNK, saved = 1024, cpu_adam._DS_CHUNK
    try:
        worker = threading.Thread(target=lambda: box.setdefault("out", run_cpu_adam(adam, params, grads, 5)))
        worker.start()
        worker.join()
    finally:
        cpu_adam._DS_CHUNK = saved
    for a, b in zip(ours, box["out"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    adam.close()


def test_jit_build_dir_is_torchs(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    assert str(cpu_adam.deepspeed_jit_build_dir()) == cpp_extension._get_build_directory("cpu_adam", verbose=False)


def test_auto_is_torch_fused_even_when_deepspeed_is_built():
    """auto must not depend on what this machine compiled earlier: it is the bitwise-exact backend."""
    assert CpuAdamW("auto").backend_name == TORCH_FUSED


def test_deepspeed_that_cannot_build_is_a_clear_error(monkeypatch):
    builder = pytest.importorskip("deepspeed.ops.op_builder").CPUAdamBuilder

    def fail(self, verbose=False):
        raise OSError("c++: command not found")

    monkeypatch.setattr(builder, "load", fail)
    with pytest.raises(RuntimeError, match="cpu_adam op could not be built or loaded: OSError: c\\+\\+: command not found"):
        CpuAdamW("deepspeed")
    assert CpuAdamW("auto").backend_name == TORCH_FUSED  # auto never raises for a missing op


def test_bad_input_is_a_one_line_error():
    hyper = AdamWHyper(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    adam = CpuAdamW("torch")
    p, g, m, v = (torch.zeros(4, 4) for _ in range(4))
    cases = [
        (lambda: CpuAdamW("adam"), "backend must be one of"),
        (lambda: AdamWHyper(lr=-1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), "lr must be"),
        (lambda: AdamWHyper(lr=1e-3, betas=(0.9, 1.0), eps=1e-8, weight_decay=0.0), "betas must be"),
        (lambda: AdamWHyper(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=-0.1), "weight_decay must be"),
        (lambda: adam.step([p], [g], [m], [v], 0, hyper), "step must be an int >= 1"),
        (lambda: adam.step([p], [g], [m], [], 1, hyper), "lists of equal length"),
        (lambda: adam.step([p], [g.double()], [m], [v], 1, hyper), r"grads\[0\] must be a float32 CPU tensor"),
        (lambda: adam.step([p], [g], [m.t()], [v], 1, hyper), r"exp_avgs\[0\] is not contiguous"),
        (lambda: adam.step([p], [g], [m], [torch.zeros(16)], 1, hyper), r"exp_avg_sqs\[0\] has shape \(16,\)"),
        (lambda: adam.step([p], [p], [m], [v], 1, hyper), r"grads\[0\] shares memory with params\[0\]"),
        (lambda: bitwise_equal_to_torch_fused("torch"), "unknown CPU Adam backend name"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_worker_thread_sees_the_process_wide_thread_count():
    """The fused kernel sizes its OpenMP team from torch.get_num_threads() in the calling thread."""
    saved = torch.get_num_threads()
    try:
        for n in {1, saved}:
            torch.set_num_threads(n)
            box = {}
            worker = threading.Thread(target=lambda: box.setdefault("n", torch.get_num_threads()))
            worker.start()
            worker.join()
            assert box["n"] == n
    finally:
        torch.set_num_threads(saved)
