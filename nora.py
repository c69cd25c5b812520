"""
NoRA: Nonlinear Rational Adapter, in one file.

"Don't Forget the Nonlinearity: Unlocking Activation Functions in Efficient Fine-Tuning"
(arXiv 2509.13240). LoRA adapts the weights of a frozen pretrained network; NoRA adapts its
activations. Each fixed activation (GELU in a ViT's MLP) becomes a group-wise rational function
P(x)/Q(x) that starts equal to it, and only a low-rank update of the rational's coefficients
trains (plus the task head). NoRA++ adds LoRA on the weights.

Part one is the method; read it top to bottom, each section building on the last:
  1. The rational function P(x)/Q(x)                paper Eqs. 1, 5, 6
  2. Fitting its coefficients to GELU (and others)    paper Eqs. 31, 33 (App. B)
  3. GroupRational: learnable coefficients            paper Sec. 3 (after Group-KAN)
  4. NoRA: a low-rank update of the coefficients      paper Eqs. 7, 8
  5. LoRA, for NoRA++                                  paper Eqs. 2, 3
  6. Putting adapters on a model
The appendices hold the machinery: how it is made fast, how it finds its way onto other
people's models, checks and files, and what the scripts build on:
  A. Kernels and speed
  B. Reading other people's models
  C. Checks, files and the fit's optimiser
  D. Drawing what NoRA learned
  E. The baselines of the paper's tables (DoRA, QLoRA, VPT, adapters, other activations)
  F. A small ViT with timm's names, and its weights (what train_vit.py fine-tunes)
"""
import hashlib
import json
import math
import numbers
import os
import struct
import sys
import urllib.error
import urllib.parse
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# Part one: the method
# =============================================================================

# -----------------------------------------------------------------------------
# 1. The rational function (Eqs. 1, 5, 6)
#
# A rational activation is phi(x) = P(x) / Q(x) (Eq. 1). A plain polynomial Q has roots, so phi
# has poles; Eq. 6 makes it safe with the denominator Q(x) = 1 + |b_0 + b_1 x + ... + b_n x^n|,
# which is >= 1. Like Group-KAN and the released code we use degrees (m, n) = (5, 4) and leave
# out b_0, so Q(x) = 1 + |S(x)| with S(x) = b_1 x + ... + b_n x^n and Q(0) = 1.
#
# "Group-wise": the C channels (the last dimension, or `dim`: 1 for an (N, C, H, W) feature map)
# are cut into G contiguous groups that each share one rational, so the coefficients are two
# matrices, whatever the size of x: `numerator` (G, m+1) holds a_0 .. a_m of each group and
# `denominator` (G, n) holds b_1 .. b_n. In this file those two names always mean coefficient
# matrices, never the values P(x), Q(x).
#
# `rational_reference` is Eq. 6 as written, autograd doing the rest. `rational` computes the same
# function (the tests check it against the reference, gradients included) with kernels that keep
# only x for backward (Appendix A), and is what every module below calls.
# -----------------------------------------------------------------------------

def rational_reference(x, numerator, denominator):
    """Eq. 6 as written: sum_i a_i x^i / (1 + |sum_j b_j x^j|) per group, over the last dimension.
    Slow and memory-hungry, but plainly right: the tests check `rational` against it."""
    xg = x.reshape(*x.shape[:-1], numerator.shape[0], -1)                     # (..., G, C/G)
    P = sum(numerator[:, i, None] * xg ** i for i in range(numerator.shape[1]))
    S = sum(denominator[:, j, None] * xg ** (j + 1) for j in range(denominator.shape[1]))
    return (P / (1 + S.abs())).reshape(x.shape)


def rational(x, numerator, denominator, dim=-1):
    r"""Group-wise safe rational function of Eq. 6, applied along the channel dimension ``dim`` of ``x``.

    .. math::
        \phi_g(x) = \frac{a_{g,0} + a_{g,1} x + \dots + a_{g,m} x^m}
                         {1 + |b_{g,1} x + \dots + b_{g,n} x^n|}

    Args:
        x: tensor of any shape whose dimension ``dim`` (the last, by default; 1 for an (N, C, H, W)
            feature map) has C channels; C must be divisible by G.
        numerator: (G, m+1) coefficients a_0 .. a_m of each group.
        denominator: (G, n) coefficients b_1 .. b_n of each group.
        dim: the channel dimension, which is cut into G contiguous groups.

    Half-precision inputs are computed in float32 (x^5 overflows float16 for |x| > 9.2) and the
    result is cast back, so it is safe to call under autocast. Beyond |x| ~ 5e7 (float32) the
    powers overflow and the result is inf or NaN; a fitted rational means nothing that far out.
    """
    _check_rational_inputs(x, numerator, denominator, dim)
    C = x.shape[dim]
    if x.numel() == 0:
        return x.clone()
    x = x.movedim(dim, -1)                                # the kernels take channels last
    dtype = torch.promote_types(x.dtype, torch.float32)   # the kernels compute in this, return x's dtype
    numerator, denominator = numerator.to(dtype), denominator.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if torch.jit.is_tracing():                        # torch.jit.trace, torch.onnx.export: plain Eq. 6 in the graph
            return rational_reference(x.to(dtype), numerator, denominator).to(x.dtype).movedim(-1, dim)
        y = _RationalFunction.apply(x.reshape(-1, C), numerator, denominator)
    return y.view(x.shape).movedim(-1, dim)

# -----------------------------------------------------------------------------
# 2. Fitting the coefficients (Eqs. 31, 33 of the paper's Appendix B, on why rationals approximate)
#
# Rationals approximate smooth activations fast (Eq. 33), but only on a bounded range K with no
# pole (Eq. 31). Our Q >= 1 has no pole, so the question is where to be accurate: where the
# pretrained model's pre-activations are, or swapping GELU for its rational changes the model.
# A (5, 4) rational grows linearly at both ends, so it cannot follow GELU's flat left tail far
# out, and it cannot be close everywhere at once. A pretrained ViT's GELU inputs lie mostly near
# 0 with a long negative tail, so the fit weights each point by `preactivation_weight`.
#
# Fitting P/(1+|S|) to f is nonlinear least squares, so it needs a good start. The
# Sanathanan-Koerner iteration gives one from a sequence of linear problems: with weights
# w = 1/Q_prev, solve
#       min || w (P(x) - f(x) S(x) - f(x)) ||      (since f = P/(1+S)  <=>  P - f S = f)
# and repeat, each row also times sqrt(weight(x)) for the weighted fit. That fits P/(1+S), not
# the module's P/(1+|S|): the two agree only where S >= 0, as it happens to be for GELU, SiLU and
# ReLU, but not for Hardswish (max |error| 13.9 on [-8, 8] as P/(1+|S|)). So the fit then
# minimises the true form's weighted error directly (Levenberg-Marquardt, Appendix C), from that
# start and from the same start with each b_j made positive, and keeps the better: the
# minimisation has several minima (for ReLU6 the second start halves the error).
# Deterministic: float64, fixed grid.
# -----------------------------------------------------------------------------

def preactivation_weight(x):
    """Where a pretrained ViT's GELU inputs lie, roughly: a normal density of sd 1.5 around 0 (a real
    ViT-S's fc1 outputs have sd 1.2 and a long negative tail), plus a floor of 1e-3 that keeps the
    fit close on the whole range."""
    return torch.exp(-0.5 * (x / 1.5) ** 2) + 1e-3


def fit_rational(fn, num_degree=5, den_degree=4, x_range=(-12.0, 12.0), weight=preactivation_weight,
                 points=4001, iters=30, warn_above=0.01):
    """Weighted least-squares fit of Eq. 6's P(x)/(1+|S(x)|) to ``fn`` on ``x_range``: it minimises
    the sum of weight(x) (P/Q - fn)^2 over a grid (``weight=None``: unweighted). Warns where the fit
    is off by more than ``warn_above`` times max |fn| somewhere on the range (see fit_error).

    Returns (numerator (num_degree+1,), denominator (den_degree,)) as float64 tensors.
    """
    if num_degree < 1 or den_degree < 2 or iters < 1 or points < num_degree + den_degree + 1:
        raise ValueError(f"fit_rational: need num_degree >= 1, den_degree >= 2, iters >= 1 and more points than "
                         f"coefficients; got {num_degree}, {den_degree}, {iters}, {points}")
    if not (len(x_range) == 2 and x_range[0] < x_range[1]):
        raise ValueError(f"fit_rational: x_range must be (low, high) with low < high, got {x_range}")
    x = torch.linspace(*x_range, points, dtype=torch.float64)
    f = fn(x)
    if not torch.isfinite(f).all():
        raise ValueError(f"fit_rational: the function is not finite everywhere on {x_range}; "
                         f"fit on a range where it is")
    V = x[:, None] ** torch.arange(num_degree + 1)       # columns x^0 .. x^m
    W = x[:, None] ** torch.arange(1, den_degree + 1)    # columns x^1 .. x^n
    root_weight = torch.ones_like(x) if weight is None else weight(x).sqrt()
    w = root_weight
    for _ in range(iters):                               # the start: P / (1 + S), linearised
        A = torch.cat([V, -f[:, None] * W], dim=1) * w[:, None]
        coeffs = torch.linalg.lstsq(A, (f * w)[:, None], driver="gelsd").solution[:, 0]
        w = root_weight / (1 + (W @ coeffs[num_degree + 1:]).abs())
    m = num_degree + 1                                   # the fit: P / (1 + |S|) itself, from two starts
    starts = [coeffs, torch.cat([coeffs[:m], coeffs[m:].abs()])]
    coeffs = min((_least_squares(c, V, W, f, root_weight) for c in starts), key=lambda fit: fit[1])[0]
    numerator, denominator = coeffs[:m], coeffs[m:]
    error, at = fit_error(fn, numerator, denominator, x_range)
    if error > warn_above * f.abs().max():
        warnings.warn(f"fit_rational: the best ({num_degree}, {den_degree}) rational on {tuple(x_range)} is off by "
                      f"{error:.3g} at x = {at:.3g}; a kink or a flat end is hard for a rational. Fit a narrower "
                      f"range where the inputs are, or pass warn_above= to accept it")
    return numerator, denominator


def fit_error(fn, numerator, denominator, x_range=(-8.0, 8.0), points=16001):
    """(max |P/Q - fn|, the x where it is) on ``x_range``, for 1-D coefficients."""
    x = torch.linspace(*x_range, points, dtype=torch.float64, device="cpu")   # cpu even under torch.device("meta")
    num, den = (torch.as_tensor(c, dtype=torch.float64, device="cpu")[None] for c in (numerator, denominator))
    error = (rational_reference(x[:, None], num, den)[:, 0] - fn(x)).abs()
    return error.max().item(), x[error.argmax()].item()


# fit_rational's defaults (fit_gelu.py --all prints them). Max |error| on [-8, 8]: GELU 0.017
# (0.0020 at 0), SiLU 0.0046, ReLU 0.178 (at x = +-7.3; 0.064 at the kink). Off [-12, 12]
# they drift linearly, e.g. GELU(-20) -> -1.2. Do not use Group-KAN's published GELU numbers:
# they were fitted on [-3, 3] and are off by 6 on [-6, 6].
GELU_COEFFS = (
    [-1.9581024005e-03, 5.0000000000e-01, 4.1280440400e-01, 1.1787385525e-01, 1.3576554653e-02, 5.3579958140e-04],
    [-5.7769714733e-13, 2.3574771050e-01, -6.6735518237e-14, 1.0715991628e-03],
)
GELU_TANH_COEFFS = (                                      # GPT-2's and timm's GELU(approximate="tanh")
    [-1.9118334544e-03, 5.0000000000e-01, 4.1233711407e-01, 1.1744175458e-01, 1.3483379564e-02, 5.3046888020e-04],
    [-3.1581754702e-13, 2.3488350916e-01, -4.0676499504e-14, 1.0609377604e-03],
)
SILU_COEFFS = (
    [3.0907434080e-04, 5.0000000000e-01, 2.4894265722e-01, 4.9808736545e-02, 4.5632829158e-03, 1.5607795612e-04],
    [-1.6119014693e-11, 9.9617473097e-02, -1.0805335373e-12, 3.1215591230e-04],
)
RELU_COEFFS = (
    [6.4432631350e-02, 4.9999999907e-01, 8.6373012189e-01, 5.0834649223e-01, 1.0824825755e-01, 6.5449029851e-03],
    [-4.7616360546e-09, 1.0166929879e+00, -8.0910068715e-10, 1.3089806022e-02],
)
COEFFS = {"gelu": GELU_COEFFS, "gelu_tanh": GELU_TANH_COEFFS, "silu": SILU_COEFFS, "swish": SILU_COEFFS,
          "relu": RELU_COEFFS}
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}

# -----------------------------------------------------------------------------
# 3. GroupRational: a learnable group-wise rational activation (Sec. 3)
#
# One rational per channel is expensive and one for the whole layer is too rigid; following
# Group-KAN, all channels of a group share one rational. This is the "rational tuning" baseline
# of Table 4: every coefficient is a free parameter, G (m+1+n) of them per layer.
# -----------------------------------------------------------------------------

