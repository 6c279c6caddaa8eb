"""Discriminator normalizations of the study, applied in place through torch.nn.utils.parametrize.

After `normalize(D, variant)`, each normalized layer's `layer.weight` is the normalized weight and
`layer.parametrizations.weight.original` the raw one (weight_norm: `original0` = g and `original1` = v, as
torch names them).

The paper's facts implemented here (Lin, Sekar, Fanti, arXiv:2009.02773; official code fjxmlzn/BSN, gan/sn.py
and gan/op.py), to check against DESIGN.md:

- `sn` (Miyato et al.): W / σ. A conv kernel (c_out, c_in, k, k) is reshaped to (c_out, c_in·k·k); a
  ConvTranspose2d kernel (c_in, c_out, k, k) is permuted to the same (c_out, c_in·k·k); a Linear weight is
  (out, in). One persistent u (buffer `u`, in the state_dict, with its partner `v`) per reshape. In the
  official order (gan/sn.py, gan/gan.py's spectral_norm_update_ops): each *training* forward runs
  `n_power_iterations` steps v = Wᵀu/‖Wᵀu‖, u = Wv/‖Wv‖ from the stored u and uses σ = uᵀWv without storing
  them; after each optimiser step of D, `advance_power_iterations(D)` stores the same steps taken on the new
  weights. In eval mode σ = uᵀWv from the stored vectors. u starts as a random unit vector with no warm-up
  iterations, as in the official code (PyTorch's stock spectral_norm runs 15 at registration).
- Gradient convention (`grad_through_power_iteration`): True (default) lets gradients flow through the power
  iteration, as the official code does (only the starting u is a constant; v, u and σ are functions of W).
  False treats u, v as constants, as PyTorch's stock spectral_norm: the gradient of W/σ with σ = uᵀWv, u, v
  detached. The forward values are identical; only the gradients differ (and agree once u has converged).
- `ssn`: c·W/σ, c = `scale` a constant (not learned), on every layer including the last linear one. The bias
  is never scaled.
- `bsn`: σ = (σ₁ + σ₂)/2, σ₁ from the (c_out, c_in·k·k) reshape and σ₂ from the (c_in, c_out·k·k) reshape,
  each with its own persistent u. Linear layers use plain SN. `bssn`: c times BSN.
- `strict_sn`: σ of the convolution operator itself, at the layer's real input size, stride, padding, dilation
  and groups: power iteration with conv2d and its adjoint conv_transpose2d (the reverse for ConvTranspose2d)
  on a persistent u of the input's shape (1, C, H, W). Optional c. Linear layers: plain SN times c. Needs
  `example_input`, from which each layer's input size is recorded with forward hooks.
- `sn_gamma_shared` / `sn_gamma_layer`: SN times a learned scalar γ (initialised to 1) that multiplies weight
  and bias (official same_gamma / diff_gamma code): one γ for the whole network / one per layer.
- Baselines of Kurach et al. (compare_gan): `weight_norm` (torch's parametrizations.weight_norm on every
  Conv2d, ConvTranspose2d and Linear; dim 0, dim 1 for ConvTranspose2d, i.e. per output channel),
  `layer_norm` and `batch_norm`: a GroupNorm(1, C) (normalises each sample over (C, H, W) with a per-channel
  affine, as tf.contrib.layers.layer_norm in compare_gan) or a BatchNorm2d(C) directly after every hidden
  Conv2d / ConvTranspose2d; the layer is replaced in its parent by nn.Sequential(conv, norm), so its name
  gains a `.0`. The output layer (the last Conv2d / ConvTranspose2d / Linear to run on `example_input`, else
  the last one registered) gets none; hidden Linear layers get none.
- `none`: the module is left unchanged.

The training loop must not synchronise with the host: the parametrizations do no `.item()` and no python
branching on tensor values. A forward never writes u or v, so every forward of one step (D on real and fake,
G's step through D, the WGAN-GP interpolates) sees the same σ, and a compiled forward only reads its
buffers. Parametrized modules cannot be pickled: save and load them through `state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from trainables.config import VARIANTS, check_scale

__all__ = [
    "VARIANTS", "advance_power_iterations", "conv_operator_sigma", "normalize", "power_iterations",
    "raw_weight", "record_input_shapes", "spectral_report", "weight_report",
]

LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)
Operator = Callable[[torch.Tensor], torch.Tensor]


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(‖x‖₂, eps) over all of its elements, any shape."""
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def _power_iteration(op: Operator, op_t: Operator, u: torch.Tensor, steps: int,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`steps` power-iteration steps on op_t∘op from u: returns (σ, u, v) with σ = ⟨u, op_t(v)⟩, steps >= 1.

    For a matrix M with u in its row space, op = Mᵀ· and op_t = M·: the official code's v = Mᵀu/‖Mᵀu‖,
    u = Mv/‖Mv‖, σ = uᵀMv."""
    for _ in range(steps):
        v = _unit(op(u), eps)
        op_t_v = op_t(v)
        u = _unit(op_t_v, eps)
    return (u * op_t_v).sum(), u, v


def _as_matrix(weight: torch.Tensor, row_dim: int) -> torch.Tensor:
    """The weight as a matrix whose rows index `row_dim`: (shape[row_dim], numel / shape[row_dim])."""
    return weight.movedim(row_dim, 0).flatten(1)


def _channel_dims(layer: nn.Module) -> tuple[int, int]:
    """(output-channel dim, input-channel dim) of the weight: ConvTranspose2d stores (c_in, c_out, k, k)."""
    return (1, 0) if isinstance(layer, nn.ConvTranspose2d) else (0, 1)


@dataclass(frozen=True)
class ConvGeometry:
    """A conv layer's linear operator (bias left out) at a fixed input shape (1, C, H, W)."""

    input_shape: tuple[int, int, int, int]
    transposed: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]  # ConvTranspose2d: the layer's; Conv2d: what its adjoint needs
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, layer: nn.Conv2d | nn.ConvTranspose2d, input_shape: torch.Size, name: str) -> ConvGeometry:
        """The geometry of `layer` (qualified name `name`, for errors) fed inputs of shape (B, C, H, W)."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: the conv operator is built for padding_mode='zeros' only, "
                             f"got {layer.padding_mode!r}")
        kernel = layer.kernel_size  # not layer.weight: reading it would run a training-mode power iteration
        padding = layer.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(layer.dilation, kernel, strict=True)]
            if any(total % 2 for total in totals):
                raise ValueError(f"layer {name!r}: padding='same' with an even kernel pads asymmetrically; "
                                 "give explicit padding to build its conv operator")
            padding = tuple(total // 2 for total in totals)
        shape = (1, *input_shape[1:])
        transposed = isinstance(layer, nn.ConvTranspose2d)
        if transposed:
            output_padding = tuple(layer.output_padding)
        else:
            # conv_transpose2d gives back the conv's input size only with this output padding.
            out = [(h + 2 * p - d * (k - 1) - 1) // s + 1 for h, p, d, k, s
                   in zip(shape[2:], padding, layer.dilation, kernel, layer.stride, strict=True)]
            output_padding = tuple(h - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                                   for h, o, s, p, d, k in zip(shape[2:], out, layer.stride, padding,
                                                               layer.dilation, kernel, strict=True))
        return cls(shape, transposed, tuple(layer.stride), tuple(padding), output_padding,
                   tuple(layer.dilation), layer.groups)

    def operators(self, weight: torch.Tensor) -> tuple[Operator, Operator]:
        """(A, Aᵀ) for this layer's weight: A maps (1, C, H, W) inputs to the layer's bias-free output."""

        def conv(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

        def conv_t(y: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(y, weight, None, self.stride, self.padding, self.output_padding,
                                      self.groups, self.dilation)

        return (conv_t, conv) if self.transposed else (conv, conv_t)


class SigmaEstimator(nn.Module):
    """Power-iteration estimate of one σ with persistent vectors u (buffer `u`) and v (buffer `v`)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def operators(self, weight: torch.Tensor) -> tuple[Operator, Operator]:
        raise NotImplementedError

    def forward(self, weight: torch.Tensor, n_power_iterations: int, grad_through: bool) -> torch.Tensor:
        """σ (0-d tensor) for the raw weight: a training forward takes n_power_iterations steps from the
        stored u (not stored: advance_power_iterations does that after the optimiser step); eval mode uses
        the stored u, v."""
        op, op_t = self.operators(weight)
        if not self.training:
            # Clones: `advance` updates the buffers in place, possibly before this graph's backward.
            return (self.u.clone() * op_t(self.v.clone())).sum()
        if grad_through:
            sigma, _, _ = _power_iteration(op, op_t, self.u.clone(), n_power_iterations, self.eps)
            return sigma
        with torch.no_grad():
            _, u, v = _power_iteration(*self.operators(weight.detach()), self.u, n_power_iterations, self.eps)
        return (u * op_t(v)).sum()

    @torch.no_grad()
    def advanced(self, weight: torch.Tensor, u: torch.Tensor,
                 n_power_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) after n_power_iterations steps from u on `weight`; pure, so a pack can vmap it."""
        _, u, v = _power_iteration(*self.operators(weight), u, n_power_iterations, self.eps)
        return u, v

    @torch.no_grad()
    def stored_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """σ = ⟨u, op_t(v)⟩ from the stored vectors: no update, no gradient."""
        _, op_t = self.operators(weight)
        return (self.u * op_t(self.v)).sum()


class ReshapeSigma(SigmaEstimator):
    """σ of the weight reshaped to (shape[row_dim], rest): u is (shape[row_dim],), v is (rest,)."""

    def __init__(self, weight: torch.Tensor, row_dim: int, eps: float) -> None:
        matrix = _as_matrix(weight.detach(), row_dim)
        u = _unit(torch.randn(matrix.shape[0], device=weight.device, dtype=weight.dtype), eps)
        super().__init__(u, _unit(matrix.mT @ u, eps), eps)
        self.row_dim = row_dim

    def operators(self, weight: torch.Tensor) -> tuple[Operator, Operator]:
        matrix = _as_matrix(weight, self.row_dim)
        return (lambda u: matrix.mT @ u), (lambda v: matrix @ v)


class ConvOperatorSigma(SigmaEstimator):
    """σ of the conv operator at its input size: u shaped as the input (1, C, H, W), v as the output."""

    def __init__(self, weight: torch.Tensor, geometry: ConvGeometry, eps: float) -> None:
        u = _unit(torch.randn(geometry.input_shape, device=weight.device, dtype=weight.dtype), eps)
        op, _ = geometry.operators(weight.detach())
        super().__init__(u, _unit(op(u), eps), eps)
        self.geometry = geometry

    def operators(self, weight: torch.Tensor) -> tuple[Operator, Operator]:
        return self.geometry.operators(weight)


class SpectralNormalization(nn.Module):
    """Parametrization weight ↦ scale · weight / σ, σ the mean of its estimators' σ (one, or two for BSN)."""

    def __init__(self, estimators: dict[str, SigmaEstimator], *, scale: float, n_power_iterations: int,
                 grad_through_power_iteration: bool, input_shape: torch.Size | None) -> None:
        super().__init__()
        self.estimators = nn.ModuleDict(estimators)  # keys: "out", "in" (reshapes), "conv" (strict operator)
        self.scale = scale
        self.n_power_iterations = n_power_iterations
        self.grad_through_power_iteration = grad_through_power_iteration
        self.input_shape = input_shape  # (B, C, H, W) seen on example_input, for spectral_report's sigma_conv
        self.conv_probe: torch.Tensor | None = None  # sigma_conv's last vector: a warm start, not state

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigmas = [estimator(weight, self.n_power_iterations, self.grad_through_power_iteration)
                  for estimator in self.estimators.values()]
        sigma = sigmas[0] if len(sigmas) == 1 else (sigmas[0] + sigmas[1]) / 2
        return weight * (self.scale / sigma)


