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
  3. NoRA: a low-rank update of the coefficients      paper Sec. 3, Eqs. 7, 8
  4. LoRA, for NoRA++                                  paper Eqs. 2, 3
  5. Putting adapters on a model
The appendices hold the machinery, written with torch and the standard library alone (nora.py
needs nothing else: no timm, safetensors or peft), and what the scripts build on:
  A. Kernels and speed
  B. Reading other people's models
  C. Checks, files and the fit's optimiser
  D. A small ViT with timm's names, and its weights (what train_vit.py fine-tunes)
"""
import collections.abc
import hashlib
import json
import math
import numbers
import os
import stat
import struct
import sys
import tempfile
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
# "Group-wise" (Sec. 3, after Group-KAN): one rational per channel is expensive and one per layer
# too rigid, so the C channels (the last dimension, or `dim`: 1 for an (N, C, H, W) feature map)
# are cut into G contiguous groups that each share one rational, so the coefficients are two
# matrices, whatever the size of x: `numerator` (G, m+1) holds a_0 .. a_m of each group and
# `denominator` (G, n) holds b_1 .. b_n. In this file those two names always mean coefficient
# matrices, never the values P(x), Q(x).
#
# `rational_reference` is Eq. 6 as written, autograd doing the rest. `rational` computes the same
# function (the tests check it against the reference, gradients included) with kernels that keep
# only x for backward (this file's Appendix A), and is what every module below calls.
# -----------------------------------------------------------------------------

def rational_reference(x, numerator, denominator):
    """Eq. 6 as written: sum_i a_i x^i / (1 + |sum_j b_j x^j|) per group, over the last dimension.
    Slow and memory-hungry, but plainly right: the tests check `rational` against it."""
    xg = x.reshape(*x.shape[:-1], numerator.shape[0], -1)                     # (..., G, C/G)
    P = sum(numerator[:, i, None] * xg ** i for i in range(numerator.shape[1]))
    S = sum(denominator[:, j, None] * xg ** (j + 1) for j in range(denominator.shape[1]))
    return (P / (1 + S.abs())).reshape(x.shape)


def rational(x, numerator, denominator, dim=-1):
    """Eq. 6 for x of any shape, its dimension ``dim`` (the last, or 1 for an (N, C, H, W) map) holding
    C channels cut into G groups; numerator (G, m+1) holds a_0 .. a_m and denominator (G, n) b_1 .. b_n.
    Half-precision inputs are computed in float32 (x^5 overflows float16 for |x| > 9.2) and cast
    back, so it is safe under autocast. A contiguous input gives a contiguous output."""
    _check_rational_inputs(x, numerator, denominator, dim)
    C, contiguous = x.shape[dim], x.is_contiguous()
    if x.numel() == 0:
        return x.clone()
    x = x.movedim(dim, -1)                                # the kernels take channels last
    dtype = torch.promote_types(x.dtype, torch.float32)   # the kernels compute in this, return x's dtype
    numerator, denominator = numerator.to(dtype), denominator.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if torch.jit.is_tracing():                        # torch.jit.trace, torch.onnx.export: plain Eq. 6 in the graph
            return rational_reference(x.to(dtype), numerator, denominator).to(x.dtype).movedim(-1, dim)
        y = _RationalFunction.apply(x.reshape(-1, C), numerator, denominator).view(x.shape).movedim(-1, dim)
    return y.contiguous() if contiguous else y

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
# w = 1/Q_prev (times sqrt(weight(x))), solve
#       min || w (P(x) - f(x) S(x) - f(x)) ||      (since f = P/(1+S)  <=>  P - f S = f)
# and repeat. That fits P/(1+S), which is the module's P/(1+|S|) only where S >= 0 (GELU, SiLU
# and ReLU, but not Hardswish: max |error| 13.9 on [-8, 8]). So Levenberg-Marquardt (Appendix C)
# then minimises the true form's weighted error, from that start and from it with each b_j made
# positive, keeping the better: there are several minima (ReLU6 unweighted on [-8, 8]: the second
# start's max error is 0.19 against 0.27; at the defaults the first's, 0.49 against 0.97).
# -----------------------------------------------------------------------------

def preactivation_weight(x):
    """Where a pretrained ViT's GELU inputs lie, roughly (a real ViT-S's have sd 1.2 and a long negative
    tail): a normal density of sd 1.5, plus a floor of 1e-3 that keeps the fit close on the whole range."""
    return torch.exp(-0.5 * (x / 1.5) ** 2) + 1e-3


def fit_rational(fn, num_degree=5, den_degree=4, x_range=(-12.0, 12.0), weight=preactivation_weight,
                 points=4001, iters=30, warn_above=0.01):
    """(numerator (num_degree+1,), denominator (den_degree,)), float64, of Eq. 6's P/(1+|S|) minimising
    the sum of weight(x) (P/Q - fn)^2 over a grid on ``x_range`` (``weight=None``: unweighted). Warns
    where the fit is off by more than ``warn_above`` times max |fn| somewhere on the range."""
    num_degree, den_degree, iters, points = _check_fit(num_degree, den_degree, iters, points, x_range)
    x = torch.linspace(*map(float, x_range), points, dtype=torch.float64)
    f = fn(x)
    if not (isinstance(f, torch.Tensor) and f.shape == x.shape and f.is_floating_point()
            and f.isfinite().all()):
        raise ValueError(f"fit_rational: fn must map x (a 1-D float64 tensor) to finite values of its shape on "
                         f"{x_range}; got {type(f).__name__} {tuple(getattr(f, 'shape', ()))}")
    V = x[:, None] ** torch.arange(num_degree + 1)       # columns x^0 .. x^m
    W = x[:, None] ** torch.arange(1, den_degree + 1)    # columns x^1 .. x^n
    weights = torch.ones_like(x) if weight is None else weight(x)
    if not (torch.isfinite(weights).all() and (weights >= 0).all() and weights.any()):
        raise ValueError("fit_rational: weight(x) must be finite and >= 0, and > 0 somewhere")
    w = root_weight = weights.sqrt()
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
# they drift linearly: the GELU rational gives -1.2 at -20 and 18.8 at +20. Do not use Group-KAN's
# published GELU numbers: they were fitted on [-3, 3] and are off by 6 on [-6, 6].
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
COEFFS = {"gelu": GELU_COEFFS, "gelu_tanh": GELU_TANH_COEFFS, "silu": SILU_COEFFS, "relu": RELU_COEFFS}
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}

# -----------------------------------------------------------------------------
# 3. NoRA: low-rank updates of the rational coefficients (Sec. 3, Eqs. 7, 8)
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
# layer: 52 at G = 8, r = 2, against 80 for tuning the coefficients directly (Table 4's "rational
# tuning"), and more groups cost only 2 r numbers each. The paper's Eq. 8 instead gives each group its own
# A_g in R^{d x r} and B_g in R^{r x 1}, a free d-vector per group ("per_group" form: 192 numbers
# at G = 8, r = 2). As in LoRA, A starts as small noise (Sec. 3: A ~ N(0, 0.02)) and B at zero,
# so at step 0 phi' is exactly the base rational: training starts from the pretrained model with
# each GELU replaced by its fit.
#
# Besides the released code's choices (no b_0, the shared form), one departure is ours: the update
# is learned in the basis (x/s)^i, s = 3. `_delta` divides column i of B A by s^i, so NoRA learns
# dP(x) = sum_i dp_i (x/s)^i, i.e. da_i = dp_i / s^i:
# the same functions (merge folds it into plain coefficients), but well conditioned. GELU's tails
# hang on tiny leading coefficients (a_5 = 5.3e-4, b_4 = 1.1e-3), yet over a real ViT's inputs the
# output is 290 times more sensitive to a_5 than to a_1. Adam moves every entry of A and B by about
# the same step, so in monomials the first steps change a_5 and b_4 by more than their own size;
# at s = 3 they span 6.5x instead (fit_gelu.py --model prints both). `basis_scale=1` is the paper's.
# -----------------------------------------------------------------------------

class NoRA(nn.Module):
    """Rational activation with frozen base coefficients and a trainable rank-``rank`` update, scaled by
    alpha / rank (default alpha = 2 * rank: the released code's 6 at r = 3). ``init``: the base, a name
    in COEFFS or a (numerator, denominator) pair of 1-D or (G, .) tensors. ``form``: 'shared' (the
    released code's dP = B @ A, A shared by the groups) or 'per_group' (the paper's dP_g = A_g B_g).
    ``basis_scale``: s of the basis (x/s)^i (3 is ours, 1 the paper's monomials). ``channel_dim``: -1,
    or 1 for an (N, C, H, W) map; add_nora sets it. Train under autocast, not ``model.half()``, which
    rounds the base too (the GELU fit's max error on [-8, 8]: 0.0165; float16 0.0158, bfloat16 0.0169)."""

    def __init__(self, groups=8, rank=2, alpha=None, init="gelu", form="shared", basis_scale=3.0, channel_dim=-1):
        super().__init__()
        rank, alpha, basis_scale = _check_arguments(rank, alpha, form, basis_scale)
        num, den = _init_coefficients(init, groups)
        groups = num.shape[0]
        self.register_buffer("numerator", num)            # frozen base coefficients P_g, Q_g
        self.register_buffer("denominator", den)
        self.rank, self.form = rank, form
        self.scaling = (alpha if alpha is not None else 2 * rank) / rank
        self.basis_scale, self.channel_dim = basis_scale, _check_axis(channel_dim, "NoRA: channel_dim")
        # what it replaced, set by add_nora: its path (for errors), the module's class, function and widths
        self.where, self.replaced, self.channels = "NoRA", None, None
        self.function = init if isinstance(init, str) and init in ACTIVATIONS else None
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
        """The adapted coefficients (P + dP, Q + dQ) of Eq. 7, each (G, .), in float32 at least: each entry's
        gradient sums over a group's activations (millions), which can overflow float16."""
        with torch.autocast(self.A_P.device.type, enabled=False):
            return (self.numerator + self._delta(self.A_P, self.B_P, 0),
                    self.denominator + self._delta(self.A_Q, self.B_Q, 1))

    def forward(self, x):
        try:
            return rational(x, *self.coefficients(), dim=self.channel_dim)
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

    def extra_repr(self):
        return (f"groups={self.numerator.shape[0]}, rank={self.rank}, scaling={self.scaling:g}, "
                f"form={self.form}, basis_scale={self.basis_scale:g}, channel_dim={self.channel_dim}")

# -----------------------------------------------------------------------------
# 4. LoRA, for NoRA++ (Eqs. 2, 3)
#
# LoRA learns W = W0 + B A * alpha / r with A (r x k) random and B (d x r) zero (Eq. 2) and
# computes W0 x + B (A x) without forming B A (Eq. 3). timm fuses q, k and v into one `qkv`
# linear; LoRA on "q and v" (the paper's LoRA baseline, C.1, which NoRA++ here adds to NoRA) is
# then two updates on two ranges of rows of that one weight, so `row_ranges` lists the (start,
# stop) ranges of output rows to adapt, each with its own A and B. `fan_in_fan_out` (loralib's
# name) says the base stores its weight (in, out), as GPT-2's Conv1D does, not nn.Linear's (out, in).
# -----------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A linear ``base`` (freeze() freezes it) plus a LoRA update on all its output rows, or on the (start,
    stop) ranges in ``row_ranges``. ``fan_in_fan_out``: the base computes x @ weight (HF's Conv1D)."""

    def __init__(self, base, rank=8, alpha=16, row_ranges=None, fan_in_fan_out=False):
        super().__init__()
        rank, alpha = _positive_int(rank, "LoRALinear: rank"), _positive_number(alpha, "LoRALinear: alpha")
        w = base.weight
        out_features, in_features = w.T.shape if fan_in_fan_out else w.shape
        ranges = _check_rows(row_ranges, out_features, "LoRALinear") or [(0, out_features)]
        width = ranges[0][1] - ranges[0][0]
        self.base, self.rank, self.scaling, self.merged = base, rank, alpha / rank, False
        self.row_ranges, self.fan_in_fan_out = ranges, bool(fan_in_fan_out)
        self.lora_A = nn.Parameter(torch.empty(len(ranges), rank, in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(len(ranges), width, rank, device=w.device, dtype=w.dtype))
        for A in self.lora_A:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))     # as in microsoft/LoRA

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
        """``w`` (in the base's layout) plus ``delta`` on its adapted rows, in place."""
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
        """Fold B A into the base weight; A and B stop training (they no longer reach the output)."""
        if not isinstance(self.base.weight, nn.Parameter):   # e.g. a quantised weight rebuilt at each call
            raise TypeError(f"LoRALinear.merge: the base {type(self.base).__name__} has no stored weight to "
                            f"merge into (a quantised layer?); keep the model unmerged")
        if not self.merged:
            self.base.weight.copy_(self.weight)
            self.merged, self.trained = True, (self.lora_A.requires_grad, self.lora_B.requires_grad)
            self.lora_A.requires_grad_(False), self.lora_B.requires_grad_(False)

    @torch.no_grad()
    def unmerge(self):
        """Take B A out of the base weight again; A and B train as they did before merge."""
        if self.merged:
            self._add_to_weight(self.base.weight, -self.delta_weight())
            self.merged = False
            self.lora_A.requires_grad_(self.trained[0]), self.lora_B.requires_grad_(self.trained[1])

    def extra_repr(self):
        return (f"rank={self.rank}, scaling={self.scaling:g}, row_ranges={self.row_ranges}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))

# -----------------------------------------------------------------------------
# 5. Putting adapters on a model
#
# On a model you know, sections 1-4 are all you need:
#       for block in model.blocks:
#           block.mlp.act = NoRA(groups=8, rank=2)       # GELU's rational, plus a zero update
#       freeze(model, "head")                            # all but the adapters and the head
#       ... train; then merge(model): one plain rational per activation
# `add_nora` is that loop for models you do not know, where three things must be right, each found
# by one sure means or asked for (Appendix B): the function each activation computes (from its
# class), the axis of its input that holds the channels (seen on one run of `example`), and for
# LoRA the layout of a layer's weight (by class). A refusal comes before any module is replaced
# and lists every module in trouble with the call to make. An adapter file holds the tensors and
# each adapter's settings: as with any state dict, build the model first (the same add_* calls),
# and load_adapter loads exactly what those adapters own.
# -----------------------------------------------------------------------------

ADAPTERS = (NoRA, LoRALinear)                             # what freeze() leaves trainable


def freeze(model, *trainable):
    """requires_grad=False for every parameter but the adapters' own (left as they are) and those under
    ``trainable`` (module paths such as 'head', or parameter names). add_* freeze nothing: call it after."""
    inner = _unwrap(model)
    trainable = _extra_names(inner, trainable, (), "freeze: trainable")
    own = {id(p) for m in inner.modules() if isinstance(m, ADAPTERS) for p in m.parameters(recurse=False)}
    chosen = {id(p) for n, p in inner.named_parameters(remove_duplicate=False) if _under(n, trainable)}
    for p in inner.parameters():
        p.requires_grad_(id(p) in own and p.requires_grad or id(p) in chosen)
    return model


def count_parameters(model):
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def add_nora(model, groups=8, rank=2, *, example, target=("gelu", "gelu_tanh"), init=None, channel_dim=None,
             per_module=None, **nora_kwargs):
    """Replace each activation module of ``model`` that ``target`` names with a :class:`NoRA` whose base
    rational equals it (then :func:`freeze` the rest).

    example: an input for ``model`` (a tensor, a tuple or a dict of arguments), run once in eval mode
        to see each activation's input: its channel axis and the widths ``groups`` must divide.
    target: names in ACTIVATIONS (modules of a known class computing one), or module classes.
    init: the base rational, a name in COEFFS or a fit_rational() pair; None: each module's function's.
    channel_dim: the channels' axis (-1: the last, 1: (N, C, H, W)) where the example cannot show
        it; refused where it contradicts the example.
    per_module: {module path: dict(groups=..., channel_dim=...)} where one value cannot serve all,
        or {module path: None} to leave that module as it is.
    nora_kwargs: alpha, form, basis_scale (see NoRA)."""
    inner = _unwrap(model)                                # (paths as freeze and the files name them)
    plan = _plan_nora(inner, groups, rank, example, target, init, channel_dim, per_module, nora_kwargs)
    _build_in(inner, plan)
    if init is None and any(new.function == "relu" for _, new in plan):   # (the others are within 0.017)
        warnings.warn("add_nora: ReLU's rational is up to 0.18 off on [-8, 8] (0.064 at its kink), so the model's "
                      "outputs move at init; measure the change on your inputs")
    return model


def add_lora(model, rank=8, alpha=16, targets=("qkv",), rows=None, layer=LoRALinear):
    """Put LoRA (``layer``: LoRALinear or a subclass) on each nn.Linear or HF Conv1D of ``model`` whose
    path is one of ``targets`` or ends with "." and one of them, on all its output rows or on those
    ``rows`` gives, {target: [(start, stop), ...]} of equal widths (the q and v of a fused q | k | v,
    as in the paper's C.1: [(0, d), (2 * d, 3 * d)] for timm's and our `qkv`)."""
    inner = _unwrap(model)                                # (paths as freeze and the files name them)
    _build_in(inner, _plan_lora(inner, rank, alpha, targets, rows, layer))
    return model


def merge(model):
    """Fold every NoRA and LoRA update into its base, in place: the same outputs at the base model's cost.
    Merged LoRA stops training and is in no adapter tensor: save before merge. A refusal unmerges the
    LoRA merged before it (NoRA merged before it computes what it did)."""
    done = []
    try:
        for m in model.modules():
            if isinstance(m, ADAPTERS):
                m.merge()                                 # (a merged NoRA computes what it did: nothing to undo)
                done.append(m)
    except Exception:
        for m in done:
            if isinstance(m, LoRALinear):
                m.unmerge()
        raise
    return model


def adapter_state_dict(model, extra=None, statistics=None):
    """What a fine-tune changed: the adapters' tensors, those under ``extra`` (default: 'head' and every
    trainable parameter) and, with ``statistics=True``, the BatchNorm statistics that training in train
    mode moves (a model that has them must say True or False). Refused after a LoRA merge."""
    model = _unwrap(model)
    trained = (n for n, p in model.named_parameters() if p.requires_grad)
    extra = _extra_names(model, extra, ("head", *trained), "adapter_state_dict: extra")
    merged = [p for p, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise ValueError(f"adapter_state_dict: {merged[:3]} are merged: their update is in the base weights, in no "
                         f"adapter tensor; save before merge (a merged LoRALinear can unmerge())")
    stats = _running_statistics(model)
    if stats and statistics is None:
        raise ValueError("adapter_state_dict: the model has BatchNorm statistics, which training in train mode "
                         "moves: pass statistics=True to keep them, or statistics=False if they did not train")
    state = model.state_dict()
    keep = _adapter_keys(model) | {k for k in state if _under(k, extra)} | (stats if statistics else set())
    lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in keep]
    if lost:
        raise ValueError(f"adapter_state_dict: {lost[:4]} train but are no adapter's and not under extra={extra}; "
                         f"name their module in extra= (e.g. its classifier) or freeze them")
    return {k: v.detach().clone() for k, v in state.items() if k in keep}


def save_adapter(model, path, extra=None, statistics=None, metadata=None):
    """Write :func:`adapter_state_dict` to a .safetensors file (atomically), with every adapter module's
    settings for load_adapter to check; ``metadata``: more {str: str} to keep."""
    state = adapter_state_dict(model, extra, statistics)
    write_safetensors(path, state, {**(metadata or {}), "nora": json.dumps(_describe(_unwrap(model)))})
    return state


def load_adapter(model, path, extra=None, statistics=False):
    """Load a :func:`save_adapter` file into ``model``, which must hold the same adapters (make the same
    calls first, as for any state dict): their tensors, those under ``extra`` (default 'head') and, with
    ``statistics=True``, BatchNorm statistics; anything else, NaN, inf and |x| > 1e6 are refused first."""
    model = _unwrap(model)
    extra = _extra_names(model, extra, ("head",), "load_adapter: extra")
    state, theirs = read_adapter(path)
    if any(isinstance(m, LoRALinear) and m.merged or any(p.is_meta for p in m.parameters(recurse=False))
           for m in model.modules()):
        raise ValueError("load_adapter: the model's LoRA is merged, so a loaded update would not count, or it is on "
                         "the meta device (model.to_empty(device=...) it first); load before merge")
    mine = _describe(model)
    if mine != theirs:
        differ = [f"{p}: {theirs.get(p, 'none')} in the file, {mine.get(p, 'none')} here"
                  for p in sorted(set(mine) | set(theirs)) if mine.get(p) != theirs.get(p)]
        raise ValueError(f"load_adapter: the model does not hold the file's adapters ({len(differ)} modules differ: "
                         f"{'; '.join(differ[:3])}). Make the add_nora and add_lora calls that made them on the plain "
                         f"model first (nora.read_adapter(path)[1] lists them)")
    _check_adapter_state(model, state, extra, statistics)
    model.load_state_dict(state, strict=False)
    return model


# =============================================================================
# Appendix A. Kernels and speed
#
# Nothing here changes a result. Autograd would keep every power of x for backward, so the
# kernels evaluate P and Q by Horner's rule, a0 + x(a1 + x(a2 + ...)), with a hand-written
# backward that keeps only x and recomputes, in place where it can, on x viewed as (N, C) with each
# group's coefficients repeated to one row per channel, (k, C): every sum runs along contiguous
# memory. `_kernels` holds what `rational` runs: on a CPU the eager kernels take x in chunks, so
# their dozen passes run from cache; train_vit.py's use_compiled_rational puts fused ones here.
# =============================================================================

def _per_channel(coeffs, channels):
    """(G, k) group coefficients -> (k, C): row i holds coefficient i of each channel's group."""
    return coeffs.repeat_interleave(channels // coeffs.shape[0], dim=0).T.contiguous()


def _horner(x, c, derivative=False):
    """p(x) = c0 + c1 x + ... (and p'(x) if asked) for x (N, C) and per-channel coefficients c (k >= 2, C)."""
    p = torch.addcmul(c[-2], c[-1], x)                    # c_{k-2} + c_{k-1} x (c has k rows): a new tensor
    dp = c[-1].expand_as(x).clone() if derivative else None   # its derivative, as a tensor of its own
    for ci in c.flip(0)[2:]:
        if derivative:                                    # (p x + c)' = p + x p'
            dp = torch.addcmul(p, dp, x, out=dp)
        p = torch.addcmul(ci, p, x, out=p)                # p x + c_i
    return (p, dp) if derivative else p


def _rational_forward(x, numerator, denominator):
    """y = P(x) / (1 + |x s(x)|), S(x) = x s(x), computed in the coefficients' dtype, returned in x's."""
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
    """Autograd glue for the kernels above, which have no second derivative (create_graph=True) and no
    torch.func rules: both are refused. rational_reference has them."""

    @staticmethod
    def forward(ctx, x, numerator, denominator):
        ctx.save_for_backward(x, numerator, denominator)
        ys = [_kernels["forward"](x[c], numerator, denominator) for c in _chunks(x)]
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():                       # create_graph=True: refused, not silently zero
            raise RuntimeError("rational: the kernels have no second derivative; differentiate rational_reference")
        x, numerator, denominator = ctx.saved_tensors
        grad, needs = grad.contiguous(), tuple(ctx.needs_input_grad)
        parts = [_kernels["backward"](x[c], numerator, denominator, grad[c], needs) for c in _chunks(x)]
        if len(parts) == 1:
            return parts[0]
        x_grads, num_grads, den_grads = zip(*parts)
        return (torch.cat(x_grads) if needs[0] else None, sum(num_grads) if needs[1] else None,
                sum(den_grads) if needs[2] else None)


_EAGER = {"forward": _rational_forward, "backward": _rational_backward, "chunk": 1 << 18}
_kernels = dict(_EAGER)


def _chunks(x):
    """Row slices of x (N, C) that the kernels take one at a time."""
    chunk = _kernels["chunk"]
    rows = max(1, chunk // x.shape[1]) if chunk and x.device.type == "cpu" else len(x)
    return [slice(i, i + rows) for i in range(0, len(x), rows)]

# =============================================================================
# Appendix B. Reading other people's models
#
# What add_nora and add_lora learn from a model, each by one means that cannot be fooled, and
# asked for where it does not tell:
#   - an activation's function: from its class (ACTIVATION_CLASSES), never by calling the module;
#   - its channel axis: hooks on one run of the example see the outputs of layers whose layout is
#     certain (a linear layer's channels are last, a convolution's and a BatchNorm's on dim 1); an
#     activation's input takes their axis only if it is one of them, or a view of one that keeps
#     the axis whole (a reshape, a transpose; not a chunk, a copy or a product);
#   - a weight's layout: by class, (out, in) in nn.Linear and (in, out) in HF's Conv1D. Which rows of
#     a fused q | k | v are q and v no class says for sure: LoRA adapts them all, or the rows given.
# Activations called as functions (F.gelu inside forward) cannot be replaced.
# =============================================================================

# Activation classes whose source we have read, by full name, and the function each computes.
ACTIVATION_CLASSES = {
    "torch.nn.modules.activation.SiLU": "silu", "torch.nn.modules.activation.ReLU": "relu",
    "timm.layers.activations.GELU": "gelu", "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.Swish": "silu", "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.GELUTanh": "gelu_tanh", "transformers.activations.PytorchGELUTanh": "gelu_tanh",
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.FastGELUActivation": "gelu_tanh", "transformers.activations.SiLUActivation": "silu",
    "transformers.models.bloom.modeling_bloom.BloomGelu": "gelu_tanh",
}


def activation_name(module):
    """The name in ACTIVATIONS of the function ``module`` computes, known from its class; else None."""
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return ACTIVATION_CLASSES.get(_full_name(type(module)))


def _plan_nora(model, groups, rank, example, target, init, channel_dim, per_module, nora_kwargs):
    """[(path, NoRA)] for every activation add_nora replaces, all checked and built before any goes in."""
    groups, per_module = _positive_int(groups, "add_nora: groups"), _check_per_module(per_module)
    channel_dim = None if channel_dim is None else _check_axis(channel_dim, "add_nora: channel_dim")
    _check_arguments(rank, **nora_kwargs)
    if example is None:
        raise ValueError("add_nora: pass example=, an input for the model (a tensor, a tuple or a dict of "
                         "arguments): it runs once to see each activation's channel axis and widths")
    found = _find_activations(model, target, init, per_module)
    seen = _probe(model, example, [m for m, _ in found.values()])
    plan, trouble = [], []
    for path, (m, function) in found.items():
        own = per_module.get(path, {})
        if own is None:                                   # per_module says: leave it as it is
            continue
        g = own.get("groups", groups)
        dim, widths, said = _settle(path, seen[id(m)], g, own.get("channel_dim", channel_dim))
        trouble += [f"{path} ({type(m).__name__}) {s}" for s in said]
        if not trouble:
            new = NoRA(g, rank, init=init or function, channel_dim=dim, **nora_kwargs).train(m.training)
            new.where, new.replaced, new.channels, new.function = path, _full_name(type(m)), widths, function
            plan.append((path, new.to(seen[id(m)][0][2])))      # where its input was (models across devices)
    if trouble:
        raise ValueError("add_nora: " + "\nadd_nora: ".join(trouble[:16]) + f"\n({len(trouble)} modules in all)")
    return plan


def _find_activations(model, target, init, per_module):
    """{path: (module, function name or None)} of every module ``target`` names (at its first path)."""
    targets = (target,) if isinstance(target, (str, type)) else tuple(target)
    if not targets or not all(t in ACTIVATIONS if isinstance(t, str) else isinstance(t, type) for t in targets):
        raise ValueError(f"add_nora: target must name functions in {list(ACTIVATIONS)} or module classes, "
                         f"got {target!r}")
    found, shared = {}, _shared(model)
    for path, m in model.named_modules():
        function = activation_name(m)
        if path and (type(m) in targets or function in targets):
            if id(m) in shared:
                raise ValueError(f"add_nora: one {type(m).__name__} module is used at {shared[id(m)]}: a NoRA would "
                                 f"adapt one of those places; give each its own module (copy.deepcopy)")
            if any(m.children()) or next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise ValueError(f"add_nora: {path} is a {type(m).__name__}, which holds parameters, buffers or "
                                 f"modules: no activation NoRA may replace; leave its class out of target")
            if function is None and init is None:
                raise ValueError(f"add_nora: {path} is a {type(m).__name__}, whose function add_nora does not know; "
                                 f"pass init=nora.fit_rational(fn) with fn its function (or init='gelu')")
            found[path] = m, function
    if not found:
        names = " or ".join(t if isinstance(t, str) else t.__name__ for t in targets)
        has = sorted({type(m).__name__ + (f" ({activation_name(m)})" if activation_name(m) else "")
                      for m in model.modules() if not any(m.children()) and next(m.parameters(), None) is None})
        raise ValueError(f"add_nora: the model has no {names} module; its parameter-free modules are {has}: pass "
                         f"target= a function they compute, or target=TheirClass, init=nora.fit_rational(fn) (NoRA "
                         f"modules are not replaced again; for F.gelu called in forward, give the model a module)")
    if set(per_module) - set(found):
        raise ValueError(f"add_nora: per_module names {sorted(set(per_module) - set(found))}, which are not "
                         f"activations it replaces; those are {list(found)[:8]}")
    return found


def _settle(path, calls, groups, given):
    """(channel axis, widths, troubles) of one activation from ``calls``, [(shape, axis seen, device)] of
    its inputs on the example: the axis seen, else the one ``given``, one in every call."""
    fix = lambda **own: f"; pass per_module={{'{path}': dict({', '.join(f'{k}={v}' for k, v in own.items())})}}"
    if not calls:
        return None, None, [f"did not run on the example: add_nora replaces only what it sees run; pass an example "
                            f"that runs it, or per_module={{'{path}': None}} to leave it"]
    dims = set()
    for shape, axis, _ in calls:
        if axis is None and given is None:
            return None, None, [f"gets {shape} inputs whose channel axis no layer's output shows (a chunk, a copy or a "
                                f"product reached it): say which axis holds its channels" + fix(channel_dim="...")]
        if axis is not None and given is not None and given % len(shape) != axis % len(shape):
            return None, None, [f"gets its channels on axis {axis} of its {shape} input, not on channel_dim={given}"
                                + fix(channel_dim=axis)]
        if not -len(shape) <= (given if axis is None else axis) < len(shape):
            return None, None, [f"gets {shape} inputs, which have no axis {given}" + fix(channel_dim="...")]
        dims.add((given if axis is None else axis) % len(shape) - len(shape))   # (-1: channels last, any rank)
    if len(dims) > 1:
        return None, None, [f"gets its channels on different axes {sorted(dims)}: one NoRA cannot serve both"]
    dim = dims.pop()
    widths = sorted({shape[dim] for shape, _, _ in calls})
    if any(w % groups for w in widths):
        fits = max(d for d in range(1, groups + 1) if all(w % d == 0 for w in widths))
        return None, None, [f"acts on {widths} channels, which cannot be split into {groups} equal groups"
                            + fix(groups=fits)]
    return dim, widths, []                                # counted from the end: the same for a batch of one


def _output_axis(layer):
    """The axis of ``layer``'s output that holds its channels, for layers whose layout is certain; else None."""
    if _plain(layer, nn.Linear, nn.Embedding) or _full_name(type(layer)) in (CONV1D, *LINEARS) or (
            type(layer) is nn.LayerNorm and len(layer.normalized_shape) == 1):   # (over several axes: no channels)
        return -1
    if _plain(layer, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        return -1 - len(layer.kernel_size)                # (N, C, *spatial) or unbatched (C, *spatial)
    return 1 if _plain(layer, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm) else None


def _plain(module, *classes):
    """Whether ``module`` is one of ``classes``, or of a subclass computing the same (its forward not overridden)."""
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


@torch.no_grad()
def _probe(model, example, activations):
    """{id: [(shape, channel axis, device)]} of each activation's input on one run of the example, put back after."""
    made, seen = [], {id(m): [] for m in activations}     # made: kept alive, so no output is mistaken for another
    record = lambda layer, args, out: made.append((out, _output_axis(layer))) if isinstance(out, torch.Tensor) else None
    hooks = [m.register_forward_hook(record) for m in model.modules() if _output_axis(m) is not None]
    hooks += [m.register_forward_pre_hook(lambda m, args: seen[id(m)].append(_input_of(args, made)))
              for m in activations]
    modes, fast = {m: m.training for m in model.modules()}, torch.backends.mha.get_fastpath_enabled()
    buffers = [(m, k, b, b.clone()) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    args = example if isinstance(example, (tuple, list, collections.abc.Mapping)) else (example,)
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            torch.backends.mha.set_fastpath_enabled(False)   # else nn.TransformerEncoderLayer skips its activation
            model(**args) if isinstance(args, collections.abc.Mapping) else model(*args)
    except Exception as e:
        raise ValueError(f"add_nora: the model fails on the example= input ({type(e).__name__}: {e}); pass an "
                         f"input the model takes (a tensor, a tuple of arguments or a dict)") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, k, b, before in buffers:                   # (a quantisation observer's range, say)
            m._buffers[k] = b.copy_(before)
    return seen


def _input_of(args, made):
    """(shape, channel axis or None, device) of an activation's input: the axis of the output in ``made`` it is,
    or is a view of with that axis whole (its size and stride kept, nothing cut away)."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
    if x is None:
        return (), None, "cpu"
    root = lambda t: t if t._base is None else t._base    # the tensor a view is of (meta tensors too)
    for out, axis in reversed(made):
        if root(out) is root(x):
            axes = [d for d in range(x.dim()) if (x.shape[d], x.stride(d)) == (out.shape[axis], out.stride(axis))]
            whole = len(axes) == 1 and x.numel() == out.numel() and x.storage_offset() == out.storage_offset()
            return tuple(x.shape), axes[0] if whole else None, x.device
    return tuple(x.shape), None, x.device


# Linear layers of other classes whose source we have read: HF's Conv1D stores its weight (in, out);
# Falcon's FalconLinear computes x W^T + b as nn.Linear does, in a forward of its own.
CONV1D, LINEARS = "transformers.pytorch_utils.Conv1D", ("transformers.models.falcon.modeling_falcon.FalconLinear",)


def _plan_lora(model, rank, alpha, targets, rows, layer):
    """[(path, LoRA layer)] for every layer add_lora adapts, all checked and built before any goes in."""
    targets, rows = _check_names(targets, "add_lora: targets"), {} if rows is None else rows
    _positive_int(rank, "add_lora: rank"), _positive_number(alpha, "add_lora: alpha")
    if not isinstance(rows, dict) or set(rows) - set(targets):
        raise ValueError(f"add_lora: rows must be a dict {{target: [(start, stop), ...]}} keyed by targets, "
                         f"got {rows!r}")
    plan, trouble, shared = [], [], _shared(model)
    for path, m in model.named_modules():
        target, parent = _named(path, targets), model.get_submodule(path.rpartition(".")[0]) if path else None
        where = f"{path} ({type(m).__name__})"
        if isinstance(m, nn.MultiheadAttention) and (target or "in_proj" in targets):
            trouble.append(f"{where} keeps q | k | v in a weight of its own, in_proj_weight, that no layer owns, "
                           f"so there is no layer to put LoRA on: target its out_proj, or use separate q, k, v layers")
        if not target or not isinstance(getattr(m, "weight", None), torch.Tensor) or isinstance(parent, LoRALinear):
            continue
        tied = shared.get(id(m)) or shared.get(id(m.weight))
        if tied:
            trouble.append(f"{where} (or its weight) is used at {tied}: LoRA would adapt one place and its merge "
                           f"change all; untie them, or leave it out of targets")
        elif isinstance(m, LoRALinear) or not (_plain(m, nn.Linear) or _full_name(type(m)) in (CONV1D, *LINEARS)):
            trouble.append(f"{where} " + ("has LoRA already" if isinstance(m, LoRALinear) else
                                          "is neither an nn.Linear nor HF's Conv1D (or its forward is its own), so its "
                                          "weight's use is not known: wrap it with LoRALinear(layer, ...)"))
        elif not trouble:
            out_features = m.weight.shape[0 if isinstance(m, nn.Linear) else 1]
            ranges = _check_rows(rows.get(target), out_features, where)
            plan.append((path, layer(m, rank, alpha, ranges, fan_in_fan_out=not isinstance(m, nn.Linear))))
    missing = [t for t in targets if not any(_named(p, (t,)) for p, _ in plan)]   # (a typo beside a good target)
    if trouble or missing:
        names = sorted({p.rpartition(".")[2] for p, m in model.named_modules() if hasattr(m, "weight")})
        raise ValueError("add_lora: " + ("\nadd_lora: ".join(trouble[:16]) if trouble else
                                         f"no linear layer named {' or '.join(missing)}; its layers are named {names}"))
    return [(p, new.train(model.get_submodule(p).training)) for p, new in plan]


def _named(path, names):
    """The one of ``names`` that ``path`` is, or ends with at a "." (so `query_proj` is not `pos_query_proj`)."""
    return next((n for n in names if path == n or path.endswith("." + n)), None)


def _build_in(model, plan):
    """Put each planned adapter into ``model`` in its module's place."""
    for path, new in plan:
        parent, _, name = path.rpartition(".")
        parent = model.get_submodule(parent)
        setattr(parent, name, new)
        if isinstance(parent, nn.TransformerEncoderLayer) and name == "activation":
            parent.activation_relu_or_gelu = 0            # else its eval-mode fast path computes GELU itself


# An adapter file is a .safetensors file of the adapters' tensors (and the head's, ...), its metadata
# describing every adapter module; load_adapter loads it only into adapters of that very description.
def _describe(model):
    """{path: settings} of every adapter module of ``model``."""
    out = {}
    for path, m in model.named_modules():
        if type(m) is NoRA:                               # (placed by hand: function and channels None)
            out[path] = dict(add="nora", function=m.function or m.replaced, rank=m.rank, alpha=m.scaling * m.rank,
                             form=m.form, basis_scale=m.basis_scale, groups=len(m.numerator),
                             degrees=[m.numerator.shape[1] - 1, m.denominator.shape[1]], channel_dim=m.channel_dim,
                             channels=m.channels)
        elif type(m) is LoRALinear:
            out[path] = dict(add="lora", rank=m.rank, alpha=m.scaling * m.rank, rows=m.row_ranges,
                             fan_in_fan_out=m.fan_in_fan_out)
        elif isinstance(m, ADAPTERS):
            raise ValueError(f"adapter file: {path} is a {type(m).__name__}, which load_adapter cannot check; keep it "
                             f"with adapter_state_dict and torch.save")
    return json.loads(json.dumps(out))                    # as a file gives it back: lists, not tuples


def _check_adapter_state(model, state, extra, statistics):
    """Refuse a tensor not an adapter's or under ``extra`` (or a statistic) or tied to one outside, an adapter's
    missing, another shape or dtype kind, NaN, inf, |x| > 1e6, and a file holding nothing for ``extra``."""
    mine, stats, adapters = model.state_dict(), _running_statistics(model), _adapter_keys(model)
    allowed = adapters | {k for k in mine if _under(k, extra) or statistics and k in stats}
    tied = [p for paths in _shared(model).values() if set(paths) & set(state) for p in paths if p not in allowed]
    empty = [n for n in extra if not any(_under(k, (n,)) for k in state)] + ["statistics"] * bool(
        statistics and stats and not stats & set(state))
    if tied or empty:
        raise ValueError(f"load_adapter: {tied[:3]} share a tensor the file writes but are not under extra={extra}; "
                         f"the file holds nothing for {empty} (name in extra= what it holds)")
    strangers, missing = sorted(set(state) - allowed), sorted(adapters - set(state))
    if strangers or missing:
        raise ValueError(f"load_adapter: the file holds {strangers[:4]}, neither the adapters' nor under "
                         f"extra={extra}, and lacks {missing[:4]}: name what it may write in extra= (e.g. "
                         f"'classifier'), statistics=True for BatchNorm statistics; or load it into its own model")
    for k, v in state.items():
        if v.shape != mine[k].shape or v.is_floating_point() != mine[k].is_floating_point():
            raise ValueError(f"load_adapter: the file's {k} is {v.dtype} {tuple(v.shape)}, this model's "
                             f"{mine[k].dtype} {tuple(mine[k].shape)}; load it into the model it was trained on")
        loaded = v.to(mine[k].dtype)
        if v.is_floating_point() and v.numel() and not (loaded.isfinite().all() and loaded.abs().max() <= 1e6):
            raise ValueError(f"load_adapter: {k} holds NaN, inf (as {mine[k].dtype}) or values beyond 1e6: the run "
                             f"that saved it diverged; retrain it")


def _shared(model):
    """{id: paths} of the modules and parameters the model uses at more than one path (tied weights)."""
    paths = {}
    for path, t in [*model.named_modules(remove_duplicate=False), *model.named_parameters(remove_duplicate=False)]:
        paths.setdefault(id(t), []).append(path)
    return {i: p for i, p in paths.items() if len(p) > 1}


def _adapter_keys(model):
    """State-dict keys of every adapter's own tensors (not those of the layers they wrap)."""
    return {(p and p + ".") + k for p, m in model.named_modules() if isinstance(m, ADAPTERS)
            for k in m.state_dict() if not k.startswith("base.")}


def _running_statistics(model):
    """State-dict keys of the running statistics of BatchNorm layers (torchvision's CNNs and MaxViT have them)."""
    return {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            and m.track_running_stats for k, _ in m.named_buffers(recurse=False)}


def _unwrap(model):
    """The model inside torch.compile's, DataParallel's and DistributedDataParallel's wrappers, whose names it has."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers) or isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model.module if isinstance(model, wrappers) else model._orig_mod
    return model


def _extra_names(model, extra, default, who):
    """``extra``'s names, each checked to be in the model (a typo would leave a tensor out); None: those
    of ``default`` in the model."""
    keys = model.state_dict().keys()
    if extra is None:
        return tuple(n for n in default if any(_under(k, (n,)) for k in keys))
    extra = _check_names(extra, who)
    unknown = [n for n in extra if not any(_under(k, (n,)) for k in keys)]
    if unknown:
        raise ValueError(f"{who}: {unknown} name no module or parameter of the model; its modules are "
                         f"{[n for n, _ in model.named_children()][:8]}")
    return extra


def _under(name, paths):
    """Whether the parameter or module ``name`` is one of ``paths`` or inside one (at a ".")."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def _full_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"

# =============================================================================
# Appendix C. Checks, files and the fit's optimiser
#
# Arguments are checked when given, not at the first forward. Safetensors files are read and written
# with the standard library, so no package is needed and nothing in a file can run code.
# =============================================================================

def _init_coefficients(init, groups):
    """(G, m+1) and (G, n) float32 coefficients from a name in COEFFS or a pair of 1-D or (G, .) tensors."""
    groups = _positive_int(groups, "groups")
    if isinstance(init, str) and init not in COEFFS:
        raise ValueError(f"unknown activation {init!r}; known: {sorted(COEFFS)}, "
                         f"or pass (numerator, denominator) tensors, e.g. from fit_rational()")
    init = COEFFS[init] if isinstance(init, str) else init
    try:
        num, den = (torch.as_tensor(c, dtype=torch.float32, device="cpu") for c in init)   # checked here, moved later
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"init must be a name in COEFFS or a (numerator, denominator) pair of tensors ({e})") from None
    if not (num.dim() == den.dim() and num.dim() in (1, 2) and num.shape[-1] >= 2 and den.shape[-1] >= 2):
        raise ValueError(f"init: the coefficients must be 1-D, or (groups, .) 2-D, with at least 2 a side (m >= 1, "
                         f"n >= 2); got shapes {tuple(num.shape)} and {tuple(den.shape)}")
    num, den = (c.expand(groups, -1) if c.dim() == 1 else c for c in (num, den))
    if num.shape[0] != groups or den.shape[0] != groups:
        raise ValueError(f"coefficients have {num.shape[0]} and {den.shape[0]} rows, expected {groups} groups")
    if not (torch.isfinite(num).all() and torch.isfinite(den).all()):
        raise ValueError("rational coefficients contain NaN or inf; refit them with fit_rational()")
    return num.clone(), den.clone()


def _check_arguments(rank, alpha=None, form="shared", basis_scale=3.0):
    if form not in ("shared", "per_group"):
        raise ValueError(f"NoRA: form must be 'shared' or 'per_group', got {form!r}")
    rank = _positive_int(rank, "NoRA: rank")
    alpha = None if alpha is None else _positive_number(alpha, "NoRA: alpha (or None for 2 * rank)")
    if not 1e-3 <= _positive_number(basis_scale, "NoRA: basis_scale") <= 1e3:
        raise ValueError(f"NoRA: basis_scale must lie in [1e-3, 1e3] (3 is ours, 1 the paper's); got {basis_scale}")
    return rank, alpha, float(basis_scale)


def _positive_int(value, what):                           # any integer type but bool; returned as an int
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(value, what):                        # a real number in (0, float32's max]; as a float
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 3.4e38:
        raise ValueError(f"{what} must be a positive number float32 can hold, got {value!r}")
    return float(value)


def _check_axis(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer axis (-1: the last, 1: (N, C, H, W)), got {value!r}")
    return int(value)


def _check_fit(num_degree, den_degree, iters, points, x_range):
    num_degree, den_degree, iters, points = (_positive_int(v, f"fit_rational: {k}") for k, v in dict(
        num_degree=num_degree, den_degree=den_degree, iters=iters, points=points).items())
    if den_degree < 2 or points <= num_degree + den_degree:
        raise ValueError(f"fit_rational: need den_degree >= 2 (the module's Q) and more points than coefficients; "
                         f"got den_degree={den_degree}, points={points}")
    if not (isinstance(x_range, (tuple, list)) and len(x_range) == 2 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in x_range)
            and -1e4 <= x_range[0] <= x_range[1] - 1e-3 and x_range[1] <= 1e4):
        raise ValueError(f"fit_rational: x_range must be (low, high) within [-1e4, 1e4] with high - low >= 1e-3 "
                         f"(where an activation's inputs lie), got {x_range!r}")
    return num_degree, den_degree, iters, points


def _check_per_module(per_module):
    """{path: dict(groups=int, channel_dim=int) or None}, as plain Python."""
    checks = dict(groups=_positive_int, channel_dim=_check_axis)
    ok = lambda own: own is None or isinstance(own, dict) and own and set(own) <= set(checks)
    if not (per_module is None or isinstance(per_module, dict) and all(isinstance(p, str) and ok(own)
                                                                       for p, own in per_module.items())):
        raise ValueError(f"add_nora: per_module must be a dict {{module path: dict(groups=..., channel_dim=...) or "
                         f"None}}, got {per_module!r}")
    return {p: own and {k: checks[k](v, f"add_nora: per_module[{p!r}][{k!r}]") for k, v in own.items()}
            for p, own in (per_module or {}).items()}


def _check_rows(ranges, rows, what):
    """LoRA's row ranges, sorted [(start, stop), ...] of one width within ``rows``, not overlapping; None: all."""
    if ranges is None:
        return None
    ok = isinstance(ranges, (list, tuple)) and ranges and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                             for i in r) and 0 <= r[0] < r[1] <= rows for r in ranges)
    ranges = sorted((int(a), int(b)) for a, b in ranges) if ok else ranges
    if not ok or len({b - a for a, b in ranges}) > 1 or any(b > a2 for (_, b), (a2, _) in zip(ranges, ranges[1:])):
        raise ValueError(f"{what}: rows must be (start, stop) ranges of one width within its {rows} output rows, not "
                         f"overlapping, e.g. [(0, {rows // 3})]; got {ranges!r}")
    return ranges


def _check_names(names, what):
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must name modules or parameters (non-empty strings), got {names!r}")
    return names


def _check_rational_inputs(x, numerator, denominator, dim):
    if not x.is_floating_point():
        raise TypeError(f"rational: expected a floating-point input, got {x.dtype} (convert with x.float())")
    if (numerator.dim() != 2 or denominator.dim() != 2 or numerator.shape[0] != denominator.shape[0]
            or min(numerator.shape[1], denominator.shape[1]) < 2):
        raise ValueError(f"rational: numerator must be (G, m+1) and denominator (G, n) with the same G, m >= 1 and "
                         f"n >= 2; got {tuple(numerator.shape)} and {tuple(denominator.shape)}")
    if numerator.device != x.device or denominator.device != x.device:
        raise ValueError(f"rational: the input is on {x.device} but the coefficients on {numerator.device}; "
                         f"move the module to the input's device (model.to(device))")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"rational: no channel dimension {dim} in a {tuple(x.shape)} input")
    G, C = numerator.shape[0], x.shape[dim]
    if C % G:
        raise ValueError(f"rational: {C} channels (dimension {dim} of a {tuple(x.shape)} input) cannot be split "
                         f"into {G} equal groups; use a group count that divides {C}, e.g. one of "
                         f"{[d for d in range(1, min(C, 64) + 1) if C % d == 0]}")


def _least_squares(coeffs, V, W, f, root_weight, iters=200):
    """(coefficients, error): Levenberg-Marquardt on sum (root_weight (P/(1+|S|) - f))^2 from ``coeffs``
    (a_0 .. a_m, b_1 .. b_n), P = V a and S = W b; the damping falls after a step that lowers the error."""
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
        D = torch.diag(torch.where(A.diagonal() > 0, A.diagonal(), 1.0))   # Marquardt's diag(A); 1 for a zero column
        while damping < 1e12:
            step = -torch.linalg.solve(A + damping * D, g) / scale
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
    """Write {name: tensor} and {str: str} ``metadata`` as a .safetensors file: an 8-byte header length,
    a JSON header of each tensor's dtype, shape and byte range, then the raw bytes."""
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
    """{name: tensor} from a .safetensors file (and its metadata, if asked), each entry checked: a known
    dtype, a shape whose size is its byte range, in the file and overlapping no other's."""
    if not Path(path).is_file():
        raise ValueError(f"{path} is {'a folder' if Path(path).is_dir() else 'missing'}, not a .safetensors file; "
                         f"pass the path of one")
    data = Path(path).read_bytes()
    try:
        n = struct.unpack("<Q", data[:8])[0]
        if n > len(data) - 8:
            raise ValueError(f"a header of {n} bytes in a file of {len(data)}")
        header, state, end_of_last, body = json.loads(data[8:8 + n]), {}, 0, len(data) - 8 - n
        extra = header.pop("__metadata__", None) or {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            dtype, (start, end), shape = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"], info["shape"]
            if not (all(type(i) is int and i >= 0 for i in (start, end, *shape)) and end_of_last <= start <= end <= body
                    and end - start == math.prod(shape) * dtype.itemsize):
                raise ValueError(f"{name}'s bytes {info['data_offsets']} overlap another tensor's, lie past the end of "
                                 f"the file, or do not hold its shape {shape}")
            state[name] = torch.frombuffer(bytearray(data[8 + n + start:8 + n + end]), dtype=dtype).view(shape) \
                if end > start else torch.empty(shape, dtype=dtype)
            end_of_last = end
        if not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
            raise ValueError("its __metadata__ is not a map of strings")
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError, AttributeError, RecursionError) as e:
        what = f"no field or an unknown dtype {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not a valid .safetensors file ({what}); it may be truncated or an error "
                         f"page. Download it again, or pass another file") from None
    return (state, extra) if metadata else state


def read_adapter(path):
    """(tensors, {path: settings} of the adapters) from a save_adapter file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_adapter takes the path of a save_adapter file, not a {type(path).__name__} (a state "
                        f"dict loads with model.load_state_dict(state, strict=False))")
    state, extra = read_safetensors(path, metadata=True)
    try:
        described = json.loads(extra["nora"])
        if not (isinstance(described, dict) and all(isinstance(v, dict) for v in described.values())):
            raise ValueError("not a map of module paths to settings")
    except (KeyError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} holds no readable description of its adapters ({e}): it is damaged, or not "
                         f"written by save_adapter (a plain state dict loads with model.load_state_dict)") from None
    return state, described


def check_writable(path, replace=True):
    """The resolved ``path`` if write_atomic can write it: a regular file with no other hard link (the
    new file would break it), or a new name, in a folder that takes a new file."""
    path = Path(os.path.realpath(path))
    why = "is a folder" if path.is_dir() else "is no regular file (a device, a FIFO?)" if path.exists() and \
        not path.is_file() else None if path.parent.is_dir() else "is in a folder that does not exist"
    if why:
        raise OSError(f"{path} {why}: give the path of a file in an existing folder")
    if replace and path.exists() and path.stat().st_nlink > 1:
        raise OSError(f"{path} has other hard links, which writing through a temporary file would break; copy it "
                      f"to a file of its own first")
    tempfile.TemporaryFile(dir=path.parent).close()       # a real write, as the result's will be
    return path


def write_atomic(path, data, replace=True):
    """Write ``data`` (bytes or str) to ``path`` through a new temporary file beside it, then move that into
    place: a crash or a full disk leaves the old file whole. A symlink's target gets the data, the old
    mode is kept. ``replace=False``: never replace a file (FileExistsError)."""
    path = check_writable(path, replace)
    old = os.stat(path) if path.exists() and replace else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, stat.S_IMODE(old.st_mode) if old else 0o666 & ~umask)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)                            # fails if a file is there, however new
    finally:
        Path(tmp).unlink(missing_ok=True)

# =============================================================================
# Appendix D. A small ViT with timm's names, and pretrained weights
#
# The paper fine-tunes "ViT-Tiny pretrained on ImageNet-1K": pre-norm blocks of attention and an
# MLP with exact GELU, the class token's final state feeding the head, with timm's attribute names
# so that a timm state dict loads as it is. `layer_scale=True` adds DINOv2's LayerScale.
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
    """ViT with timm's module names; ``size`` in VIT_SIZES, ``depth`` fewer blocks (quick experiments)."""

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


# Pretrained weights as data, as timm's `_cfg`: a checkpoint on the hub by timm's name, and what it
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


def create_vit(name=DEFAULT_WEIGHTS, **kwargs):
    """A VisionTransformer shaped for the PRETRAINED record ``name`` (``kwargs``: img_size, num_classes, depth)."""
    cfg = PRETRAINED[name]
    return VisionTransformer(cfg["size"], cfg["patch_size"], layer_scale=cfg["layer_scale"], **kwargs)


def load_pretrained(model, source=DEFAULT_WEIGHTS, cache_dir=None, verbose=True):
    """Load a timm-layout checkpoint into ``model``: a name in PRETRAINED, a local .safetensors file or its
    URL. The position embedding is resampled to the model's image size; a head for another number of
    classes (or none) leaves the model's own; a model of fewer blocks takes the first ones."""
    if source in PRETRAINED:                              # timm's name on the hub gives the URL
        source = f"https://huggingface.co/timm/{source}/resolve/main/model.safetensors"
    url = str(source).startswith(("http://", "https://"))
    path = download(source, cache_dir) if url else source
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a .safetensors file, a URL to download, or a name in "
                                f"PRETRAINED: {', '.join(PRETRAINED)}")
    try:
        state, own, depth = read_safetensors(path), model.state_dict(), len(getattr(model, "blocks", ()))
        block = lambda k: int(k.split(".")[1]) if k.startswith("blocks.") and k.split(".")[1].isdigit() else -1
        if depth and verbose and any(block(k) >= depth for k in state):
            print(f"load_pretrained: the model has {depth} blocks; it takes the checkpoint's first {depth}")
        state = {k: v for k, v in state.items() if not depth or block(k) < depth}
        if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
        head = state.get("head.weight")
        if head is None or "head.weight" not in own or head.shape != own["head.weight"].shape:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            if verbose and "head.weight" in own:
                had = "no head" if head is None else f"a head for {len(head)} classes"
                print(f"load_pretrained: checkpoint has {had}; keeping the model's new "
                      f"{len(own['head.weight'])}-class head (randomly initialised)")
        bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               for k, v in state.items() if k in own and v.shape != own[k].shape]
        missing = [k for k in own if k not in state and not k.startswith("head.")]
        if bad or missing or set(state) - set(own):
            raise ValueError(f"load_pretrained: {path} does not match this model (is the size, patch size or "
                             f"layer_scale right?)\n  shape mismatches: {bad[:5]}\n  missing: {missing[:5]}\n"
                             f"  unexpected: {sorted(set(state) - set(own))[:5]}")
    except ValueError as e:
        if url:                                           # a bad download must not stay in the cache
            Path(path).unlink(missing_ok=True)
            raise ValueError(f"{e}\n(the downloaded copy was deleted: run again to download it anew)") from None
        raise
    model.load_state_dict(state, strict=False)
    return model