class GroupRational(nn.Module):
    """Group-wise rational activation with learnable coefficients.

    Args:
        groups: number of contiguous channel groups G (must divide the channel count).
        init: a name in ``COEFFS`` ('gelu', 'gelu_tanh', 'silu', 'relu') or a (numerator,
            denominator) pair of 1-D tensors (shared by all groups) or 2-D (G, .) tensors.
        channel_dim: the input dimension that holds the channels (1 for an (N, C, H, W) map).
    """

    def __init__(self, groups=8, init="gelu", channel_dim=-1):
        super().__init__()
        num, den = _init_coefficients(init, groups)
        self.numerator = nn.Parameter(num)
        self.denominator = nn.Parameter(den)
        self.channel_dim = channel_dim

    def forward(self, x):
        return rational(x, self.numerator, self.denominator, dim=self.channel_dim)

    def extra_repr(self):
        return f"groups={self.numerator.shape[0]}, degrees=({self.numerator.shape[1] - 1}, {self.denominator.shape[1]})"


# -----------------------------------------------------------------------------
# 4. NoRA: low-rank updates of the rational coefficients (Eqs. 7, 8)
#
# LoRA changes what a frozen layer's weights compute; NoRA changes the nonlinearity between them.
# Every MLP of a ViT applies GELU to hundreds or thousands of channels, so reshaping that curve
# per group of channels (steeper here, a different knee there) changes what every block computes,
# for a few dozen numbers per layer.
#
# NoRA freezes the base coefficients P_g, Q_g of each group (the GELU fit of section 2) and learns
# a low-rank perturbation of each (Eq. 7):
#       phi'(x) = (P + dP)(x) / (Q + dQ)(x)
# With Eq. 6's safe denominator we add dQ to Q's coefficients inside the |.| (b -> b + db), so
# Q stays >= 1 however training moves them. The update of the G x (m+1) numerator matrix is
#       dP = B_P @ A_P * alpha / r,   A_P in R^{r x (m+1)} shared by all groups,  B_P in R^{G x r}
# and dQ likewise with A_Q in R^{r x n}: the groups move along r shared directions in coefficient
# space ("shared" form, the released code's; our default). That is r (m+1+n) + 2 G r numbers per
# layer: 52 at G = 8, r = 2, against 80 for tuning the coefficients directly (GroupRational), and
# more groups cost only 2 r numbers each. The paper's Eq. 8 instead gives each group its own
# A_g in R^{d x r} and B_g in R^{r x 1}, a free d-vector per group ("per_group" form: 192 numbers
# at G = 8, r = 2). As in LoRA, A starts as small noise (Sec. 3: A ~ N(0, 0.02)) and B at zero,
# so at step 0 phi' is exactly the base rational: training starts from the pretrained model with
# each GELU replaced by its fit.
# One departure from the paper, the basis (x/s)^i in which the update is learned, is explained
# after the class.
# -----------------------------------------------------------------------------