class GammaScale(nn.Module):
    """Parametrization x ↦ γ·x with a learned scalar γ, which may be shared with other layers."""

    def __init__(self, gamma: nn.Parameter) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def normalize(module: nn.Module, variant: str, *, scale: float = 1.0, n_power_iterations: int = 1,
              grad_through_power_iteration: bool = True, example_input: torch.Tensor | None = None,
              eps: float = 1e-12) -> nn.Module:
    """Apply `variant` to every Conv2d / ConvTranspose2d / Linear of `module` in place; return it.

    scale: the paper's constant c, for ssn / bssn / strict_sn only (other variants need 1.0).
    n_power_iterations: power-iteration steps per training forward (SN family).
    grad_through_power_iteration: True as the official BSN code, False: u, v constants as PyTorch.
    example_input: a batch (B, C, H, W) for the whole module, e.g. zeros (1, 3, 32, 32) on its device; it is
        run once in eval mode without gradients to record each layer's input size (strict_sn needs it; with it
        spectral_report can give sigma_conv; layer_norm / batch_norm use its execution order).
    eps: lower bound of the norms the power iteration divides by.
    """
    _check_arguments(variant, scale, n_power_iterations, eps)
    if variant == "none":
        return module
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, LAYER_TYPES)}
    if not layers:
        raise ValueError(f"module: no Conv2d, ConvTranspose2d or Linear layer for variant {variant!r}")
    for name, layer in layers.items():
        if parametrize.is_parametrized(layer):
            raise ValueError(f"module: layer {name!r} is already parametrized; normalize a fresh module")
    if variant == "strict_sn" and example_input is None:
        raise ValueError("example_input: strict_sn needs each layer's input size; pass a batch for the whole "
                         "module, e.g. torch.zeros(1, 3, 32, 32)")
    input_shapes = record_input_shapes(module, example_input) if example_input is not None else {}

    if variant == "weight_norm":
        for layer in layers.values():
            torch.nn.utils.parametrizations.weight_norm(layer, dim=_channel_dims(layer)[0])
    elif variant in ("layer_norm", "batch_norm"):
        _insert_output_norms(module, layers, input_shapes, variant)
    else:
        device = next(iter(layers.values())).weight.device
        shared_gamma = nn.Parameter(torch.ones((), device=device)) if variant == "sn_gamma_shared" else None
        for name, layer in layers.items():
            _apply_spectral(layer, name, variant, scale=float(scale),
                            n_power_iterations=n_power_iterations,
                            grad_through_power_iteration=grad_through_power_iteration,
                            input_shape=input_shapes.get(layer), shared_gamma=shared_gamma, eps=eps)
    return module