def resample_pos_embed(pos_embed, grid_size):
    """Resize the patch part of a (1, 1 + h*w, D) position embedding to ``grid_size`` bicubically, as timm does."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.sqrt(patch_pos.shape[1]))
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=grid_size, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls_pos.float(), patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def download(url, cache_dir=None):
    """The local path of ``url``, downloaded once into ``cache_dir`` (else $NORA_CACHE, else ~/.cache/nora)
    by torch.hub, which moves a temporary file into place when it is whole."""
    if not url.isprintable() or " " in url:
        raise ValueError(f"download: {url!r} is not a URL (it holds spaces or control characters)")
    cache_dir = Path(cache_dir or os.environ.get("NORA_CACHE") or Path.home() / ".cache" / "nora")
    name = Path(urllib.parse.urlparse(url).path).name or "download"      # no ?query in the file name
    dest = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name[-200:]}"   # (names end at 255 bytes)
    if dest.is_file():
        return dest
    if dest.exists():
        raise RuntimeError(f"download: the cache's copy of {url}, {dest}, is not a file; remove it and run again")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=sys.stderr.isatty())
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"could not download {url} ({e}).\nIf this machine is offline, download the file on one "
                           f"that is online and pass its local path instead (load_pretrained(model, 'path/to/file'), "
                           f"or --weights path/to/file in train_vit.py), or copy it to {dest}") from None
    return dest