class NoRA(nn.Module):
    """Rational activation with frozen base coefficients and a trainable low-rank update.

    Args:
        groups: number of channel groups G.
        rank: rank r of the update.
        alpha: scale; the update is multiplied by alpha / rank (default alpha = 2 * rank,
            the released code's alpha = 6 at r = 3).
        init: base coefficients, as for :class:`GroupRational`.
        form: 'shared' (released code, dP = B @ A with A shared by all groups) or
            'per_group' (paper text, dP_g = A_g B_g, free in each group).
        basis_scale: s; the update is learned in the basis (x/s)^i (default 3, our departure; 1 is the
            paper's monomials: pass it with A and B taken from the paper's setup).
        channel_dim: the input dimension that holds the channels: -1 (default), or 1 for an (N, C, H, W)
            feature map; :func:`add_nora` sets it for each module. None: the last, but inputs of 4
            or more dimensions are refused, since their channel axis cannot be told from the shape.
    """

    def __init__(self, groups=8, rank=2, alpha=None, init="gelu", form="shared", basis_scale=3.0, channel_dim=-1):
        super().__init__()
        _check_arguments(form, rank, alpha, basis_scale)
        num, den = _init_coefficients(init, groups)
        groups, rank = num.shape[0], int(rank)
        self.register_buffer("numerator", num)            # frozen base coefficients P_g, Q_g
        self.register_buffer("denominator", den)
        self.rank, self.form = rank, form
        self.scaling = (alpha if alpha is not None else 2 * rank) / rank
        self.basis_scale, self.channel_dim = float(basis_scale), channel_dim
        self.where = "NoRA"                               # add_nora puts the module's path here, for errors
        self.function = init if isinstance(init, str) and init in ACTIVATIONS else None   # what it replaced
        A_shape = (lambda d: (rank, d)) if form == "shared" else (lambda d: (groups, d, rank))
        self.A_P = nn.Parameter(torch.randn(A_shape(num.shape[1])) * 0.02)    # numerator update (Eq. 8, A shared)
        self.B_P = nn.Parameter(torch.zeros(groups, rank))
        self.A_Q = nn.Parameter(torch.randn(A_shape(den.shape[1])) * 0.02)    # denominator update
        self.B_Q = nn.Parameter(torch.zeros(groups, rank))

    def _delta(self, A, B, first_power):
        """The update B A * alpha / r (Eq. 8; A shared by the groups in the shared form) in the basis (x/s)^i:
        its column for x^i is divided by s^i."""
        dtype = torch.promote_types(A.dtype, torch.float32)              # float32 at least, float64 stays
        A, B = A.to(dtype), B.to(dtype)
        if self.form == "shared":
            delta = B @ A                                                 # (G, r) @ (r, d)
        else:
            delta = torch.einsum("gdr,gr->gd", A, B)                      # A_g (d, r) @ B_g (r,)
        powers = torch.arange(first_power, first_power + delta.shape[1], device=delta.device)
        return delta * self.scaling * self.basis_scale ** -powers

    def coefficients(self):
        """The adapted coefficients (P + dP, Q + dQ) of Eq. 7, each (G, .). At least float32, even under
        autocast: the gradient of each entry sums over all the activations of a group (millions),
        which can overflow float16."""
        with torch.autocast(self.A_P.device.type, enabled=False):
            return (self.numerator + self._delta(self.A_P, self.B_P, 0),
                    self.denominator + self._delta(self.A_Q, self.B_Q, 1))

    def forward(self, x):
        dim = self.channel_dim
        if dim is None and x.dim() >= 4:
            raise ValueError(f"{self.where}: cannot tell which axis of a {tuple(x.shape)} input holds the channels; "
                             f"pass channel_dim=1 (N, C, H, W) or channel_dim=-1 (channels last) to add_nora")
        try:
            return rational(x, *self.coefficients(), dim=-1 if dim is None else dim)
        except ValueError as e:
            raise ValueError(f"{self.where}: {e}") from None

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base coefficients, so inference costs one plain rational."""
        num, den = self.coefficients()
        if not (torch.isfinite(num).all() and torch.isfinite(den).all()):
            raise ValueError("NoRA.merge: the adapted coefficients contain NaN or inf; training diverged "
                             "(lower the learning rate or the NoRA alpha)")
        self.numerator.copy_(num)
        self.denominator.copy_(den)
        self.B_P.zero_()
        self.B_Q.zero_()

    @torch.no_grad()
    def grow(self, groups):
        """Split every group into groups / G copies of itself (paper Sec. 4.2), leaving the function unchanged.

        Channel c moves from group c // (C/G) to group c // (C/groups); each old group's run
        of channels becomes groups/G consecutive new groups, so every tensor indexed by group is
        repeated in place with repeat_interleave. The trainable tensors are replaced, so grow
        before building the optimizer.
        """
        old = self.numerator.shape[0]
        if not isinstance(groups, int) or groups < 1 or groups % old:
            raise ValueError(f"NoRA.grow: new group count {groups} must be a multiple of {old}")
        k = groups // old
        for name in ("numerator", "denominator"):
            setattr(self, name, getattr(self, name).repeat_interleave(k, 0))
        for name in ("A_P", "B_P", "A_Q", "B_Q"):
            p = getattr(self, name)
            if name.startswith("B") or self.form == "per_group":
                setattr(self, name, nn.Parameter(p.repeat_interleave(k, 0), requires_grad=p.requires_grad))

    # Settings that change the function but no tensor's shape (rank and form do change shapes),
    # saved in the state dict so that a mismatch is caught on load. A tensor, not a dict, because
    # safetensors, ONNX export and HF's save_pretrained accept nothing but tensors in a state dict.
    def get_extra_state(self):
        return torch.tensor([self.scaling, self.basis_scale], dtype=torch.float64)

    def set_extra_state(self, state):
        if isinstance(state, dict):                       # saved by an older nora.py
            state = torch.tensor([state["scaling"], state["basis_scale"]], dtype=torch.float64)
        _check_settings(self, "scaling, basis_scale", state, self.get_extra_state())

    def extra_repr(self):
        return (f"groups={self.numerator.shape[0]}, rank={self.rank}, scaling={self.scaling:g}, "
                f"form={self.form}, basis_scale={self.basis_scale:g}, channel_dim={self.channel_dim}")

# Why the update is learned in the basis (x/s)^i, s = 3 (our departure from the paper). `_delta`
# divides column i of B A by s^i, so NoRA learns
#       dP(x) = sum_i dp_i (x/s)^i,  i.e. da_i = dp_i / s^i    (and db_j = dq_j / s^j)
# the same family of functions (merge folds it into plain coefficients), but well conditioned.
# GELU's tails are set by tiny leading coefficients, phi(x) ~ (a_5 / |b_4|) x with a_5 = 5.3e-4
# and b_4 = 1.1e-3, yet over a real ViT's pre-activations the output is 290 times more sensitive
# to a_5 than to a_1. Adam moves every entry of A and B by about the same step, so every dp_i moves
# by about the same amount, and in monomials (da_i = dp_i) the first steps change a_5 and b_4 by
# more than their own size. Dividing dp_i by s^i evens that out: over the same inputs, the output's
# sensitivities to dp_0 .. dp_5 span 6.5x at s = 3 instead of 290x. `basis_scale=1` is the paper's
# form.

# -----------------------------------------------------------------------------
# 5. LoRA, for NoRA++ (Eqs. 2, 3)
#
# LoRA learns W = W0 + B A * alpha / r with A (r x k) random and B (d x r) zero (Eq. 2) and
# computes W0 x + B (A x) without forming B A (Eq. 3). timm fuses q, k and v into one `qkv`
# linear; LoRA on "q and v" (paper C.1) is then two updates on two ranges of rows of that one
# weight, so `row_ranges` lists the (start, stop) ranges of output rows to adapt, each with its
# own A and B. `fan_in_fan_out` (loralib's name) says the base stores its weight (in, out), as
# GPT-2's Conv1D does, rather than nn.Linear's (out, in).
# -----------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear ``base`` plus a LoRA update on all its output rows, or on the (start, stop)
    ranges of rows in ``row_ranges``. ``fan_in_fan_out``: the base's weight is (in, out) and it
    computes x @ weight (HF's Conv1D), not x @ weight.T."""

    def __init__(self, base, rank=8, alpha=16, row_ranges=None, fan_in_fan_out=False):
        super().__init__()
        rank, alpha = _positive_int(rank, "LoRALinear: rank"), _positive_number(alpha, "LoRALinear: alpha")
        w = base.weight
        out_features, in_features = w.T.shape if fan_in_fan_out else w.shape
        ranges = row_ranges or [(0, out_features)]
        width = ranges[0][1] - ranges[0][0]
        if any(stop - start != width for start, stop in ranges) or max(stop for _, stop in ranges) > out_features:
            raise ValueError(f"LoRALinear: row ranges {ranges} must have equal widths within {out_features} rows")
        self.base, self.rank, self.scaling, self.merged = base, rank, alpha / rank, False
        self.row_ranges, self.fan_in_fan_out = [(start, stop) for start, stop in ranges], fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(len(ranges), rank, in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(len(ranges), width, rank, device=w.device, dtype=w.dtype))
        for A in self.lora_A:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))     # as in microsoft/LoRA
        self.register_load_state_dict_post_hook(_after_lora_load)

    def delta_weight(self):
        """B A * alpha / r for each row range: (ranges, width, in_features)."""
        return self.lora_B @ self.lora_A * self.scaling

    def _add_to_rows(self, t, delta, dim):
        """``t`` with delta[i] added to the i-th range of rows along ``dim``, in place."""
        for (start, stop), d in zip(self.row_ranges, delta):
            t.narrow(dim, start, stop - start).add_(d)
        return t

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # one A (r, in) and B (rows, r) per row range; letters: g range, r rank, i input, o output row
        h = torch.einsum("...i,gri->g...r", x, self.lora_A)                # A x
        d = torch.einsum("g...r,gor->g...o", h, self.lora_B)               # B (A x)
        return self._add_to_rows(y, d * self.scaling, dim=-1)

    def _add_to_weight(self, w, delta):
        """``w``, in the base's layout ((out, in), or (in, out) if fan_in_fan_out), plus ``delta`` on its
        adapted rows, in place."""
        return self._add_to_rows(w, delta.mT if self.fan_in_fan_out else delta, dim=int(self.fan_in_fan_out))

    @property
    def weight(self):
        """The adapted weight W0 + B A * alpha / r, in the base's layout: for code that reads a layer's
        weight instead of calling it (nn.MultiheadAttention's out_proj, torchvision Swin's qkv)."""
        w = self.base.weight
        return w if self.merged else self._add_to_weight(w.clone(), self.delta_weight())

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    @torch.no_grad()
    def merge(self):
        if not isinstance(self.base.weight, nn.Parameter):   # e.g. a quantised weight rebuilt at each call
            raise TypeError(f"LoRALinear.merge: the base {type(self.base).__name__} has no stored weight to "
                            f"merge into (a quantised layer?); keep the model unmerged")
        if not self.merged:
            self.base.weight.copy_(self.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self._add_to_weight(self.base.weight, -self.delta_weight())
            self.merged = False

    # As NoRA's: the settings no shape shows, and whether the base weight holds B A (merged), so that a
    # state dict loads right into a merged or an unmerged layer (see _load_from_state_dict).
    def get_extra_state(self):
        return torch.tensor([self.scaling, self.fan_in_fan_out, self.merged, *(i for r in self.row_ranges for i in r)],
                            dtype=torch.float64)

    def set_extra_state(self, state):
        _check_settings(self, "scaling, fan_in_fan_out, row ranges", _lora_settings(state)[0],
                        _lora_settings(self.get_extra_state())[0])

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _load_lora(self, super()._load_from_state_dict, state_dict, prefix, *args)   # (Appendix B)

    def extra_repr(self):
        return (f"rank={self.rank}, scaling={self.scaling:g}, row_ranges={self.row_ranges}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))

# -----------------------------------------------------------------------------
# 6. Putting adapters on a model
#
# NoRA needs nothing from the model but its activation modules: `add_nora` swaps each one for a
# NoRA module and freezes everything else, so it works the same on our ViT, timm's, torchvision's
# or a Hugging Face model. Three things must be right, and none may depend on the user
# remembering them (Appendix B finds them from the model itself):
#   - which function each activation computes, so the base rational starts equal to it;
#   - which axis of its input holds the channels that the groups cut: the last one after a linear
#     layer, dim 1 in a convolutional stage's (N, C, H, W) maps;
#   - for LoRA, how each layer stores its weight: (out, in) for nn.Linear, (in, out) for Conv1D.
# Every check runs before the first module is replaced, so a refused call leaves the model as it
# was. The adapter file holds everything training changes: adapters, head, BatchNorm statistics.
# -----------------------------------------------------------------------------

ADAPTERS = (NoRA, LoRALinear)                             # what freeze() leaves trainable (LoRAWeight too)


def add_nora(model, groups=8, rank=2, target=("gelu", "gelu_tanh"), init=None, channel_dim="auto", example=None,
             per_module=None, **nora_kwargs):
    """Replace each activation module in ``model`` with a :class:`NoRA` module whose base rational
    equals it; then, if every parameter of the model was trainable, freeze all but the adapters
    (train the head with :func:`mark_trainable`). Every check runs before the first change.

    Args:
        target: names in ACTIVATIONS (every parameter-free module computing one of those functions,
            whatever its class), or activation classes. Default: both kinds of GELU.
        init: the base rational (a name in COEFFS or a fit_rational() pair); None: the fit of the
            function each module computes.
        channel_dim: the input axis that holds the channels; "auto": seen on ``example``, else read
            off the layers next to each activation, refused by name where neither tells.
        example: an input for ``model`` (a tensor, a tuple or a dict of arguments), run once in eval
            mode to see each activation's input: its channel axis and the widths ``groups`` must divide.
        per_module: {module path: dict(groups=..., channel_dim=...)} where one value cannot serve all.
        nora_kwargs: alpha, form, basis_scale (see NoRA).
    """
    groups = _positive_int(groups, "add_nora: groups")
    for path, own in (per_module or {}).items():
        if not isinstance(own, dict) or set(own) - {"groups", "channel_dim"}:
            raise ValueError(f"add_nora: per_module[{path!r}] must be a dict(groups=..., channel_dim=...), got {own!r}")
        if "groups" in own:
            _positive_int(own["groups"], f"add_nora: per_module[{path!r}]['groups']")
    found = _find_activations(model, target, init, groups, channel_dim, example, per_module or {})   # all checked
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"

    def make(m):
        path, function, dim, g = found[id(m)]
        module = NoRA(g, rank, init=init or function, channel_dim=dim, **nora_kwargs).to(device).train(m.training)
        module.where, module.function = path, function
        return module

    fresh = all(p.requires_grad for p in model.parameters())   # else the caller has chosen what trains
    replace_modules(model, lambda m: id(m) in found, make)     # builds all first: errors change nothing
    if fresh:
        freeze(model)
    _warn_if_far_at_init(found)
    return model


def add_lora(model, rank=8, alpha=16, targets=("qkv",), qkv_parts="qv", rows=None,
             fused_qkv=("qkv", "c_attn", "to_qkv", "qkv_proj", "query_key_value", "Wqkv"), layer=LoRALinear):
    """Put LoRA on each linear layer of ``model`` whose name is, or ends with ".", one of ``targets``
    (any module applying a 2-D ``weight`` linearly, stored (out, in) or (in, out) as in HF's Conv1D),
    and freeze the rest of a fresh model, as :func:`add_nora` does. A target named like one of
    ``fused_qkv`` is a fused q | k | v projection: where its layout is known to be equal thirds
    (Appendix B), only the ``qkv_parts`` rows are adapted (q and v, as in the paper's C.1); other
    layouts are refused unless ``rows`` gives them, {target: [(start, stop), ...]} of equal widths.
    A fused target also adapts every nn.MultiheadAttention's in_proj_weight through :class:`LoRAWeight`.
    ``layer``: the adapter class (LoRALinear or a subclass)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not qkv_parts or set(qkv_parts) - set("qkv"):
        raise ValueError(f"add_lora: qkv_parts={qkv_parts!r} must name some of 'q', 'k', 'v', e.g. 'qv'")
    linears = _find_linears(model, targets, fused_qkv, qkv_parts, rows or {})   # {id: (rows, fan_in_fan_out)}
    attention = _find_attention(model, targets, fused_qkv)                        # nn.MultiheadAttention modules
    if not linears and not attention:
        raise ValueError(f"add_lora: no linear layer named {' or '.join(targets)} in the model; {_linear_names(model)}")
    weights = [LoRAWeight(m.in_proj_weight, rank, alpha, _qkv_rows(len(m.in_proj_weight), qkv_parts))
               for m in attention]
    fresh = all(p.requires_grad for p in model.parameters())
    replace_modules(model, lambda m: id(m) in linears,                 # builds all first: errors change nothing
                    lambda m: layer(m, rank=rank, alpha=alpha, row_ranges=linears[id(m)][0],
                                    fan_in_fan_out=linears[id(m)][1]).train(m.training))
    for m, lora in zip(attention, weights):
        torch.nn.utils.parametrize.register_parametrization(m, "in_proj_weight", lora)
    if fresh:
        freeze(model)
    return model


def mark_trainable(model, *prefixes):
    """Make the parameters whose names start with any of ``prefixes`` trainable (e.g. 'head')."""
    prefixes = tuple(p for group in prefixes for p in ([group] if isinstance(group, str) else group))
    if not prefixes:
        raise ValueError("mark_trainable: name at least one parameter prefix, e.g. mark_trainable(model, 'head')")
    hits = [p.requires_grad_(True) for name, p in model.named_parameters() if name.startswith(prefixes)]
    if not hits:
        raise ValueError(f"mark_trainable: no parameter name starts with {prefixes}")
    return model


def merge(model):
    """Fold every NoRA and LoRA update into its base, in place: the outputs stay the same and
    inference costs what the base model costs (NoRA: one rational per activation)."""
    _remove_lora_parametrizations(model)                  # LoRAWeight: the weight keeps W0 + B A, plainly
    for m in model.modules():
        if isinstance(m, ADAPTERS):
            m.merge()
    return model


def adapter_state_dict(model, extra=("head",)):
    """All that a fine-tune changes in the pretrained model: every adapter's tensors and settings (by
    module type, so freezing the model first loses nothing), the parameters named ``extra*`` (the
    head) or still trainable, BatchNorm running statistics (training moves them though their
    weights are frozen), and the weights merge() folded a LoRAWeight into."""
    state = model.state_dict()
    keep = _adapter_keys(model) | _running_statistics(model) | _merged_weights(model)
    keep |= {name for name, p in model.named_parameters() if p.requires_grad or name.startswith(tuple(extra))}
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items() if k in keep}


def save_adapter(model, path, extra=("head",), metadata=None):
    """Write :func:`adapter_state_dict` to a .safetensors file, with each adapter's kind, module path
    and settings, from which :func:`load_adapter` rebuilds them on a plain model; through a temporary
    file, so a failed write leaves the old one whole. ``metadata``: more {str: str} to keep."""
    state = adapter_state_dict(model, extra)
    described = dict(adapters=_describe_adapters(model), other=sorted(set(state) - _adapter_keys(model)))
    write_safetensors(path, state, {**(metadata or {}), "nora": json.dumps(described)})
    return state


def load_adapter(model, source):
    """Load a :func:`save_adapter` file (a path) or an :func:`adapter_state_dict` (a dict) into ``model``,
    merged or not. A file's adapters are built where it says, so a plain model will do; a state dict
    needs the same add_nora / add_lora calls first. Checked before anything changes: settings,
    shapes, NaN, and that every tensor is an adapter's, the head's, a trained parameter's or a
    BatchNorm's statistics (a file cannot overwrite the frozen backbone)."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"load_adapter: no file at {source}; pass a file written by save_adapter")
    state, described = read_adapter(source) if isinstance(source, (str, os.PathLike)) else (source, None)
    plan = _plan_adapters(model, described, state) if described else []    # [(path, new)]: nothing built in yet
    _check_adapter_state(model, state, plan, described)
    for path, new in plan:                                # now build each adapter into the model
        _build_in(model, path, new)
    model.load_state_dict(state, strict=False)           # (LoRA loads right into merged layers too)
    for entry in (described or {}).get("adapters", []):   # a model that was saved merged is merged again
        if entry.get("merged"):
            model.get_submodule(entry["path"]).merge()
    return model


def param_groups(model, lr, head_lr=None, nora_lr=None, head=("head",)):
    """AdamW parameter groups: the trainable parameters whose names start with ``head`` at
    ``head_lr``, those of NoRA modules at ``nora_lr``, all other trainable ones (LoRA, ...) at
    ``lr`` (either left None: ``lr``). A fresh linear head wants a larger step than a low-rank
    update of a pretrained model, and NoRA's update in the (x/3)^i basis a larger one than
    LoRA's (train_vit.py's defaults: head 1e-2, NoRA 3e-2, LoRA 1e-3)."""
    own = _adapter_parameters(model, NoRA)
    groups = {"head": [], "nora": [], "rest": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups["head" if n.startswith(tuple(head)) else "nora" if id(p) in own else "rest"].append(p)
    lrs = {"head": head_lr, "nora": nora_lr, "rest": lr}
    return [dict(params=ps, lr=lr if lrs[k] is None else lrs[k]) for k, ps in groups.items() if ps]


def parameter_report(model):
    """'trainable T of N parameters (P%)', for logs."""
    trainable, total = count_parameters(model)
    if total == 0:
        raise ValueError("parameter_report: the model has no parameters")
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"

# =============================================================================
# Appendix A. Kernels and speed
#
# Nothing here changes a result. Autograd would keep every power of x for backward, so the
# kernels evaluate P and Q by Horner's rule, a0 + x(a1 + x(a2 + ...)), with a hand-written
# backward that keeps only x and recomputes. On a CPU they are fast because x is viewed as (N, C)
# with each group's coefficients repeated to one row per channel, (k, C), so every broadcast and
# sum runs along contiguous memory, and because they work in place (a pass over memory is then
# not also an allocation: in the backward, s, S and Q are one tensor in turn, and y takes P's).
#
# `_kernels` holds the kernels `rational` runs: these eager ones by default, torch.compile'd ones
# after use_compiled_rational(). On a CPU the eager kernels take x in chunks of `chunk` elements,
# so their dozen forward and ~50 backward passes over memory run from cache rather than memory.
# Compiled kernels fuse the passes into a few loops, and on a GPU chunks would only cost
# launches, so both take x whole.
# =============================================================================

def _per_channel(coeffs, channels):
    """(G, k) group coefficients -> (k, C): row i holds coefficient i of each channel's group."""
    return coeffs.repeat_interleave(channels // coeffs.shape[0], dim=0).T.contiguous()


def _horner(x, c, derivative=False):
    """p(x) = c0 + c1 x + ... (and p'(x) if asked) for x (N, C) and per-channel coefficients c (k, C)."""
    p = torch.addcmul(c[-2], c[-1], x)                    # c_{k-2} + c_{k-1} x (c has k rows): a new tensor
    dp = c[-1]                                            # its derivative: a (C,) row that broadcasts
    for i, ci in enumerate(c.flip(0)[2:]):
        if derivative:                                    # (p x + c)' = p + x p'
            dp = torch.addcmul(p, dp, x) if i == 0 else torch.addcmul(p, dp, x, out=dp)
        p = torch.addcmul(ci, p, x, out=p)                # p x + c_i
    return (p, dp) if derivative else p


def _rational_forward(x, numerator, denominator):
    """y = P(x) / (1 + |x s(x)|), where S(x) = b1 x + ... + bn x^n = x s(x), computed in the
    coefficients' precision (float32 at least) and returned in x's."""
    C, dtype = x.shape[-1], x.dtype
    x = x.to(numerator.dtype)
    P = _horner(x, _per_channel(numerator, C))
    Q = _horner(x, _per_channel(denominator, C)).mul_(x).abs_().add_(1)
    return P.div_(Q).to(dtype)


def _group_power_sums(t, x, k, groups):
    """(G, k) matrix of sums over each group's elements of t x^i, i = 0 .. k-1 (t is overwritten)."""
    sums = []
    for i in range(k):
        sums.append(t.sum(0))                             # (C,): down the rows, contiguous
        if i < k - 1:
            t.mul_(x)
    return torch.stack(sums).view(k, groups, -1).sum(-1).T


def _rational_backward(x, numerator, denominator, grad, needs=(True, True, True)):
    """Gradients of sum(grad * y) for x (N, C), the numerator (G, m+1) and the denominator (G, n);
    None for those not in ``needs`` (a frozen side, or the input of the first layer)."""
    C, G, dtype = x.shape[-1], numerator.shape[0], x.dtype
    x, grad = x.to(numerator.dtype), grad.to(numerator.dtype)
    num = _per_channel(numerator, C)
    P, P_x = _horner(x, num, derivative=True) if needs[0] else (_horner(x, num), None)   # P and P'(x)
    s, s_x = _horner(x, _per_channel(denominator, C), derivative=True)
    S_x = torch.addcmul(s, s_x, x, out=s_x)               # S' = s + x s'
    S = s.mul_(x)
    sign = S.sgn()                                        # = sign(), but vectorised on CPU
    Q = S.abs_().add_(1)
    y = P.div_(Q)
    g = grad / Q
    grad_x = grad_num = grad_den = None
    if needs[0]:                                          # dy/dx = (P' - y Q') / Q  with  Q' = sign(S) S'
        grad_x = P_x.sub_(S_x.mul_(sign).mul_(y)).mul_(g).to(dtype)
    if needs[2]:                                          # dy/db_j = -y sign(S) x^j / Q, summed per group
        grad_den = _group_power_sums((g * y).mul_(sign).neg_().mul_(x), x, denominator.shape[1], G)
    if needs[1]:                                          # dy/da_i = x^i / Q, summed per group
        grad_num = _group_power_sums(g, x, numerator.shape[1], G)
    return grad_x, grad_num, grad_den


class _RationalFunction(torch.autograd.Function):
    """Autograd glue for the kernels above. forward and setup_context are separate, and vmap and jvp
    are given, so that torch.func (grad, vmap for per-sample gradients, jvp) works through it too."""

    @staticmethod
    def forward(x, numerator, denominator):
        ys = [_kernels["forward"](x[c], numerator, denominator) for c in _chunks(x)]
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, numerator, denominator = ctx.saved_tensors
        if torch.is_grad_enabled():                       # create_graph=True (a gradient penalty, torch.func):
            inputs = [t if t.requires_grad else t.detach().requires_grad_() for t in (x, numerator, denominator)]
            y = _reference_in(numerator.dtype, *inputs)   # differentiate Eq. 6 itself, twice if asked
            return torch.autograd.grad(y, inputs, grad.to(y.dtype), create_graph=True)
        grad, needs = grad.contiguous(), tuple(ctx.needs_input_grad)
        parts = [_kernels["backward"](x[c], numerator, denominator, grad[c], needs) for c in _chunks(x)]
        if len(parts) == 1:
            return parts[0]
        x_grads, num_grads, den_grads = zip(*parts)
        return (torch.cat(x_grads) if needs[0] else None, sum(num_grads) if needs[1] else None,
                sum(den_grads) if needs[2] else None)

    @staticmethod
    def vmap(info, in_dims, x, numerator, denominator):
        if in_dims[1] is None and in_dims[2] is None:     # shared coefficients: the batch is just more rows
            x = x.movedim(in_dims[0], 0)
            return _RationalFunction.apply(x.reshape(-1, x.shape[-1]), numerator, denominator).view(x.shape), 0
        x, numerator, denominator = (t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                                     for t, d in zip((x, numerator, denominator), in_dims))
        return torch.stack([_RationalFunction.apply(*t) for t in zip(x, numerator, denominator)]), 0

    @staticmethod
    def jvp(ctx, *tangents):                              # forward mode: through Eq. 6 as written
        inputs = ctx.saved_tensors
        tangents = tuple(torch.zeros_like(t) if dt is None else dt for t, dt in zip(inputs, tangents))
        return torch.func.jvp(lambda *t: _reference_in(inputs[1].dtype, *t), inputs, tangents)[1].to(inputs[0].dtype)


def _reference_in(dtype, x, numerator, denominator):
    """rational_reference computed in ``dtype`` (the coefficients', float32 at least): x^5 in float16
    overflows for |x| > 9.2, and bfloat16 loses the sign of P/Q far out."""
    return rational_reference(x.to(dtype), numerator, denominator)


_EAGER = {"forward": _rational_forward, "backward": _rational_backward, "chunk": 1 << 18}
_kernels = dict(_EAGER)


def _chunks(x):
    """Row slices of x (N, C) that the kernels take one at a time."""
    chunk = _kernels["chunk"]
    rows = max(1, chunk // x.shape[1]) if chunk and x.device.type == "cpu" else len(x)
    return [slice(i, i + rows) for i in range(0, len(x), rows)]


def _compile(kernel, device):
    """torch.compile ``kernel`` with the row count dynamic and everything else static: one graph
    per channel count serves every batch size. (All-static shapes recompile for each new batch
    size and after 8 PyTorch silently runs eager; fully dynamic ones ran 40x slower.) The fused
    backward computes all three gradients: skipping one saves little there, and each `needs`
    pattern would be another graph. On other devices than ``device`` (a plot's CPU tensors while
    training on a GPU) the eager kernel runs: compiling for them could fail."""
    compiled = torch.compile(kernel, dynamic=False)

    def run(x, numerator, denominator, *grad_and_needs):
        if x.device.type != device.type:
            return kernel(x, numerator, denominator, *grad_and_needs)
        tensors = [t.detach() for t in (x, numerator, denominator, *grad_and_needs[:1])]   # backward: + grad
        for t in tensors[:1] + tensors[3:]:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(*tensors)
    return run


def use_compiled_rational(enable=True, device=None):
    """Run the rational through torch.compile'd kernels: each pass fuses into one loop over memory.
    Compiling takes seconds, so it is opt-in. It warms up on ``device`` (default: CUDA if there
    is one), where it will run: on a GPU that exercises Triton, on a CPU a C++ compiler. Returns
    whether the compiled path is now in use; where compilation fails it warns and stays eager."""
    if not enable:
        _kernels.update(_EAGER)
        return False
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        forward, backward = _compile(_rational_forward, device), _compile(_rational_backward, device)
        x = torch.linspace(-4, 4, 96, device=device).view(12, 8)  # not randn: must not move the global RNG
        num, den = torch.ones(2, 6, device=device), torch.ones(2, 4, device=device)
        with torch.no_grad():                             # as inside the autograd function
            for rows in (12, 5):                          # two row counts: the second must reuse the graph
                forward(x[:rows], num, den), backward(x[:rows], num, den, x[:rows], (True, True, True))
    except Exception as e:                                # any failure to compile: stay eager
        warnings.warn(f"use_compiled_rational: torch.compile failed on {device} ({type(e).__name__}: {e}); "
                      f"using the eager path")
        return False
    _kernels.update(forward=forward, backward=backward, chunk=None)
    return True

# =============================================================================
# Appendix B. Reading other people's models
#
# What add_nora and add_lora find from a model rather than ask its user:
#   - an activation's function: call the module on [-8, 8] and compare with ACTIVATIONS (torch's,
#     timm's and HF's GELU classes differ; GPT-2's is the tanh approximation, LLaMA's is SiLU);
#   - its channel axis: read off the layer registered next to it (before it, which makes its
#     input, else after it, which takes its output); inside an nn.Sequential those surely are its
#     neighbours, so the channel count, and the group count with it, is checked there too;
#   - a layer's weight layout: call it once and see which of x @ W.T and x @ W it computes;
#   - a weight that no layer owns (nn.MultiheadAttention keeps q | k | v in one in_proj_weight,
#     which it reads itself): LoRAWeight adds the update as a parametrization of that weight;
#   - BatchNorm running statistics, which training moves though their weights are frozen.
# Activations called as functions (F.gelu inside forward) cannot be found this way. First, the two
# tools the adapters are put on with: freeze and replace_modules.
# =============================================================================

def freeze(model):
    """requires_grad=False for every parameter except those owned by adapters (NoRA, LoRA, ...)."""
    own = _adapter_parameters(model)
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)
    return model


def replace_modules(model, target, make):
    """Replace every submodule for which ``target(module)`` is true by ``make(module)``; returns the count.
    Every replacement is built before the first is put in, so a failure leaves the model as it was."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if target(child)]
    made = [make(child) for _, _, child in found]
    for (parent, name, _), new in zip(found, made):
        setattr(parent, name, new)
    return len(found)


def count_parameters(model):
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def activation_name(module):
    """The name in ACTIVATIONS of the function ``module`` computes (to within 1e-4 on [-8, 8] and at
    +-20, 50, 100, so that a GELU clipped at 10 is not GELU), or None."""
    far = torch.tensor([20.0, 50.0, 100.0], device="cpu")              # cpu even under `with torch.device("meta")`
    x = torch.cat([-far.flip(0), torch.linspace(-8, 8, 161, device="cpu"), far])
    try:
        y = module(x.clone())
    except Exception:                                     # not an elementwise function of one tensor
        return None
    return next((name for name, fn in ACTIVATIONS.items() if isinstance(y, torch.Tensor) and y.shape == x.shape
                 and ((y - fn(x)).abs() <= 1e-4 * (1 + fn(x).abs())).all()), None)


def _find_activations(model, target, init, groups, channel_dim, example, per_module):
    """{id(module): (path, function name, channel dim, groups)} for every activation add_nora replaces,
    each checked before anything changes: its function known (or ``init`` given), its channel axis
    seen on ``example`` or read off its neighbours, and its group count dividing every width it sees."""
    names = (target,) if isinstance(target, (str, type)) else tuple(target)
    by_name = all(isinstance(t, str) for t in names)
    if by_name and set(names) - set(ACTIVATIONS):
        raise ValueError(f"add_nora: target {target!r} names no function in ACTIVATIONS {list(ACTIVATIONS)}; "
                         f"pass those names or activation classes")
    with torch.random.fork_rng(devices=[]):               # calling a Dropout must not move the global RNG
        leaves = [m for m in model.modules() if not any(m.children()) and next(m.parameters(), None) is None]
        functions = {id(m): activation_name(m) for m in leaves}
    paths = {id(m): path for path, m in model.named_modules()}
    chosen = {}                                           # id -> (parent, name, module), first place each is found
    for parent in model.modules():
        for name, m in parent.named_children():
            if id(m) not in chosen and (functions.get(id(m)) in names if by_name else isinstance(m, names)):
                chosen[id(m)] = (parent, name, m)
    if not chosen:
        raise ValueError(f"add_nora: the model has no {' or '.join(n if by_name else n.__name__ for n in names)} "
                         f"module{_activation_classes(model, functions)}")
    unknown = set(per_module) - {paths[i] for i in chosen}
    if unknown:
        raise ValueError(f"add_nora: per_module names {sorted(unknown)}, which are not activations it replaces; "
                         f"those are {[paths[i] for i in chosen][:8]}")
    seen = _probe(model, example, [m for _, _, m in chosen.values()]) if example is not None else {}
    found, misfits, suggestion = {}, [], {}
    for i, (parent, name, m) in chosen.items():
        path, own = paths[i], per_module.get(paths[i], {})
        where = f"add_nora: {path} ({type(m).__name__})"
        if init is None and functions.get(i) is None:
            raise ValueError(f"{where} computes none of {list(ACTIVATIONS)}; pass init=nora.fit_rational(fn) for "
                             f"its function fn, or a target= that leaves it out")
        dim, shapes, counts = own.get("channel_dim", channel_dim), [shape for shape, _ in seen.get(i, [])], []
        if dim == "auto" and shapes:                      # seen on the example: every call must agree
            dims = {d for _, d in seen[i]}
            if None in dims or len(dims) > 1:
                shape = next((s for s, d in seen[i] if d is None), shapes[0])
                raise ValueError(f"{where} gets a {shape} input " + ("whose channel axis no layer's output tells"
                                 if None in dims else f"with its channels on different axes {sorted(dims)}") +
                                 f"; pass per_module={{'{path}': dict(channel_dim=...)}} with its channel axis (or an "
                                 f"example whose sizes differ from its width)")
            dim = dims.pop()
        elif dim == "auto":                               # not seen: the neighbours, where they surely tell
            dim, count = _channel_layout(parent, name, {j for j, f in functions.items() if f})
            counts = [count] if count else []
            if dim is None:
                ran = " (it did not run on the example)" if example is not None else ""
                raise ValueError(f"{where}: nothing next to it tells which axis of its input holds the channels"
                                 f"{ran}; pass example= an input for the model (add_nora runs it once to see), or "
                                 f"per_module={{'{path}': dict(channel_dim=1)}} (or -1)")
        if not all(-len(shape) <= dim < len(shape) for shape in shapes):
            raise ValueError(f"{where} gets {shapes[0]} inputs, which have no axis {dim}; pass its channel axis")
        widths = [shape[dim] for shape in shapes] or counts
        g = own.get("groups", groups)
        if any(w % g for w in widths):                    # the largest count below g that divides them all
            fits = max(d for d in range(1, g + 1) if all(w % d == 0 for w in widths))
            misfits.append(f"{where} acts on {widths[0]} channels, which cannot be split into {g} equal groups")
            suggestion[path] = fits
        found[i] = (path, functions.get(i), dim, g)
    if misfits:
        raise ValueError("\n".join(misfits[:5] + [f"(and {len(misfits) - 5} more)"] * (len(misfits) > 5)) +
                         f"\nuse group counts that divide them, e.g. per_module="
                         f"{ {p: dict(groups=g, **per_module.get(p, {})) for p, g in suggestion.items()} }")
    return found


def _activation_classes(model, functions):
    """What a refusal should list: the parameter-free leaf modules that look like activations."""
    done = sum(isinstance(m, NoRA) for m in model.modules())
    if done:
        return f" left: {done} of its activations already are NoRA (add_nora was called before)"
    counts = {}
    for m in model.modules():
        name = type(m).__name__
        if id(m) in functions and not isinstance(m, (nn.Dropout, nn.Identity)) and "act" in name.lower() + "elu":
            counts[name, functions[id(m)]] = counts.get((name, functions[id(m)]), 0) + 1
    if not counts:
        return ("; it has no parameter-free activation modules at all (activations called as functions "
                "cannot be replaced)")
    listed = ", ".join(f"{n} x{c} ({f or 'none of ACTIVATIONS'})" for (n, f), c in counts.items())
    (cls, function), _ = next(iter(counts.items()))
    call = (f"add_nora(model, target='{function}')" if function else
            f"add_nora(model, target={cls}, init=nora.fit_rational(fn)) with fn its function")
    return f"; it has {listed}: pass e.g. {call}"


def _channel_layout(parent, name, elementwise):
    """(channel dim, channel count) of the input of ``parent``'s child ``name``, read off the layer
    registered before it (which makes that input), or, where none is, the one after it (which takes
    its output). In an nn.Sequential, a sibling linear, convolution or norm layer gives both; elsewhere
    only a linear layer does (the last axis, no count: the layer registered before may not be the
    one that runs before). (None, None) where nothing tells surely: a norm or a convolution outside
    an nn.Sequential may work on a reshaped or transposed tensor (LeViT, wav2vec2). Modules in
    ``elementwise`` (ids of activations), dropouts and identities are looked past."""
    children = list(parent.named_children())
    i = [n for n, _ in children].index(name)
    sequential = isinstance(parent, nn.Sequential)
    for neighbours, makes_input in ((children[:i][::-1], True), (children[i + 1:], False)):
        for _, m in neighbours:
            if isinstance(m, (nn.Dropout, nn.Identity, NoRA, GroupRational)) or id(m) in elementwise:
                continue
            if isinstance(m, nn.Linear) or getattr(getattr(m, "weight", None), "ndim", 0) == 2:   # nn.Linear, Conv1D
                count = (m.out_features if makes_input else m.in_features) if isinstance(m, nn.Linear) else None
                return -1, count if sequential else None
            if sequential and type(m) is nn.LayerNorm:
                return -1, m.normalized_shape[-1]
            if sequential and isinstance(m, nn.modules.conv._ConvNd):
                return 1, m.out_channels if makes_input else m.in_channels
            if sequential and isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                return 1, getattr(m, "num_features", getattr(m, "num_channels", None))
            return None, None                             # a layer that may change the layout: nothing sure
    return None, None


def _width(m, out):
    """(axis, width) of the channels in the tensor layer ``m`` made, or None for layers that tell nothing."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return 1, m.out_channels
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1, getattr(m, "num_features", getattr(m, "num_channels", None))
    if isinstance(m, nn.LayerNorm):                       # timm's LayerNorm2d normalises dim 1: matched by width
        return -1, m.normalized_shape[-1]
    if isinstance(m, nn.Embedding):
        return -1, m.embedding_dim
    if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:   # nn.Linear, Conv1D, ...
        return -1, out.shape[-1]
    return None


@torch.no_grad()
def _probe(model, example, activations):
    """Run ``example`` through ``model`` once (eval mode, no gradients, the RNG left as it was) and
    see every tensor each module in ``activations`` gets: {id: [(shape, channel dim or None)]}.
    The channel axis follows the layer that made the tensor: the last one whose output it is a view
    of (through reshapes, transposes, slices and chunks: the axis with that layer's channel stride),
    else the last whose output has its very shape (an elementwise step between, as in timm's
    BatchNormAct2d). None where no layer tells, e.g. after a matmul with a weight that is no layer's."""
    made, calls, act_ids = [], {id(m): [] for m in activations}, {id(m) for m in activations}

    def after(m, args, out):                              # kept alive, so no later tensor reuses its memory
        layout = _width(m, out) if isinstance(out, torch.Tensor) and id(m) not in act_ids else None
        if layout and layout[1] and out.dim():
            made.append((out, layout[0] % out.dim()))

    def before(m, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.dim() > 0:
            calls[id(m)].append((tuple(x.shape), _channel_axis(x, made)))

    hooks = [m.register_forward_hook(after) for m in model.modules() if _width(m, torch.empty(1)) is not None]
    hooks += [m.register_forward_pre_hook(before) for m in activations]
    training = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            example = example if isinstance(example, (tuple, list, dict)) else (example,)
            try:
                model(**example) if isinstance(example, dict) else model(*example)
            except Exception as e:
                raise ValueError(f"add_nora: the model fails on the example= input ({type(e).__name__}: {e}); "
                                 f"pass an input the model takes (a tensor, a tuple of arguments or a dict)") from e
    finally:
        for h in hooks:
            h.remove()
        for m, mode in training.items():
            m.training = mode
    return {i: c for i, c in calls.items() if c}


def _channel_axis(x, made):
    """The axis of ``x`` that holds the channels of the latest (tensor, channel axis) in ``made`` that
    ``x`` is a view of, or that has x's shape; -1 for the last axis; None where none tells."""
    for out, axis in reversed(made):
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            if out.shape == x.shape and out.stride() == x.stride():
                break
            stride = out.stride(axis)                     # the channel axis keeps its stride in a view
            axes = [d for d in range(x.dim()) if x.stride(d) == stride and x.shape[d] > 1]
            if len(axes) != 1:
                return None
            return -1 if axes[0] == x.dim() - 1 else axes[0]
    else:                                                 # a copy: the last layer to run, if it made this shape
        out, axis = made[-1] if made else (None, None)    # and its channel axis is the only one of that size
        if out is None or out.shape != x.shape or list(x.shape).count(x.shape[axis]) > 1:
            return None
    return -1 if axis == x.dim() - 1 else axis


def _warn_if_far_at_init(found):
    """Warn where a shipped rational is far from the function it replaces (ReLU: its kink), since the
    model then changes at step 0, before any training."""
    for function in sorted({f for _, f, _, _ in found.values() if f in COEFFS}):
        (error, at), (at_0, _) = (fit_error(ACTIVATIONS[function], *COEFFS[function], r) for r in ((-8, 8), (0, 0)))
        if error > 0.05:
            count = sum(f == function for _, f, _, _ in found.values())
            warnings.warn(f"add_nora: {count} module(s) compute {function}, whose rational is up to {error:.2g} off "
                          f"on [-8, 8] (at x = {at:.3g}; {at_0:.2g} at 0), so the model's outputs move at init; "
                          f"measure the change on your inputs")


# Fused q | k | v projections whose rows are q, k and v in equal thirds, by the class that holds them
# (in timm, torchvision, transformers or this file): timm's and our ViT attention, timm's Swin and
# EVA, torchvision's Swin and MaxViT, HF GPT-2. Any other fused layout (multi-query, grouped-query,
# interleaved per head, or a class of your own) needs its rows given.
QKV_THIRDS = {"Attention", "EvaAttention", "WindowAttention", "WindowAttentionV2", "ShiftedWindowAttention",
              "ShiftedWindowAttentionV2", "RelativePositionalMultiHeadAttention", "GPT2Attention"}


def _qkv_rows(rows, parts):
    """The (start, stop) row ranges of the ``parts`` ('q', 'k', 'v') of a fused q | k | v projection."""
    return [(i * rows // 3, (i + 1) * rows // 3) for i, part in enumerate("qkv") if part in parts]


def _named(path, names):
    """The one of ``names`` that ``path`` is, or ends with at a "." (so `query_proj` is not `pos_query_proj`)."""
    return next((n for n in names if path == n or path.endswith("." + n)), None)


def _find_linears(model, targets, fused_qkv, qkv_parts, rows):
    """{id(layer): (row ranges or None, fan_in_fan_out)} for every linear layer add_lora wraps; a fused
    projection of unknown layout is refused unless ``rows`` gives its rows."""
    found = {}
    for path, m in model.named_modules():
        weight, target = getattr(m, "weight", None), _named(path, targets)
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and target and not isinstance(m, LoRALinear)):
            continue
        where = f"add_lora: {path} ({type(m).__name__})"
        transposed = _fan_in_fan_out(m, where)
        out_features, in_features = weight.shape[::-1] if transposed else weight.shape
        ranges = rows.get(target)
        if ranges is not None and not (isinstance(ranges, (list, tuple)) and ranges and all(
                isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(i, numbers.Integral) for i in r)
                and 0 <= r[0] < r[1] <= out_features for r in ranges)):
            raise ValueError(f"{where}: rows={{'{target}': {ranges!r}}} must be a list of (start, stop) ranges "
                             f"within its {out_features} output rows, e.g. [(0, {out_features // 3})]")
        if ranges is None and _named(path, fused_qkv):
            cls = type(model.get_submodule(path.rpartition(".")[0]))
            holder, library = cls.__name__, cls.__module__.partition(".")[0]
            if holder not in QKV_THIRDS or library not in ("timm", "torchvision", "transformers", __name__) \
                    or out_features != 3 * in_features:
                raise ValueError(f"{where} in {holder}: a fused projection of {out_features} rows whose layout is not "
                                 f"known to be q | k | v in equal thirds (multi-query? per head?); give the rows to "
                                 f"adapt, e.g. add_lora(model, targets={targets!r}, "
                                 f"rows={{'{target}': [(0, q_rows)]}})")
            ranges = _qkv_rows(out_features, qkv_parts)
        found[id(m)] = (ranges, transposed)
    return found


def _find_attention(model, targets, fused_qkv):
    """The nn.MultiheadAttention modules whose in_proj_weight (q | k | v) a fused-qkv target adapts."""
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and set(targets) & set(fused_qkv)
            and m.in_proj_weight is not None and not torch.nn.utils.parametrize.is_parametrized(m)]


def _linear_names(model):
    """What add_lora's refusal lists: the names of the model's linear layers, and a call with two of them."""
    names = {}
    for path, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2 and path:
            names.setdefault(path.rpartition(".")[2], 0)
            names[path.rpartition(".")[2]] += 1
    if not names:
        return "it has no module with a 2-D weight"
    done = sum(isinstance(m, LoRALinear) for m in model.modules())
    if done:
        return f"{done} of its linear layers already have LoRA (add_lora was called before)"
    listed = ", ".join(f"{n} x{c}" for n, c in names.items())
    return f"its linear layers are named {listed}: pass e.g. add_lora(model, targets={tuple(list(names)[:2])!r})"


@torch.no_grad()
def _fan_in_fan_out(layer, where):
    """Whether ``layer`` computes x @ weight, its weight stored (in, out) as in HF's Conv1D, rather
    than nn.Linear's x @ weight.T: call it once and see which of the two its output follows."""
    if isinstance(layer, nn.Linear):
        return False
    W = layer.weight
    if W.is_meta:
        raise ValueError(f"{where} is on the meta device, where its weight layout cannot be seen; add LoRA "
                         f"before moving it there, or pass an nn.Linear")
    fits = []
    for transposed in (False, True):
        width = W.shape[0] if transposed else W.shape[1]
        x = torch.linspace(-1, 1, 2 * width, device=W.device, dtype=W.dtype).view(2, width)
        try:
            y = layer(x) - layer(torch.zeros_like(x))     # the bias cancels
        except (RuntimeError, ValueError):                # the wrong width for this layer
            continue
        expected = x @ W if transposed else x @ W.T
        if y.shape == expected.shape and torch.allclose(y, expected, rtol=1e-3, atol=1e-3 * expected.abs().max()):
            fits.append(transposed)
    if len(fits) == 2:                                    # a symmetric (or zero) square weight: both fit
        if type(layer).__name__ == "Conv1D":              # Hugging Face's, stored (in, out)
            return True
        raise ValueError(f"{where}: its square weight is symmetric, so calling it cannot tell x @ weight from "
                         f"x @ weight.T; wrap it yourself with LoRALinear(layer, fan_in_fan_out=...)")
    if not fits:
        raise ValueError(f"{where} computes neither x @ weight.T nor x @ weight, so LoRA cannot adapt its weight; "
                         f"leave it out of targets")
    return fits[0]


class LoRAWeight(LoRALinear):
    """LoRA on a weight that no layer owns, as a parametrization (torch.nn.utils.parametrize): torch's
    nn.MultiheadAttention keeps q | k | v in one `in_proj_weight` and reads it itself, so there is
    no layer to wrap; registered on that weight, it makes the module read W0 + B A * alpha / r.
    It is never merged itself: :func:`merge` removes the parametrization, leaving W0 + B A as the
    module's plain weight."""

    def __init__(self, weight, rank=8, alpha=16, row_ranges=None):
        holder = nn.Module()
        holder.weight = weight
        super().__init__(holder, rank, alpha, row_ranges)
        del self.base                                     # the weight stays its own module's

    def forward(self, weight):
        return self._add_to_rows(weight.clone(), self.delta_weight(), dim=0)

    def merge(self):
        raise TypeError("LoRAWeight: merge the whole model with nora.merge(model), which folds the update into "
                        "the weight by removing the parametrization")

    def unmerge(self):
        raise TypeError("LoRAWeight: nora.merge(model) removed the parametrization, so there is nothing to "
                        "unmerge; build the model again and load the adapter")


def _load_lora(layer, load, state_dict, prefix, *args):
    """LoRALinear's loading: unmerged first; then (after the base's own tensors: _after_lora_load) the
    base holds B A only if it came from a merged layer's state, as its saved extra state says. It
    ends merged or not as it was, so a state dict loads right into either, with B A added once."""
    saved = state_dict.get(prefix + "_extra_state")
    base_merged = prefix + "base.weight" in state_dict and saved is not None and _lora_settings(saved)[1]
    layer._loading = layer.merged, base_merged
    if layer.merged:
        layer.unmerge()
    load(state_dict, prefix, *args)


def _after_lora_load(layer, incompatible_keys):
    was_merged, layer.merged = layer.__dict__.pop("_loading", (layer.merged, layer.merged))
    if was_merged:
        layer.merge()
    elif layer.merged:
        layer.unmerge()


def _remove_lora_parametrizations(model):
    """Remove every LoRAWeight parametrization, leaving W0 + B A as the plain weight."""
    for m in list(model.modules()):
        for name, chain in list(getattr(m, "parametrizations", {}).items()):
            if any(isinstance(p, LoRAWeight) for p in chain):
                torch.nn.utils.parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                m._nora_merged = getattr(m, "_nora_merged", ()) + (name,)   # adapter_state_dict keeps the weight


def _adapter_keys(model):
    """State-dict keys of every adapter's own tensors and settings (not the layers they wrap)."""
    return {f"{name}.{k}" if name else k for name, m in model.named_modules() if isinstance(m, ADAPTERS)
            for k in m.state_dict() if not k.startswith("base.")}


def _merged_weights(model):
    """State-dict keys of the weights that merge() folded a LoRAWeight into (nn.MultiheadAttention's in_proj_weight)."""
    return {f"{name}.{w}" if name else w for name, m in model.named_modules() for w in getattr(m, "_nora_merged", ())}


def _describe_adapters(model):
    """What save_adapter writes beside the tensors: each adapter's kind, module path and settings."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, NoRA):
            out.append(dict(kind="nora", path=path, groups=m.numerator.shape[0], rank=m.rank, alpha=m.scaling * m.rank,
                            form=m.form, basis_scale=m.basis_scale, channel_dim=m.channel_dim, function=m.function))
        elif isinstance(m, LoRALinear) and not isinstance(m, LoRAWeight):
            out.append(dict(kind="lora", path=path, layer=type(m).__name__, rank=m.rank, alpha=m.scaling * m.rank,
                            row_ranges=m.row_ranges, fan_in_fan_out=m.fan_in_fan_out, merged=m.merged))
        for weight, chain in getattr(m, "parametrizations", {}).items():
            out += [dict(kind="lora_weight", path=path, weight=weight, rank=p.rank, alpha=p.scaling * p.rank,
                         row_ranges=p.row_ranges) for p in chain if isinstance(p, LoRAWeight)]
        out += [dict(kind="merged_weight", path=path, weight=w) for w in getattr(m, "_nora_merged", ())]
    return out


def _plan_adapters(model, described, state):
    """[(path, new module, or (weight name, LoRAWeight))] for each adapter the file describes and
    ``model`` lacks; every one checked, and every new module built, before any is put in (_build_in).
    Refused where the model has no such module, or one that cannot take it."""
    plan, where = [], lambda e: f"load_adapter: {e['path'] or 'the model'}"
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    for e in described.get("adapters", []):
        try:
            m = model.get_submodule(e["path"])
        except AttributeError:
            raise ValueError(f"{where(e)}: the model has no such module; load the adapter into the model it was "
                             f"trained on") from None
        if e["kind"] == "nora" and isinstance(m, NoRA) and m.channel_dim != e["channel_dim"]:
            raise ValueError(f"{where(e)}: the adapter groups channel axis {e['channel_dim']}, this model's NoRA "
                             f"axis {m.channel_dim}; build it with the saved axis (or load into a plain model)")
        if e["kind"] == "nora" and not isinstance(m, NoRA):
            leaf = next(m.parameters(), None) is None and not any(m.children())
            function = activation_name(m) if leaf else None
            if not (function == e["function"] if e["function"] else leaf and _is_nonlinear(m)):
                raise ValueError(f"{where(e)} is a {type(m).__name__} computing {function or 'something else'}, not "
                                 f"the {e['function'] or 'activation'} the adapter replaced; load into the model it "
                                 f"was trained on")
            init = (state.get(e["path"] + ".numerator"), state.get(e["path"] + ".denominator"))
            if not all(isinstance(t, torch.Tensor) for t in init):
                raise ValueError(f"{where(e)}: the file has no base coefficients for it; it is damaged or not made by "
                                 f"save_adapter")
            new = NoRA(e["groups"], e["rank"], e["alpha"], init, e["form"], e["basis_scale"], e["channel_dim"])
            new.where, new.function = e["path"], e["function"]
            plan.append((e["path"], new.to(device).train(m.training)))
        elif e["kind"] == "lora" and not isinstance(m, LoRALinear):
            if e["layer"] != "LoRALinear":
                raise ValueError(f"{where(e)} was trained with {e['layer']}, which load_adapter cannot build; put it "
                                 f"on the model as before (e.g. train_vit.prepare) and load again")
            if not (isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2):
                raise ValueError(f"{where(e)} is a {type(m).__name__} with no 2-D weight to adapt")
            new = LoRALinear(m, e["rank"], e["alpha"], e["row_ranges"], e["fan_in_fan_out"])
            plan.append((e["path"], new.train(m.training)))
        elif e["kind"] == "lora_weight" and not torch.nn.utils.parametrize.is_parametrized(m, e["weight"]):
            weight = getattr(m, e["weight"], None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"{where(e)} has no weight {e['weight']!r}")
            plan.append((e["path"], (e["weight"], LoRAWeight(weight, e["rank"], e["alpha"], e["row_ranges"]))))
        elif e["kind"] == "merged_weight" and torch.nn.utils.parametrize.is_parametrized(m, e["weight"]):
            raise ValueError(f"{where(e)}: the file holds its merged {e['weight']}; load it into a model without "
                             f"add_lora (a plain one), or merge this one first")
    return plan


def _build_in(model, path, new):
    """Put a _plan_adapters entry into ``model``."""
    if isinstance(new, tuple):                            # a LoRAWeight: a parametrization of a weight
        torch.nn.utils.parametrize.register_parametrization(model.get_submodule(path), *new)
    else:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, new)


@torch.no_grad()
def _is_nonlinear(module):
    """Whether a parameter-free module maps [-8, 8] elementwise and not as the identity (Dropout in eval
    mode, nn.Identity): a place a NoRA of an unknown function can go."""
    x = torch.linspace(-8, 8, 33, device="cpu")
    try:
        y = module(x.clone())
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and not torch.allclose(y, x)


def _check_adapter_state(model, state, plan, described):
    """Refuse ``state`` before anything changes: keys that are not the model's adapters' (with ``plan``
    built in), its BatchNorms' statistics, its head, trained parameters or merged weights (a file must
    not overwrite the frozen backbone); missing adapter tensors; other shapes or settings; NaN or inf."""
    own, adapters = dict(model.state_dict(keep_vars=True)), set(_adapter_keys(model))   # the state it will have
    for path, new in plan:
        if isinstance(new, tuple):                        # LoRAWeight: the weight moves under parametrizations
            weight, lora = new
            own.pop(f"{path}.{weight}", None)
            prefix = f"{path}.parametrizations.{weight}."
            own[prefix + "original"] = getattr(model.get_submodule(path), weight)
            items = {f"{prefix}0.{k}": v for k, v in lora.state_dict(keep_vars=True).items()}
        else:
            for k in [k for k in own if k.startswith(path + ".")]:
                own.pop(k)
            items = {f"{path}.{k}": v for k, v in new.state_dict(keep_vars=True).items()}
        own.update(items)
        adapters |= {k for k in items if ".base." not in k and not k.endswith(".original")}
    params = dict(model.named_parameters())
    prepared = not all(p.requires_grad for p in params.values())     # a plain model trains everything: no sign
    allowed = adapters | _running_statistics(model) | _merged_weights(model) | {
        n for n, p in params.items() if n.startswith("head.") or (prepared and p.requires_grad and described is None)}
    allowed |= {k for k in (described or {}).get("other", []) if k in own}
    allowed |= {f"{e['path']}.{e['weight']}" for e in (described or {}).get("adapters", [])
                if e["kind"] == "merged_weight" and f"{e['path']}.{e['weight']}" in own}
    strangers = sorted(k for k in state if k not in allowed)
    missing = sorted(adapters - set(state))
    if strangers or missing:
        raise ValueError(f"load_adapter: the file's {strangers[:4]} are no adapter, head or trained tensors of this "
                         f"model, and it lacks {missing[:4]}; build the model with the same add_nora / add_lora "
                         f"settings (groups, rank, targets, depth) before loading, or pass a file made by save_adapter")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if not k.endswith("_extra_state") and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"load_adapter: the saved adapter was trained with other settings (groups, rank, form or "
                         f"targets; saved vs this model: {', '.join(bad[:3])}); build the model with the saved settings")
    nan = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()]
    if nan:
        raise ValueError(f"load_adapter: {nan[:3]} hold NaN or inf: the run that saved them diverged; retrain it")
    for k, v in state.items():                            # settings no shape shows: set_extra_state only checks
        module = _extra_state_owner(model, plan, k) if k.endswith("_extra_state") else None
        if module is not None:
            module.set_extra_state(v)


def _extra_state_owner(model, plan, key):
    """The module (in the model, or to be built in by ``plan``) whose extra state ``key`` is."""
    path = key[:-len("._extra_state")] if key != "_extra_state" else ""
    for where, new in plan:
        if isinstance(new, tuple) and path == f"{where}.parametrizations.{new[0]}.0":
            return new[1]
        if not isinstance(new, tuple) and path == where:
            return new
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _running_statistics(model):
    """State-dict keys of the running statistics of BatchNorm-like layers (torchvision's MaxViT has them)."""
    return {f"{name}.{k}" for name, m in model.named_modules() if getattr(m, "track_running_stats", False)
            for k, _ in m.named_buffers(recurse=False)}


def _adapter_parameters(model, types=ADAPTERS):
    """Ids of the parameters that adapters of ``types`` own (not those of the layers they wrap)."""
    return {id(p) for m in model.modules() if isinstance(m, types) for p in m.parameters(recurse=False)}

# =============================================================================
# Appendix C. Checks, files and the fit's optimiser
#
# Kept out of the method so that it reads plainly: the checks of NoRA's arguments, of the settings
# saved with an adapter (NoRA's and LoRALinear's extra state), of coefficients and group counts;
# safetensors files, read and written with the standard library; and the Levenberg-Marquardt
# steps that fit_rational takes.
# =============================================================================

def _init_coefficients(init, groups):
    """(G, m+1) and (G, n) float32 coefficients from a name in COEFFS or a (numerator, denominator) pair."""
    groups = _positive_int(groups, "groups")
    if isinstance(init, str):
        if init not in COEFFS:
            raise ValueError(f"unknown activation {init!r}; known: {sorted(COEFFS)}, "
                             f"or pass (numerator, denominator) tensors, e.g. from fit_rational()")
        init = COEFFS[init]
    num, den = (torch.as_tensor(c, dtype=torch.float32, device="cpu") for c in init)   # checked here, moved later
    num = num.expand(groups, -1) if num.dim() == 1 else num
    den = den.expand(groups, -1) if den.dim() == 1 else den
    if num.shape[0] != groups or den.shape[0] != groups:
        raise ValueError(f"coefficients have {num.shape[0]} and {den.shape[0]} rows, expected {groups} groups")
    if not (torch.isfinite(num).all() and torch.isfinite(den).all()):
        raise ValueError("rational coefficients contain NaN or inf; refit them with fit_rational()")
    return num.clone(), den.clone()


def _check_arguments(form, rank, alpha, basis_scale):
    if form not in ("shared", "per_group"):
        raise ValueError(f"NoRA: form must be 'shared' or 'per_group', got {form!r}")
    _positive_int(rank, "NoRA: rank")
    if alpha is not None:
        _positive_number(alpha, "NoRA: alpha (or None for 2 * rank)")
    _positive_number(basis_scale, "NoRA: basis_scale")


def _positive_int(value, what):
    """``value`` as an int if it is a positive integer of any integer type but bool; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(value, what):
    """``value`` as a float if it is a finite positive real number but bool; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _check_settings(module, names, saved, mine):
    """Refuse a state dict saved with other settings (tensors as get_extra_state makes them) than ``module``'s."""
    if not (isinstance(saved, torch.Tensor) and saved.shape == mine.shape and torch.allclose(saved.cpu().double(), mine)):
        saved = saved.tolist() if isinstance(saved, torch.Tensor) else saved
        raise ValueError(f"{type(module).__name__}: the saved adapter was trained with other settings ({names}: "
                         f"saved {saved}, this model {mine.tolist()}); build the model with the saved settings")


def _lora_settings(state):
    """(settings, merged) from a LoRALinear's saved extra state: [scaling, fan_in_fan_out, merged,
    row ranges ...]; files from before the merged flag have an even length and were unmerged."""
    if isinstance(state, dict):                           # saved by an older nora.py still
        state = torch.tensor([state["scaling"], False, *(i for r in state["row_ranges"] for i in r)], dtype=torch.float64)
    if not isinstance(state, torch.Tensor) or state.dim() != 1 or len(state) < 2:
        return state, False
    if len(state) % 2:
        return torch.cat([state[:2], state[3:]]), bool(state[2])
    return state, False


def _check_rational_inputs(x, numerator, denominator, dim):
    """rational's contract: a floating-point x with a dimension ``dim`` of C channels, G dividing C,
    and (G, m+1), (G, n) coefficients on x's device."""
    if not x.is_floating_point():
        raise TypeError(f"rational: expected a floating-point input, got {x.dtype} (convert with x.float())")
    if (numerator.dim() != 2 or denominator.dim() != 2 or numerator.shape[0] != denominator.shape[0]
            or min(numerator.shape[1], denominator.shape[1]) < 2):
        raise ValueError(f"rational: numerator must be (G, m+1) and denominator (G, n) with the same G, m >= 1 and "
                         f"n >= 2 (the kernels' Horner steps); got {tuple(numerator.shape)} and {tuple(denominator.shape)}")
    if numerator.device != x.device or denominator.device != x.device:
        raise ValueError(f"rational: the input is on {x.device} but the coefficients on {numerator.device}; "
                         f"move the module to the input's device (model.to(device))")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"rational: no channel dimension {dim} in a {tuple(x.shape)} input")
    G, C = numerator.shape[0], x.shape[dim]
    if C % G:
        raise ValueError(f"rational: {C} channels (dimension {dim} of a {tuple(x.shape)} input) cannot be split "
                         f"into {G} equal groups; {_divisors_hint(C)}")


def _least_squares(coeffs, V, W, f, root_weight, iters=200):
    """Levenberg-Marquardt on sum (root_weight (P/(1+|S|) - f))^2 from ``coeffs`` (a_0 .. a_m, b_1 .. b_n),
    P = V a and S = W b on the grid: each step solves the damped normal equations, the damping
    falling after a step that lowers the error and rising until one does. Returns (coefficients, error)."""
    m = V.shape[1]

    def residual(c):
        P, S = V @ c[:m], W @ c[m:]
        return root_weight * (P / (1 + S.abs()) - f), P, S

    r, P, S = residual(coeffs)
    cost, damping = r.square().sum(), 1e-3
    for _ in range(iters):
        Q = 1 + S.abs()                                   # dr/da_i = x^i / Q,  dr/db_j = -P sign(S) x^j / Q^2
        J = torch.cat([V / Q[:, None], -(P * S.sgn() / Q ** 2)[:, None] * W], dim=1) * root_weight[:, None]
        scale = J.norm(dim=0).clamp_min(1e-300)           # columns of norm 1: x^5 and x^0 differ by 1e5
        A, g = (J / scale).T @ (J / scale), (J / scale).T @ r
        while damping < 1e12:
            step = -torch.linalg.solve(A + damping * torch.diag(A.diagonal()), g) / scale
            r_new, P_new, S_new = residual(coeffs + step)
            if r_new.square().sum() < cost:
                coeffs, r, P, S, cost, damping = coeffs + step, r_new, P_new, S_new, r_new.square().sum(), damping / 3
                break
            damping *= 4
        else:
            break                                         # no step lowers the error: a minimum
    return coeffs, cost.item()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path, state, metadata=None):
    """Write {name: tensor} as a .safetensors file (an 8-byte little-endian header length, a JSON
    header of each tensor's dtype, shape and byte range, padded to 8 bytes, then the raw bytes) with
    {str: str} ``metadata``; through write_atomic, so a failed write leaves the old file whole."""
    names, header, blobs, offset = {v: k for k, v in _SAFETENSORS_DTYPES.items()}, {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    write_atomic(path, struct.pack("<Q", len(head) + -len(head) % 8) + head + b" " * (-len(head) % 8) + b"".join(blobs))


def read_safetensors(path, metadata=False):
    """{name: tensor} from a .safetensors file (and its metadata, if asked), parsed with the standard
    library and torch, so no safetensors package is needed. Every entry is checked: a known dtype,
    a shape of non-negative integers whose size is its byte range, and ranges that lie in the file
    without overlapping (overlapping ranges would make a small file huge in memory)."""
    data = Path(path).read_bytes()

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate names {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
        return dict(pairs)
    try:
        if len(data) < 8:
            raise ValueError("shorter than its 8-byte header length")
        n = struct.unpack("<Q", data[:8])[0]
        if n > len(data) - 8:
            raise ValueError(f"a header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8:8 + n], object_pairs_hook=unique)
        body, state, end_of_last = data[8 + n:], {}, 0
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
        for name, info in entries:
            dtype, offsets, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"], info["shape"]
            if not (len(offsets) == 2 and all(type(i) is int for i in (*offsets, *shape)) and min(shape, default=0) >= 0):
                raise ValueError(f"{name} has offsets {offsets} and shape {shape}; both must be integers >= 0")
            start, end = offsets
            if not end_of_last <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name}'s bytes {offsets} overlap another tensor's, lie past the end of the file, "
                                 f"or do not hold its shape {shape}")
            state[name] = torch.frombuffer(bytearray(body[start:end]), dtype=dtype).view(shape) if end > start \
                else torch.empty(shape, dtype=dtype)
            end_of_last = end
        extra = header.get("__metadata__") or {}
        if not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
            raise ValueError("its __metadata__ is not a map of strings")
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        what = f"unknown dtype {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not a valid .safetensors file ({what}); it may be truncated or an "
                         f"error page. Download it again, or pass another file") from None
    return (state, extra) if metadata else state


def read_adapter(path):
    """(state, description) from a save_adapter file; the description is None for a plain safetensors
    state dict, which then needs a model prepared like the saved one."""
    state, extra = read_safetensors(path, metadata=True)
    if "nora" not in extra:
        return state, None
    try:
        described = json.loads(extra["nora"])
        ok = (isinstance(described, dict) and isinstance(described.get("other", []), list)
              and all(isinstance(k, str) for k in described.get("other", []))
              and all(_described_right(e) for e in described["adapters"]))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: its description of the adapters is damaged; save the adapter again")
    return state, described


def _described_right(e):
    """Whether ``e`` is an adapter entry as _describe_adapters writes it: each field there, of its type."""
    integer, number = lambda v: type(v) is int and v > 0, lambda v: type(v) in (int, float) and v > 0
    rows = lambda v: isinstance(v, list) and v and all(isinstance(r, list) and len(r) == 2 and
                                                       all(type(i) is int for i in r) and 0 <= r[0] < r[1] for r in v)
    fields = {"nora": dict(groups=integer, rank=integer, alpha=number, form=lambda v: v in ("shared", "per_group"),
                           basis_scale=number, channel_dim=lambda v: v is None or type(v) is int,
                           function=lambda v: v is None or v in ACTIVATIONS),
              "lora": dict(layer=lambda v: isinstance(v, str), rank=integer, alpha=number, row_ranges=rows,
                           fan_in_fan_out=lambda v: type(v) is bool, merged=lambda v: type(v) is bool),
              "lora_weight": dict(weight=lambda v: isinstance(v, str), rank=integer, alpha=number, row_ranges=rows),
              "merged_weight": dict(weight=lambda v: isinstance(v, str))}
    return (isinstance(e, dict) and e.get("kind") in fields and isinstance(e.get("path"), str)
            and all(k in e and check(e[k]) for k, check in fields[e["kind"]].items()))


def write_atomic(path, data):
    """Write ``data`` (bytes or str) to ``path`` through a temporary file in the same folder, then
    os.replace it into place: a crash or a full disk mid-write leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _divisors_hint(C):
    return f"use a group count that divides {C}, e.g. one of {[d for d in range(1, min(C, 64) + 1) if C % d == 0]}"

# =============================================================================
# Appendix D. Drawing what NoRA learned
#
# Plain SVG text that any browser shows, so drawing adds no dependency.
# =============================================================================

def group_curves(module, x):
    """(len(x), G): each group's function of a NoRA or GroupRational ``module`` at the points ``x``."""
    num, den = module.coefficients() if isinstance(module, NoRA) else (module.numerator, module.denominator)
    with torch.no_grad():                                 # column g of (N, G) inputs goes through group g's rational
        return rational(x[:, None].expand(-1, len(num)).contiguous(), num.detach().cpu(), den.detach().cpu())


def plot_activations(model, path, x_range=8.0):
    """Two panels per rational activation in ``model``: each group's function (colours) against GELU
    (grey, dashed), and its difference from GELU, on [-x_range, x_range]. Returns the number of layers
    drawn; writes nothing where there are none."""
    x = torch.linspace(-x_range, x_range, 161)
    panels = []
    for name, m in model.named_modules():
        if isinstance(m, (NoRA, GroupRational)):
            y = group_curves(m, x)
            colours = [hue(300 * g / y.shape[1]) for g in range(y.shape[1])]
            layer = name.replace(".mlp.act", "")
            panels.append((layer, [(x, F.gelu(x), "#888", True)] + [(x, y[:, g], c, False) for g, c in enumerate(colours)]))
            panels.append((f"{layer}: minus GELU", [(x, y[:, g] - F.gelu(x), c, False) for g, c in enumerate(colours)]))
    if panels:
        write_svg(path, panels)
    return len(panels) // 2


def hue(degrees):
    """A strong colour ``degrees`` round the colour wheel, as '#rrggbb' (not CSS hsl(), which some
    SVG renderers draw black)."""
    import colorsys
    r, g, b = colorsys.hls_to_rgb(degrees / 360, 0.42, 0.7)
    return f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}"