def _check_arguments(variant: str, scale: float, n_power_iterations: int, eps: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; valid: {', '.join(VARIANTS)}")
    check_scale(variant, scale)
    if not (isinstance(n_power_iterations, int) and not isinstance(n_power_iterations, bool)
            and n_power_iterations >= 1):
        raise ValueError(f"n_power_iterations: must be an integer >= 1, got {n_power_iterations!r}")
    if not (_is_number(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_input_shapes(module: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, torch.Size]:
    """Each Conv2d / ConvTranspose2d / Linear's input shape on its first call, in execution order: one
    eval-mode forward of example_input (B, C, H, W) without gradients, which changes no state."""
    if not isinstance(example_input, torch.Tensor):
        raise ValueError("example_input: must be a tensor batch (B, C, H, W), "
                         f"got {type(example_input).__name__}")
    shapes: dict[nn.Module, torch.Size] = {}

    def record(layer: nn.Module, args: tuple) -> None:
        shapes.setdefault(layer, args[0].shape)

    layers = [layer for layer in module.modules() if isinstance(layer, LAYER_TYPES)]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    training = {sub: sub.training for sub in module.modules()}
    try:
        module.eval()  # eval: no batch-norm statistics change and no dropout draws
        with torch.no_grad():
            module(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for sub, mode in training.items():
            sub.training = mode
    return shapes


def _apply_spectral(layer: nn.Module, name: str, variant: str, *, scale: float, n_power_iterations: int,
                    grad_through_power_iteration: bool, input_shape: torch.Size | None,
                    shared_gamma: nn.Parameter | None, eps: float) -> None:
    weight = layer.weight
    out_dim, in_dim = _channel_dims(layer)
    is_conv = isinstance(layer, CONV_TYPES)
    if variant == "strict_sn" and is_conv:
        if input_shape is None:
            raise ValueError(f"example_input: layer {name!r} did not run on it, so strict_sn has no input "
                             "size for it")
        estimators = {"conv": ConvOperatorSigma(weight, ConvGeometry.of(layer, input_shape, name), eps)}
    elif variant in ("bsn", "bssn") and is_conv:
        estimators = {"out": ReshapeSigma(weight, out_dim, eps), "in": ReshapeSigma(weight, in_dim, eps)}
    else:
        estimators = {"out": ReshapeSigma(weight, out_dim, eps)}
    spectral = SpectralNormalization(estimators, scale=scale, n_power_iterations=n_power_iterations,
                                     grad_through_power_iteration=grad_through_power_iteration,
                                     input_shape=input_shape)
    # unsafe=True skips parametrize's consistency check, which would run one training-mode power iteration.
    parametrize.register_parametrization(layer, "weight", spectral, unsafe=True)
    if variant in ("sn_gamma_shared", "sn_gamma_layer"):
        gamma = nn.Parameter(torch.ones((), device=weight.device)) if shared_gamma is None else shared_gamma
        parametrize.register_parametrization(layer, "weight", GammaScale(gamma), unsafe=True)
        if layer.bias is not None:
            parametrize.register_parametrization(layer, "bias", GammaScale(gamma), unsafe=True)


def _insert_output_norms(module: nn.Module, layers: dict[str, nn.Module],
                         input_shapes: dict[nn.Module, torch.Size], variant: str) -> None:
    """Replace every hidden conv by nn.Sequential(conv, norm); the output layer stays as it is."""
    output_layer = next(reversed(input_shapes)) if input_shapes else list(layers.values())[-1]
    for name, layer in layers.items():
        if layer is output_layer or not isinstance(layer, CONV_TYPES):
            continue
        channels = layer.out_channels
        norm = nn.GroupNorm(1, channels) if variant == "layer_norm" else nn.BatchNorm2d(channels)
        norm.to(device=layer.weight.device, dtype=layer.weight.dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, nn.Sequential(layer, norm))


def _spectral_parts(layer: nn.Module) -> tuple[SpectralNormalization | None, GammaScale | None]:
    if not parametrize.is_parametrized(layer, "weight"):
        return None, None
    chain = list(layer.parametrizations.weight)
    spectral = next((p for p in chain if isinstance(p, SpectralNormalization)), None)
    gamma = next((p for p in chain if isinstance(p, GammaScale)), None)
    return spectral, gamma


def _exact_sigma(weight: torch.Tensor, row_dim: int) -> torch.Tensor:
    """σ of the reshape as √λ_max of its smaller Gram matrix: ~10x faster than an SVD, ~1e-6 relative."""
    matrix = _as_matrix(weight, row_dim).float()
    gram = matrix @ matrix.mT if matrix.shape[0] <= matrix.shape[1] else matrix.mT @ matrix
    if not torch.isfinite(gram).all():  # a diverged weight: report NaN rather than fail the eigensolver
        return torch.full((), float("nan"), device=gram.device)
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


@torch.no_grad()
def spectral_report(module: nn.Module, *, conv_operator: bool = False) -> dict[str, dict[str, float]]:
    """For every SN-family layer (key: its qualified name, e.g. 'main.0'; other variants have none):

    - 'sigma': the σ from the stored vectors (uᵀWv; for BSN the mean of both) at the current raw weight: after
      a D update, that of the power-iteration step taken on the new weight (the next forward takes one more).
    - 'sigma_out' / 'sigma_in': σ₁ of the (c_out, c_in·k·k) / σ₂ of the (c_in, c_out·k·k) reshape of the raw
      weight: from the stored vectors where the variant tracks that reshape (sn: out; bsn: both), otherwise
      exact (an eigendecomposition of the smaller Gram matrix per such conv layer). For a Linear layer both
      are its σ.
    - 'scale': the constant c (1.0 where the variant has none); 'gamma': the learned γ (gamma variants only).
    - conv_operator=True adds 'sigma_conv': σ of the raw weight's conv operator at the input size recorded by
      normalize(example_input=...), by power iteration to convergence (relative change < 1e-6); for a Linear
      layer its exact σ. The layer's effective Lipschitz constant is scale · gamma · sigma_conv / sigma.

    Changes no state and draws from no global random generator; without conv_operator its cost is one
    matrix-vector product (or batch-1 conv) per stored vector plus the eigendecompositions above, and one host
    sync.
    """
    entries: dict[str, dict[str, torch.Tensor | float]] = {}
    for name, layer in module.named_modules():
        spectral, gamma = _spectral_parts(layer)
        if spectral is None:
            continue
        weight = layer.parametrizations.weight.original
        out_dim, in_dim = _channel_dims(layer)
        stored = {key: estimator.stored_sigma(weight) for key, estimator in spectral.estimators.items()}
        entry: dict[str, torch.Tensor | float] = {"sigma": torch.stack(list(stored.values())).mean()}
        if isinstance(layer, nn.Linear):
            entry["sigma_out"] = entry["sigma_in"] = stored["out"]
        else:
            entry["sigma_out"] = stored["out"] if "out" in stored else _exact_sigma(weight, out_dim)
            entry["sigma_in"] = stored["in"] if "in" in stored else _exact_sigma(weight, in_dim)
        entry["scale"] = spectral.scale
        if gamma is not None:
            entry["gamma"] = gamma.gamma
        if conv_operator:
            entry["sigma_conv"] = _conv_operator_sigma(layer, name, spectral, weight)
        entries[name] = entry
    tensors = [value for entry in entries.values() for value in entry.values()
               if isinstance(value, torch.Tensor)]
    floats = iter(torch.stack([t.reshape(()).float() for t in tensors]).tolist() if tensors else [])
    return {name: {key: value if isinstance(value, float) else next(floats) for key, value in entry.items()}
            for name, entry in entries.items()}


def raw_weight(layer: nn.Module) -> torch.Tensor:
    """The tensor of the weight's shape that the optimiser steps: the SN family's `original`, weight_norm's
    direction v (`original1`), else the weight itself."""
    if not parametrize.is_parametrized(layer, "weight"):
        return layer.weight
    originals = layer.parametrizations.weight
    return originals.original1 if hasattr(originals, "original1") else originals.original


@torch.no_grad()
def weight_report(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The paper's theory of every Conv2d / ConvTranspose2d / Linear of `module`, any variant (key: its name):

    - 'sigma_raw': σ of the raw weight (`raw_weight`) as the (c_out, c_in·k·k) matrix, exact;
    - 'sigma_eff': σ of the effective weight (what the layer multiplies by: c·γ·W/σ for the SN family, the
      weight itself for `none`), the same reshape, exact;
    - 'weight_std': the standard deviation of the effective weight's entries;
    - 'weight_std_pred': the std the paper predicts for a normalized layer. A matrix of m × n i.i.d. entries
      of std s has σ ≈ s(√m + √n), so W/σ has entries of std 1/(√fan_out + √fan_in), fan_out = c_out and
      fan_in = c_in·k·k (LeCun-like, Lin et al. 2021; stated so in DESIGN.md). BSN divides by the mean of
      both reshapes' σ: 1/((√c_out + √(c_in·k·k) + √c_in + √(c_out·k·k))/2), symmetric in c_in and c_out
      (Xavier-like); c and γ multiply it (c as Kaiming's gain). For strict_sn and the variants that are no SN
      it is SN's value for the layer's shape: the reference strict SN falls below and `none` drifts from.

    Effective weights are the ones the module's next forward uses (reading them stores nothing). Values
    are 0-d tensors on the module's device (NaN for a non-finite weight); reading them syncs the host once.
    Cost per layer: one eigendecomposition of the raw weight's smaller Gram matrix (a second one for
    weight_norm, whose effective weight is no multiple of the raw one).
    """
    report: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LAYER_TYPES):
            continue
        raw, effective = raw_weight(layer), layer.weight
        out_dim, in_dim = _channel_dims(layer)
        spectral, gamma = _spectral_parts(layer)
        sigma_raw = _exact_sigma(raw, out_dim)
        if effective is raw:
            sigma_eff = sigma_raw
        elif spectral is not None:  # c·γ·W/σ: a multiple of the raw weight
            sigma_eff = sigma_raw * (torch.linalg.vector_norm(effective.float())
                                     / torch.linalg.vector_norm(raw.float()))
        else:
            sigma_eff = _exact_sigma(effective, out_dim)
        report[name] = {"sigma_raw": sigma_raw, "sigma_eff": sigma_eff,
                        "weight_std": effective.float().std(),
                        "weight_std_pred": _predicted_std(layer, spectral, gamma, out_dim, in_dim)}
    return report


def _predicted_std(layer: nn.Module, spectral: SpectralNormalization | None, gamma: GammaScale | None,
                   out_dim: int, in_dim: int) -> torch.Tensor:
    """weight_report's 'weight_std_pred' of one layer (a 0-d tensor: γ is learned)."""
    shape = raw_weight(layer).shape

    def random_sigma(row_dim: int) -> float:  # σ / s of a random (shape[row_dim], rest) matrix
        rows = shape[row_dim]
        return math.sqrt(rows) + math.sqrt(math.prod(shape) / rows)

    denominator = random_sigma(out_dim)
    if spectral is not None and "in" in spectral.estimators:
        denominator = (denominator + random_sigma(in_dim)) / 2
    gain = torch.tensor(spectral.scale if spectral is not None else 1.0, device=layer.weight.device)
    if gamma is not None:
        gain = gain * gamma.gamma.detach().abs()
    return gain / denominator


def _conv_operator_sigma(layer: nn.Module, name: str, spectral: SpectralNormalization,
                         weight: torch.Tensor) -> torch.Tensor:
    """σ of an SN-family layer's conv operator at its recorded input size (strict_sn: from its own u).

    Each call starts from the previous call's vector (kept outside the state_dict, it never touches training),
    so the evaluations of a run after the first need a few steps instead of hundreds."""
    if isinstance(layer, nn.Linear):
        return _exact_sigma(weight, 0)
    eps = next(iter(spectral.estimators.values())).eps
    strict = spectral.estimators["conv"] if "conv" in spectral.estimators else None
    if strict is not None:
        return conv_operator_sigma(layer, name, strict.geometry.input_shape, weight, strict.u.clone(), eps)[0]
    if spectral.input_shape is None:
        raise ValueError(f"spectral_report(conv_operator=True): no input size recorded for layer {name!r}; "
                         "pass example_input to normalize()")
    sigma, spectral.conv_probe = conv_operator_sigma(layer, name, spectral.input_shape, weight,
                                                     spectral.conv_probe, eps)
    return sigma


@torch.no_grad()
def conv_operator_sigma(layer: nn.Conv2d | nn.ConvTranspose2d, name: str, input_shape: torch.Size,
                        weight: torch.Tensor, start: torch.Tensor | None = None, eps: float = 1e-12, *,
                        rtol: float = 1e-4, max_steps: int = 2000,
                        check_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, last vector) of `weight` as the conv operator of `layer` (qualified name `name`, for errors) on
    inputs of shape input_shape (B, C, H, W), bias left out: power iteration until σ changes by less than
    rtol over check_every steps. start: a vector of shape (1, C, H, W) to start from (the previous call's,
    a warm start), else a seeded random one: the call draws from no global random generator."""
    geometry = ConvGeometry.of(layer, input_shape, name)
    if start is None:
        generator = torch.Generator(device=weight.device).manual_seed(0)
        start = _unit(torch.randn(geometry.input_shape, generator=generator, device=weight.device,
                                  dtype=weight.dtype), eps)
    op, op_t = geometry.operators(weight)
    u, previous = start, 0.0
    for _ in range(max_steps // check_every):
        sigma, u, _ = _power_iteration(op, op_t, u, check_every, eps)
        current = float(sigma)
        if abs(current - previous) <= rtol * abs(current):
            break
        previous = current
    return sigma, u


@dataclass(frozen=True)
class PowerIteration:
    """One SN-family estimator of `module`: the qualified names of its raw weight and of itself (its buffers
    are `<name>.u`, `<name>.v`), and the steps it takes per update."""

    weight: str
    name: str
    estimator: SigmaEstimator
    steps: int


def power_iterations(module: nn.Module) -> list[PowerIteration]:
    names = {id(sub): name for name, sub in module.named_modules()}
    found = []
    for name, layer in module.named_modules():
        spectral, _ = _spectral_parts(layer)
        if spectral is None:
            continue
        weight = f"{name}.parametrizations.weight.original".removeprefix(".")
        found += [PowerIteration(weight, names[id(estimator)], estimator, spectral.n_power_iterations)
                  for estimator in spectral.estimators.values()]
    return found


@torch.no_grad()
def advance_power_iterations(module: nn.Module) -> None:
    """After an optimiser step: every SN-family estimator's stored u, v take their steps on the new raw
    weight (the official code's spectral_norm_update_ops, run after each D update)."""
    for item in power_iterations(module):
        u, v = item.estimator.advanced(module.get_parameter(item.weight), item.estimator.u, item.steps)
        item.estimator.u.copy_(u)
        item.estimator.v.copy_(v)
