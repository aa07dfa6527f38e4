"""The one place a run's module and gradient hooks are installed, in one documented order.

The offloaded optimizer, the weight streamer and layer-wise GaLore do not register torch hooks themselves: each
adds callbacks to a HookSet under its role, and the HookSet installs one torch hook per module and per
parameter, which calls them in ROLES order:

    before a group's forward   optimizer: the group's update has landed (its weights are current)
                               streamer:  fetch the layer's weights, prefetch the next
    after a group's forward    streamer:  free the layer's weights
    a parameter's gradient     optimizer: average over the ranks, copy to the host, step the group when complete
                               galore:    project, accumulate, step layer-wise
                               streamer:  the streamed weight's gradient has left: count it down

A component used alone (tests, benches) fills and installs a HookSet of its own; under MemoryRuntime every
component fills the runtime's, which installs it once they are all built and removes it on close.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ROLES = ("optimizer", "galore", "streamer")


class HookSet:
    def __init__(self) -> None:
        # id(owner) -> (owner, [(role, callback)]), in the order first added: installation order is fixed
        self._pre: dict[int, tuple[nn.Module, list]] = {}
        self._post: dict[int, tuple[nn.Module, list]] = {}
        self._grad: dict[int, tuple[torch.Tensor, list]] = {}
        self._handles: list = []

    def before_forward(self, module: nn.Module, role: str, fn: Callable[[], None]) -> None:
        self._add(self._pre, module, role, fn)

    def after_forward(self, module: nn.Module, role: str, fn: Callable[[object], None]) -> None:
        """fn(output)."""
        self._add(self._post, module, role, fn)

    def on_grad(self, param: torch.Tensor, role: str, fn: Callable[[torch.Tensor], None]) -> None:
        """fn(param), once its gradient is accumulated (a post-accumulate-grad hook)."""
        self._add(self._grad, param, role, fn)

    def _add(self, table: dict, owner, role: str, fn) -> None:
        if role not in ROLES:
            raise ValueError(f"hook role {role!r}: expected one of {ROLES}")
        if self._handles:
            raise RuntimeError("the hooks are installed already: add callbacks before install()")
        table.setdefault(id(owner), (owner, []))[1].append((role, fn))

    @staticmethod
    def _ordered(calls: list) -> list:
        return [fn for _, fn in sorted(calls, key=lambda c: ROLES.index(c[0]))]  # stable within a role

    def install(self) -> "HookSet":
        if self._handles:
            return self
        for module, calls in self._pre.values():
            self._handles.append(module.register_forward_pre_hook(_pre_hook(self._ordered(calls))))
        for module, calls in self._post.values():
            self._handles.append(module.register_forward_hook(_post_hook(self._ordered(calls))))
        for param, calls in self._grad.values():
            self._handles.append(param.register_post_accumulate_grad_hook(_grad_hook(self._ordered(calls))))
        return self

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _pre_hook(fns: list):
    def hook(module, args) -> None:
        for f in fns:
            f()
    return hook


def _post_hook(fns: list):
    def hook(module, args, output) -> None:
        for f in fns:
            f(output)
    return hook


def _grad_hook(fns: list):
    def hook(param) -> None:
        for f in fns:
            f(param)
    return hook