def write_svg(path, panels, columns=4, width=240, height=170):
    """Draw ``panels``, a list of (title, [(x, y, colour, dashed), ...]) line plots, as a grid in an
    SVG file at ``path`` (through a temporary file, as every file here is written)."""
    rows = -(-len(panels) // columns)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * width}" height="{rows * height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for k, (title, lines) in enumerate(panels):
        ox, oy, pw, ph = (k % columns) * width + 40, (k // columns) * height + 20, width - 55, height - 45
        x0, x1 = min(float(l[0].min()) for l in lines), max(float(l[0].max()) for l in lines)
        y0, y1 = min(float(l[1].min()) for l in lines), max(float(l[1].max()) for l in lines)
        y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)
        sx = lambda v: ox + (v - x0) / (x1 - x0) * pw
        sy = lambda v: oy + ph - (v - y0) / (y1 - y0) * ph
        out.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
                   f'<text x="{ox}" y="{oy - 6}">{title}</text>'
                   f'<text x="{ox}" y="{oy + ph + 13}">{x0:g}</text>'
                   f'<text x="{ox + pw}" y="{oy + ph + 13}" text-anchor="end">{x1:g}</text>'
                   f'<text x="{ox - 4}" y="{oy + 9}" text-anchor="end">{y1:.2g}</text>'
                   f'<text x="{ox - 4}" y="{oy + ph}" text-anchor="end">{y0:.2g}</text>')
        for x, y, colour, dashed in lines:
            points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x.tolist(), y.tolist()))
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.2"'
                       + (' stroke-dasharray="4 3"/>' if dashed else "/>"))
    write_atomic(path, "\n".join(out + ["</svg>"]) + "\n")

