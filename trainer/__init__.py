"""Config schema, model and data loading, the training loop, checkpoints and metrics."""

import importlib.abc
import importlib.machinery
import logging
import sys

# transformers imports peft where installed (its LR schedules do), and peft imports bitsandbytes where installed;
# on a CPU with AVX512-BF16, bitsandbytes' CPU backend then asks the Hugging Face Hub for a 4-bit kernel
# (kernels-community/quantization-bitsandbytes, through the `kernels` package) as it is imported, and logs a warning
# when it cannot have it. longtune uses no hub kernel (its 4-bit layers run bitsandbytes' own CPU or CUDA code), so
# that one module is executed with `kernels` unimportable (no network at all: the import fails at once and
# bitsandbytes falls back to its own code), and its warning is quiet. Neither imports anything now.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
_BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"


class _NoHubKernelLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        missing = object()
        kernels = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if kernels is missing:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = kernels


class _NoHubKernelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _BNB_CPU_OPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _NoHubKernelLoader(spec.loader)
        return spec


if not any(isinstance(f, _NoHubKernelFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernelFinder())
