"""Attribution hooks: each layer's input a and output gradient δ = ∂F/∂y from ONE ordinary batched backward.

For a layer y = W a + b the per-sample gradients are ∇_W F_i = Σ_pos δ_pos a_posᵀ and ∇_b F_i = Σ_pos δ_pos,
so (a, δ) per layer is all a projector needs; the per-sample gradient itself is never formed.

The hooks go through diffusers' `HookRegistry` (`diffusers.hooks`), next to any hooks already there:
`pre_forward` keeps a reference to the module's input (autograd saves that tensor for the weight
gradient anyway, so this costs no memory), `post_forward` passes the output through `Tap`, an identity
autograd function that also takes a zero "anchor" scalar: its backward hands δ to the hook and gives the
anchor no gradient. `capture.backward(F)` differentiates F with respect to the anchor only: every hooked
output lies on that path, so every tap runs, while autograd skips the parameter gradients nobody asked
for (and `.grad` is never touched). (An earlier version added the anchor to each output and registered a
tensor hook: the same δ, plus an add in the forward and a sum over δ in the backward per hooked call.)

    with attribution_hooks({"conv_in": unet.conv_in}, on_gradient=None) as capture:
        capture.backward(task.outputs(inputs, keys).sum())
        (a, delta), = capture.hooks["conv_in"].captured      # or stream them to `on_gradient`

On exit (also on error) every hook is removed and the modules are left exactly as they were: no registry
attribute, no forward wrapper and no captured tensor remain unless they were there before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "diffusers_attribution.capture"

# on_gradient(name, module, a, delta): called during backward, once per forward call of the module.
OnGradient = Callable[[str, torch.nn.Module, torch.Tensor, torch.Tensor], None]


class CaptureHook(ModelHook):
    """Keeps the input a of every forward call and hands (a, δ) to `on_gradient` when δ arrives.

    With `on_gradient=None`, the pairs are appended to `captured` instead (tests, inspection).
    """

    def __init__(self, name: str, anchors: Anchors, on_gradient: OnGradient | None = None):
        super().__init__()
        self.name = name
        self.anchors = anchors
        self.on_gradient = on_gradient
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls = 0
        self._input: torch.Tensor | None = None

    def pre_forward(self, module, *args, **kwargs):
        self._input = (args[0] if args else kwargs["input"]).detach()
        return args, kwargs

    def post_forward(self, module, output):
        a, self._input = self._input, None
        self.calls += 1
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point()):
            return output
        return Tap.apply(output, self.anchors.get(output.device), lambda delta: self._received(module, a, delta))

    def _received(self, module, a, delta):
        if self.on_gradient is None:
            self.captured.append((a, delta))
        else:
            self.on_gradient(self.name, module, a, delta)

    def clear(self) -> None:
        self.captured.clear()
        self.calls = 0
        self._input = None


class Tap(torch.autograd.Function):
    """y ↦ y (the same values, a new autograd node on the anchor's path); backward: δ to `receive`, δ through."""

    @staticmethod
    def forward(ctx, output, anchor, receive):
        ctx.receive = receive
        return output.detach()  # shares storage and version counter with y: in-place changes stay checked

    @staticmethod
    def backward(ctx, delta):
        receive, ctx.receive = ctx.receive, None  # drop the closure (it holds a) once δ arrived
        receive(delta.detach())
        return delta, None, None


class Anchors:
    """One zero scalar per device that every hooked output is shifted by (see the module docstring)."""

    def __init__(self):
        self.by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self.by_device:
            self.by_device[device] = torch.zeros((), device=device, requires_grad=True)
        return self.by_device[device]


class Capture:
    """What `attribution_hooks` yields: the hooks by name, and `backward` that makes them fire."""

    def __init__(self, hooks: dict[str, CaptureHook], anchors: Anchors):
        self.hooks = hooks
        self.anchors = anchors

    def backward(self, output: torch.Tensor) -> None:
        """Run backward from the scalar `output`: each hooked module receives δ for every call since the
        last backward. Parameter gradients are not computed and `.grad` is left untouched."""
        anchors = list(self.anchors.by_device.values())
        if not anchors:
            raise RuntimeError("no hooked module ran with gradients enabled since the hooks were attached")
        torch.autograd.grad(output, anchors, allow_unused=True)
        self.anchors.by_device.clear()


@contextlib.contextmanager
def attribution_hooks(
    modules: dict[str, torch.nn.Module], on_gradient: OnGradient | None = None
) -> Iterator[Capture]:
    """Attach a `CaptureHook` to each module (name → module) for the duration of the block."""
    anchors = Anchors()
    hooks: dict[str, CaptureHook] = {}
    attached: list[tuple[torch.nn.Module, bool, bool]] = []
    try:
        for name, module in modules.items():
            had_registry = hasattr(module, "_diffusers_hook")
            had_forward = "forward" in module.__dict__
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if HOOK_NAME in registry.hooks:
                raise RuntimeError(f"attribution hooks are already attached to {name!r}")
            hooks[name] = CaptureHook(name, anchors, on_gradient)
            registry.register_hook(hooks[name], HOOK_NAME)
            attached.append((module, had_registry, had_forward))
        yield Capture(hooks, anchors)
    finally:
        for module, had_registry, had_forward in reversed(attached):
            registry = module._diffusers_hook
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:
                # remove_hook leaves the bound method as an instance attribute: drop it, and the registry
                if not had_forward:
                    module.__dict__.pop("forward", None)
                if not had_registry:
                    del module._diffusers_hook
        for hook in hooks.values():
            hook.clear()
        anchors.by_device.clear()