# =============================================================================
# Appendix E. The baselines of the paper's tables
#
# What Tables 1, 3, 4 and 5 compare NoRA with, on the same frozen ViT, each as small as it can be:
# DoRA and QLoRA on LoRA's rows, VPT prompts, bottleneck adapters, other learnable activations,
# and the coefficient-tuning variants. train_vit.prepare puts any of them on a model by name.
# =============================================================================

class DoRALinear(LoRALinear):
    """DoRA: each adapted row is magnitude * direction, W' = m (W0 + B A) / ||W0 + B A||, with m
    trainable and starting at ||W0|| (so W' = W0 at step 0). As in the DoRA paper (Sec. 4.3)
    the norm is treated as a constant in backward. For (out, in) weights only (nn.Linear)."""

    def __init__(self, base, rank=8, alpha=16, row_ranges=None, fan_in_fan_out=False):
        if fan_in_fan_out:
            raise ValueError("DoRALinear: only for layers with an (out, in) weight, such as nn.Linear")
        super().__init__(base, rank, alpha, row_ranges)
        self.magnitude = nn.Parameter(base.weight.detach()[self.rows()].norm(dim=1))

    def rows(self):
        return torch.cat([torch.arange(a, b, device=self.lora_A.device) for a, b in self.row_ranges])

    @property
    def weight(self):
        if self.merged:
            return self.base.weight
        rows, w = self.rows(), super().weight              # W0 + B A on the adapted rows
        v = w[rows]
        return w.index_copy(0, rows, v * (self.magnitude / v.norm(dim=1).detach())[:, None])

    def forward(self, x):
        return F.linear(x, self.weight, self.base.bias)

    def unmerge(self):
        raise NotImplementedError("DoRA's merge rescales rows; it is not undone")


# The 16 levels of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


class NF4Linear(nn.Module):
    """A frozen linear stored in 4 bits (QLoRA's NF4): each block of 64 weights keeps its absmax and
    a 4-bit index into NF4_LEVELS, two indices per byte. The weight is dequantised at every forward.
    (QLoRA also quantises the absmax values, "double quantisation"; we keep them in float32.)"""

    def __init__(self, linear, block_size=64):
        super().__init__()
        w = linear.weight.detach().float()
        if w.numel() % block_size:
            raise ValueError(f"NF4Linear: {w.numel()} weights do not split into blocks of {block_size}")
        blocks = w.reshape(-1, block_size)
        absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
        levels = NF4_LEVELS.to(w.device)
        codes = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)
        self.register_buffer("codes", codes[:, 0::2] << 4 | codes[:, 1::2])
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", levels, persistent=False)   # on the layer's device: no copy per forward
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.shape = w.shape

    @property
    def weight(self):
        codes = torch.stack([self.codes >> 4, self.codes & 15], dim=-1).flatten(1).long()
        return (self.levels[codes] * self.absmax).view(self.shape)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class PromptTokens(nn.Module):
    """VPT-shallow (Jia et al. 2022): learnable tokens inserted after the class token, before the first block."""

    def __init__(self, num_tokens, dim):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, x):
        return torch.cat([x[:, :1], self.prompts.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)


class Adapter(nn.Module):
    """Bottleneck adapter after a block (Houlsby et al. 2019): x + up(GELU(down(x))), up zero-initialised."""

    def __init__(self, dim, bottleneck=48):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class DeltaRational(nn.Module):
    """Frozen base coefficients plus a directly trained, zero-initialised update of the first
    ``num_terms`` numerator and ``den_terms`` denominator coefficients (Table 4): all of them
    is "zero-init tuning" (NoRA without the low-rank factorisation), (1, 0) is "const tuning" (a0;
    the paper also tunes b0, which our Q does not have)."""

    def __init__(self, groups=8, num_terms=6, den_terms=4, init="gelu"):
        super().__init__()
        base = GroupRational(groups, init)
        self.register_buffer("numerator", base.numerator.detach())
        self.register_buffer("denominator", base.denominator.detach())
        self.delta_num = nn.Parameter(torch.zeros(groups, num_terms))
        self.delta_den = nn.Parameter(torch.zeros(groups, den_terms))

    def forward(self, x):
        pad = lambda d, full: F.pad(d, (0, full.shape[1] - d.shape[1]))
        return rational(x, self.numerator + pad(self.delta_num, self.numerator),
                             self.denominator + pad(self.delta_den, self.denominator))


class LearnableELU(nn.Module):
    """ELU with a learnable alpha (Table 3)."""

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * torch.expm1(x.clamp_max(0)))


class AReLU(nn.Module):
    """AReLU (Chen et al. 2020): (1 + sigmoid(beta)) x for x >= 0, clamp(alpha, 0.01, 0.99) x below (Table 3)."""

    def __init__(self, alpha=0.9, beta=2.0):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.tensor(alpha)), nn.Parameter(torch.tensor(beta))

    def forward(self, x):
        return torch.where(x >= 0, (1 + torch.sigmoid(self.beta)) * x, self.alpha.clamp(0.01, 0.99) * x)

# =============================================================================
# Appendix F. A small ViT with timm's names, and pretrained weights
#
# The paper fine-tunes "ViT-Tiny pretrained on ImageNet-1K": pre-norm blocks of attention and an
# MLP with exact GELU, a class token whose final state feeds the head. The modules below use
# exactly timm's attribute names, so a timm state dict loads with no renaming. `layer_scale=True`
# adds the per-channel LayerScale of DeiT-III and DINOv2 (`ls1.gamma`, `ls2.gamma`).
# =============================================================================

VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}   # width, depth, heads


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=192):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):                        # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)       # rows: q | k | v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                      # the activation NoRA replaces
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4, layer_scale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with timm's module names. ``size`` is 'tiny', 'small' or 'base' (VIT_SIZES); ``depth``
    overrides the size's block count (fewer blocks make quick experiments and tests)."""

    def __init__(self, size="tiny", patch_size=16, img_size=224, num_classes=1000, layer_scale=False, depth=None):
        super().__init__()
        dim, full_depth, heads = VIT_SIZES[size]
        depth = depth or full_depth
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        num_patches = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, layer_scale=layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])   # class-token pooling


# Pretrained weights as data, in the spirit of timm's `_cfg`: each record names a checkpoint on
# the Hugging Face hub (timm's name, so the URL follows from it) and holds what the checkpoint
# needs: the ViT's size, patch size and LayerScale, and the input normalisation it was trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRETRAINED = {
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k":          # the default: ViT-Tiny, ImageNet-21k then 1k
        dict(size="tiny", patch_size=16, layer_scale=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "deit_tiny_patch16_224.fb_in1k":                      # ViT-Tiny, ImageNet-1k only, same layout
        dict(size="tiny", patch_size=16, layer_scale=False, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "vit_small_patch14_dinov2.lvd142m":                   # DINOv2 ViT-S/14: LayerScale, no head
        dict(size="small", patch_size=14, layer_scale=True, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
DEFAULT_WEIGHTS = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def weights_url(name):
    """The hub URL of a PRETRAINED record's checkpoint."""
    return f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"


def create_vit(name=DEFAULT_WEIGHTS, **kwargs):
    """A VisionTransformer shaped for the PRETRAINED record ``name``; ``kwargs`` (img_size,
    num_classes, depth) go to VisionTransformer. Load its weights with load_pretrained(model, name)."""
    cfg = PRETRAINED[name]
    return VisionTransformer(cfg["size"], cfg["patch_size"], layer_scale=cfg["layer_scale"], **kwargs)


def load_pretrained(model, source=DEFAULT_WEIGHTS, cache_dir=None, verbose=True):
    """Load a timm-layout checkpoint into ``model`` (a VisionTransformer, or any module with timm's names).

    ``source`` is a name in PRETRAINED (build the model from its record), a local .safetensors,
    .pth/.bin or .npz file, or a URL (downloaded once and cached, see :func:`download`). The
    position embedding is resampled to the model's image size; a head for another number of
    classes (or none) leaves the model's own head in place.
    """
    source = weights_url(source) if source in PRETRAINED else source
    url = str(source).startswith(("http://", "https://"))
    path = download(source, cache_dir) if url else source
    try:
        state = read_checkpoint(path)
    except ValueError as e:
        if url:                                           # a bad download must not stay in the cache
            Path(path).unlink(missing_ok=True)
            raise ValueError(f"{e}\n(the downloaded copy was deleted: run again to download it anew)") from None
        raise
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    found = state.get("head.weight")
    if found is None or "head.weight" not in own or found.shape != own["head.weight"].shape:
        state.pop("head.weight", None)
        state.pop("head.bias", None)
        if verbose and "head.weight" in own:
            had = f"a head for {found.shape[0]} classes" if found is not None else "no head"
            print(f"load_pretrained: checkpoint has {had}; keeping the model's new "
                  f"{own['head.weight'].shape[0]}-class head (randomly initialised)")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        if url:                                           # nor a download that fits no model
            Path(path).unlink(missing_ok=True)
        raise ValueError(f"load_pretrained: {path} does not match this model (is the size, patch size or "
                         f"layer_scale right?)\n  shape mismatches: {bad[:5]}\n  missing: {missing[:5]}\n"
                         f"  unexpected: {unexpected[:5]}" + ("\n(the downloaded copy was deleted)" if url else ""))
    model.load_state_dict(state, strict=False)
    return model


def resample_pos_embed(pos_embed, grid_size):
    """Resize the patch part of a (1, 1 + h*w, D) position embedding to ``grid_size``, bicubically,
    as timm does; the class-token position is kept as it is."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.sqrt(patch_pos.shape[1]))
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=grid_size, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls_pos.float(), patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def download(url, cache_dir=None, sha256=None):
    """Download ``url`` once into the cache and return the local path.

    The cache is ``cache_dir``, else $NORA_CACHE, else ~/.cache/nora. torch.hub's downloader
    writes to a temporary file, shows progress and, given ``sha256``, checks the file before
    moving it into place, so an interrupted download never leaves a file behind.
    """
    cache_dir = Path(cache_dir or os.environ.get("NORA_CACHE") or Path.home() / ".cache" / "nora")
    name = Path(urllib.parse.urlparse(url).path).name or "download"      # no ?query in the file name
    dest = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name[-200:]}"   # (file names end at 255 bytes)
    if dest.exists():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256, progress=sys.stderr.isatty())
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}).\nIf this machine is offline, download the file on one that "
            f"is online and pass its local path instead (load_pretrained(model, 'path/to/file'), or "
            f"--weights path/to/file in train_vit.py), or copy it to {dest}") from None
    except RuntimeError as e:                             # torch.hub: the sha256 did not match
        raise RuntimeError(f"download of {url} is corrupt ({e}); try again") from None
    return dest


def read_checkpoint(path):
    """A state dict in timm names from a .safetensors, .pth/.pt/.bin or .npz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a .safetensors, .pth, .bin or .npz file, "
                                f"a URL to download, or a name in PRETRAINED: {', '.join(PRETRAINED)}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix == ".npz":
        import numpy as np
        try:
            w = np.load(path, allow_pickle=False)         # (an .npy under an .npz name is an array, not an archive)
            if not isinstance(w, np.lib.npyio.NpzFile):
                raise ValueError(f"it holds one {type(w).__name__}, not an archive of arrays")
            with w:
                return _from_big_vision(w)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path} is not a ViT .npz in Google's layout ({type(e).__name__}: {e}); "
                             f"download it again, or pass another file") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                # pickle, zip and "unsafe global" errors alike
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                         f"download it again, or pass another file") from None
    for key in ("model", "state_dict"):                 # training checkpoints wrap the weights
        state = state.get(key, state) if isinstance(state, dict) else state
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(state).__name__}); "
                         f"pass a file of model weights")
    return state


def _from_big_vision(w):
    """Google's original ViT .npz (vit_jax layout, e.g. the augreg release) to timm names."""
    pre = "opt/target/" if "opt/target/embedding/kernel" in w else ""
    t = lambda k: torch.from_numpy(w[pre + k])
    sd = {"patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),   # HWIO -> OIHW
          "patch_embed.proj.bias": t("embedding/bias"),
          "cls_token": t("cls"),
          "pos_embed": t("Transformer/posembed_input/pos_embedding"),
          "norm.weight": t("Transformer/encoder_norm/scale"),
          "norm.bias": t("Transformer/encoder_norm/bias")}
    if pre + "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = t("head/kernel").T, t("head/bias")
    i = 0
    while f"{pre}Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = src + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[dst + norm + ".weight"], sd[dst + norm + ".bias"] = t(src + ln + "/scale"), t(src + ln + "/bias")
        # q, k, v kernels are (dim, heads, head_dim): flatten the heads, transpose to (out, in), stack
        sd[dst + "attn.qkv.weight"] = torch.cat([t(mha + n + "/kernel").flatten(1).T for n in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat([t(mha + n + "/bias").flatten() for n in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = t(mha + "out/kernel").flatten(0, 1).T
        sd[dst + "attn.proj.bias"] = t(mha + "out/bias")
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            sd[dst + f"mlp.{fc}.weight"] = t(src + f"MlpBlock_3/{dense}/kernel").T
            sd[dst + f"mlp.{fc}.bias"] = t(src + f"MlpBlock_3/{dense}/bias")
        i += 1
    return sd
