"""Tests for nora.py and the scripts, in the order of nora.py's parts, then the scripts. No network,
no downloaded files: every checkpoint, data folder and server a test needs, it makes itself.
Run: python -m pytest -q test_nora.py"""
import http.server
import importlib.util
import re
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nora
import train_vit

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parent / "dev"))
import interop  # noqa: E402  (dev/interop.py: the workflow on torchvision, timm and Hugging Face models)


# --- helpers --------------------------------------------------------------------------------------

def tiny_vit(num_classes=10, **kw):
    """A ViT-Tiny-shaped model at 32 px (4 patches) with 2 blocks: the real widths, small cost."""
    torch.manual_seed(0)
    model = nora.VisionTransformer("tiny", patch_size=16, img_size=32, num_classes=num_classes, **kw)
    model.blocks = model.blocks[:2]
    return model.eval()


def images(n=4, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=5, lr=1e-2, x=None, classes=10, seed=0):
    """A few AdamW steps on a fixed random batch; returns the losses."""
    torch.manual_seed(seed)
    x = images(8) if x is None else x
    y = torch.arange(len(x)) % classes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def latest_table(folder, name):
    """The text of the newest table-<name>-cifar10-paper[-k].md in ``folder`` (tables never replace one another)."""
    files = sorted(folder.glob(f"table-{name}-cifar10-paper*.md"), key=lambda f: f.stat().st_mtime_ns)
    return files[-1].read_text()


def dev_script(name):
    """dev/<name>.py imported as a module (dev/ is on sys.path): the dev/ scripts' tests run in CI too."""
    return importlib.import_module(name)


def write_safetensors(path, state):
    """The safetensors format written by hand (header length, JSON header, raw bytes)."""
    import json
    import struct
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state.items():
        b = v.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def to_big_vision(sd):
    """The augreg .npz layout, written out independently of nora._from_big_vision."""
    n = lambda t: t.detach().numpy()
    w = {"embedding/kernel": n(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
         "embedding/bias": n(sd["patch_embed.proj.bias"]), "cls": n(sd["cls_token"]),
         "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"]),
         "head/kernel": n(sd["head.weight"].T), "head/bias": n(sd["head.bias"])}
    D, H = sd["cls_token"].shape[-1], 3
    for i in range(len([k for k in sd if k.endswith("attn.qkv.weight")])):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
        for name, wt, bs in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = n(wt.T.reshape(D, H, D // H))
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = n(bs.reshape(H, D // H))
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = n(sd[b + "attn.proj.weight"].T.reshape(H, D // H, D))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = n(sd[b + "attn.proj.bias"])
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[p + ln + "/scale"], w[p + ln + "/bias"] = n(sd[b + norm + ".weight"]), n(sd[b + norm + ".bias"])
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            w[p + f"MlpBlock_3/{dense}/kernel"] = n(sd[b + f"mlp.{fc}.weight"].T)
            w[p + f"MlpBlock_3/{dense}/bias"] = n(sd[b + f"mlp.{fc}.bias"])
    return w


class _Server:
    """A loopback HTTP server for one file at ``path`` (any query string is ignored)."""

    def __init__(self, payload, path="/model.safetensors"):
        served = path

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != served:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()


def write_cifar(root, name, n_train=40, n_test=20, seed=0):
    """A CIFAR folder in the real python format (pickled dicts of uint8 rows), with random images."""
    import pickle
    rng = np.random.default_rng(seed)
    classes, folder, files, test, key = {
        "cifar10": (10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"),
        "cifar100": (100, "cifar-100-python", ["train"], "test", "fine_labels")}[name]
    path = root / folder
    path.mkdir(parents=True)
    for f, n in [(f, n_train // len(files)) for f in files] + [(test, n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}
        with open(path / f, "wb") as fh:
            pickle.dump(batch, fh)


TINY_RUN = ["--weights", "none", "--depth", "1", "--img-size", "32", "--epochs", "1", "--batch-size", "10",
            "--threads", "2", "--log-every", "2", "--no-compile"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100", n_train=60)
    return root


# --- 1. The rational function -----------------------------------------------------------------

def test_rational_matches_reference_for_any_leading_shape():
    torch.manual_seed(0)
    num, den = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    for shape in [(8,), (3, 8), (2, 5, 16), (2, 3, 4, 8)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(nora.rational(x, num, den), nora.rational_reference(x, num, den))


def test_rational_gradcheck_input_and_coefficients():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    num = (torch.randn(3, 6, dtype=torch.float64) * 0.5).requires_grad_()
    den = (torch.randn(3, 4, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(nora.rational, (x, num, den))
    # and at the fitted GELU, where b1 = b3 = 0 puts S near 0 at x = 0
    num_g, den_g = (torch.tensor(c, dtype=torch.float64).repeat(3, 1).requires_grad_() for c in nora.GELU_COEFFS)
    assert torch.autograd.gradcheck(nora.rational, (x, num_g, den_g))


def test_denominator_is_at_least_one_so_no_poles():
    torch.manual_seed(0)
    x = torch.linspace(-50, 50, 10001).repeat(16, 1).T.contiguous()   # (10001, 16)
    for _ in range(20):
        num, den = torch.ones(4, 6), torch.randn(4, 4) * 10
        y = nora.rational(x, num, den)
        P = sum(x ** i for i in range(6))
        assert torch.isfinite(y).all()
        assert (y.abs() <= P.abs() * (1 + 1e-5) + 1e-5).all()    # |P/Q| <= |P|  <=>  Q >= 1


def test_half_precision_inputs_are_computed_in_float32():
    x = torch.tensor([[-12.0, -3.0, 0.5, 11.0]])
    num, den = (torch.tensor(c).repeat(1, 1) for c in nora.GELU_COEFFS)
    expected = nora.rational(x, num, den)
    for dtype in (torch.float16, torch.bfloat16):
        y = nora.rational(x.to(dtype), num, den)      # 11^5 overflows float16
        assert y.dtype == dtype and torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.01)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nora.rational(x.to(dtype), num, den)
        assert torch.isfinite(y).all()


def test_rational_rejects_bad_shapes_with_clear_errors():
    num, den = torch.zeros(8, 6), torch.zeros(8, 4)
    with pytest.raises(ValueError, match="cannot be split into 8 equal groups"):
        nora.rational(torch.randn(2, 100), num, den)
    with pytest.raises(ValueError, match="same G"):
        nora.rational(torch.randn(2, 64), num, torch.zeros(4, 4))


def test_rational_rejects_integers_handles_empty_batches_and_refuses_a_second_derivative():
    with pytest.raises(TypeError, match="floating-point"):
        nora.NoRA(2, 2)(torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(TypeError, match="floating-point"):
        nora.NoRA(2, 2)(torch.ones(1, 4, dtype=torch.bool))
    assert nora.NoRA(2, 2)(torch.empty(0, 4)).shape == (0, 4)
    # the kernels' backward is not differentiable: a second derivative (a gradient penalty) or torch.func
    # is refused, not silently wrong; rational_reference has one
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    num = (torch.randn(2, 6, dtype=torch.float64) * 0.5).requires_grad_()
    den = (torch.randn(2, 4, dtype=torch.float64) * 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(nora.rational(x, num, den).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: nora.rational(t, num.detach(), den.detach()).sum())(x.detach())
    assert torch.autograd.gradgradcheck(nora.rational_reference, (x, num, den))


# --- 2. Fitting the coefficients --------------------------------------------------------------

@pytest.mark.parametrize("name,bound", [("gelu", 0.017), ("gelu_tanh", 0.017), ("silu", 0.005), ("relu", 0.18)])
def test_shipped_fits_hold_their_stated_error_on_minus8_to_8(name, bound):
    x = torch.linspace(-8, 8, 20001)
    num, den = (torch.tensor(c)[None] for c in nora.COEFFS[name])
    err = (nora.rational(x[None], num, den)[0] - nora.ACTIVATIONS[name](x)).abs()
    assert err.max().item() < bound
    if name != "relu":                                   # weighted: closest where pre-activations are dense
        assert err[9000:11001].max().item() < 0.004 and err[10000].item() < 0.002


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "relu"])
def test_fit_rational_reproduces_the_shipped_coefficients(name):
    num, den = nora.fit_rational(nora.ACTIVATIONS[name], warn_above=1.0)
    torch.testing.assert_close(num, torch.tensor(nora.COEFFS[name][0], dtype=torch.float64), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(den, torch.tensor(nora.COEFFS[name][1], dtype=torch.float64), atol=1e-8, rtol=1e-6)


def test_fit_rational_fits_the_form_the_module_computes_where_the_denominator_goes_negative():
    # Hardswish's linearised fit has b2, b4 < 0: fitted as P / (1 + S), it was off by 14 as P / (1 + |S|)
    num, den = nora.fit_rational(F.hardswish, warn_above=1.0)
    assert nora.fit_error(F.hardswish, num, den)[0] < 0.35                   # scipy's direct fit: 0.29
    x = torch.tensor([-4.0, 0.0, 3.0, 6.0, 8.0])
    torch.testing.assert_close(nora.NoRA(groups=1, init=(num, den))(x), F.hardswish(x), atol=0.35, rtol=0)
    assert nora.fit_error(F.gelu, *nora.GELU_COEFFS)[0] < 0.0173              # no worse than the linearised fit
    with pytest.warns(UserWarning, match=r"off by .* at x = "):               # a kink: said, not hidden
        nora.fit_rational(F.relu6)
    with pytest.raises(ValueError, match="high - low >= 1e-3"):
        nora.fit_rational(F.gelu, x_range=(0, 0))


def test_weighted_fit_trades_the_ends_of_the_range_for_the_core():
    x = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    def errors(num, den):
        e = (nora.rational(x[None], num[None], den[None])[0] - F.gelu(x)).abs()
        return e.max().item(), e[6000:10001].max().item()                # all of [-8, 8]; the core [-2, 2]
    unweighted = errors(*nora.fit_rational(F.gelu, x_range=(-8, 8), weight=None))
    weighted = errors(*nora.fit_rational(F.gelu))
    assert unweighted[0] < 0.004 < weighted[0] and weighted[1] < unweighted[1]


def test_fit_rational_fits_tanh():
    num, den = nora.fit_rational(torch.tanh, x_range=(-4, 4))
    x = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    assert (nora.rational(x[None], num[None], den[None])[0] - torch.tanh(x)).abs().max() < 0.01


# --- 4. NoRA ----------------------------------------------------------------------------------

def test_group_rational_baseline_init_and_errors():
    act = train_vit.GroupRational(4, "silu")                 # Table 4's "rational tuning": every coefficient trains
    assert act.numerator.shape == (4, 6) and act.denominator.shape == (4, 4) and act.numerator.requires_grad
    x = torch.linspace(-5, 5, 64)[None]
    assert (act(x) - F.silu(x)).abs().max() < 0.005
    with pytest.raises(ValueError, match="unknown activation"):
        nora.NoRA(4, init="mish")
    with pytest.raises(ValueError, match="NaN"):
        nora.NoRA(2, init=(torch.tensor([0.0, float("nan"), 0, 0, 0, 0]), torch.zeros(4)))
    with pytest.raises(ValueError, match="expected 4 groups"):
        nora.NoRA(4, init=(torch.zeros(3, 6), torch.zeros(3, 4)))


@pytest.mark.parametrize("form", ["shared", "per_group"])
def test_nora_at_init_equals_its_base_rational_exactly(form):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64) * 3
    base = [torch.tensor(c).expand(8, -1) for c in nora.GELU_COEFFS]
    assert torch.equal(nora.NoRA(8, 2, form=form)(x), nora.rational(x, *base))


def test_nora_parameter_counts_match_the_formulas():
    # shared (released code): r (6 + 4) + 2 G r;  group (paper text): G (6 r + r) + G (4 r + r)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(nora.NoRA(8, 2)) == 2 * 10 + 2 * 8 * 2 == 52
    assert count(nora.NoRA(8, 3, form="per_group")) == 8 * (6 * 3 + 3) + 8 * (4 * 3 + 3) == 288


@pytest.mark.parametrize("form", ["shared", "per_group"])
def test_nora_merge_and_grow_leave_outputs_unchanged_after_training(form):
    torch.manual_seed(0)
    m = nora.NoRA(4, 2, form=form)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    x = torch.randn(32, 64) * 2
    for _ in range(5):
        opt.zero_grad()
        (m(x) - torch.sin(x)).pow(2).mean().backward()
        opt.step()
    before = m(x).detach()
    assert not torch.allclose(before, nora.NoRA(4)(x))               # training did move it
    train_vit.grow_groups(m, 16)
    assert m.numerator.shape == (16, 6)
    torch.testing.assert_close(m(x).detach(), before)
    m.merge()
    assert (m.B_P == 0).all() and (m.B_Q == 0).all()
    torch.testing.assert_close(m(x).detach(), before)
    torch.testing.assert_close(nora.rational(x, m.numerator, m.denominator), before)
    with pytest.raises(ValueError, match="multiple of 16"):
        train_vit.grow_groups(m, 24)


def test_nora_merge_refuses_nan():
    m = nora.NoRA(2, 1)
    with torch.no_grad():
        m.B_P.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        m.merge()


@pytest.mark.parametrize("form", ["shared", "per_group"])
def test_scaled_basis_is_the_monomial_update_with_rescaled_columns(form):
    """NoRA(basis_scale=s) must be exactly the paper's NoRA whose update of coefficient i is
    divided by s^i: same step-0 function, and merge folds it into plain coefficients."""
    torch.manual_seed(0)
    scaled = nora.NoRA(4, 2, form=form, basis_scale=3.0).double()
    plain = nora.NoRA(4, 2, form=form, basis_scale=1.0).double()
    x = torch.randn(5, 16, dtype=torch.float64) * 3
    torch.testing.assert_close(scaled(x), nora.rational(x, scaled.numerator, scaled.denominator), atol=0, rtol=0)
    with torch.no_grad():
        for side, powers in (("P", torch.arange(6)), ("Q", torch.arange(1, 5))):
            getattr(scaled, f"B_{side}").normal_()
            getattr(plain, f"B_{side}").copy_(getattr(scaled, f"B_{side}"))
            A = getattr(scaled, f"A_{side}")
            cols = 3.0 ** -powers.double()
            getattr(plain, f"A_{side}").copy_(A * (cols if form == "shared" else cols[:, None]))   # A's d axis
    torch.testing.assert_close(plain(x), scaled(x))
    before = scaled(x).detach()
    scaled.merge()
    torch.testing.assert_close(scaled(x), before)
    assert not scaled.B_P.any() and not scaled.B_Q.any()


def test_nora_adapter_parameters_gradcheck_in_float64():
    torch.manual_seed(0)
    m = nora.NoRA(2, 2).double()
    with torch.no_grad():
        m.B_P.normal_(), m.B_Q.normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    names = ("A_P", "B_P", "A_Q", "B_Q")
    inputs = tuple(getattr(m, k).detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(lambda *t: torch.func.functional_call(m, dict(zip(names, t)), (x,)), inputs)


def test_coefficients_stay_float32_under_autocast_and_devices_are_checked():
    m = nora.NoRA(4, 2)
    with torch.no_grad():
        m.B_P.normal_()
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        num, den = m.coefficients()
        y = m(x.bfloat16())
        y32 = m(x)
    assert num.dtype == den.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(y32, m(x))                         # as the float32 model computes it
    with pytest.raises(ValueError, match="model.to"):
        nora.rational(torch.randn(2, 8), torch.zeros(2, 6, device="meta"), torch.zeros(2, 4, device="meta"))


def test_coefficient_gradients_stay_finite_under_float16_autocast():
    m = nora.NoRA(2, 2)
    with torch.no_grad():
        m.B_P.normal_(), m.B_Q.normal_(0, 0.01)
    x = torch.rand(64, 64, 8, generator=torch.Generator().manual_seed(0)) * 4 + 4   # |x| in [4, 8]: x^5 is large
    with torch.autocast("cpu", dtype=torch.float16):
        y = m(x.half())
    y.float().sum().backward()                            # each coefficient's gradient sums 16,384 terms
    assert all(torch.isfinite(p.grad).all() for p in (m.A_P, m.B_P, m.A_Q, m.B_Q))   # float16 B A: inf


# --- 5. LoRA ----------------------------------------------------------------------------------

def test_lora_on_q_and_v_rows_of_qkv_merges_and_unmerges():
    torch.manual_seed(0)
    lin = nn.Linear(12, 36)
    lora = nora.LoRALinear(lin, rank=2, alpha=4, row_ranges=[(0, 12), (24, 36)])
    assert lora.base is lin
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), lin(x))                    # B = 0 at init
    with torch.no_grad():
        lora.lora_B.normal_()
    y = lora(x)
    delta = y - lin(x)
    assert delta[:, 12:24].abs().max() == 0 and delta[:, :12].abs().min() > 0   # k rows untouched
    expected = x @ (lora.lora_B[1] @ lora.lora_A[1]).T * 2.0       # v block: B A x * alpha / r
    torch.testing.assert_close(delta[:, 24:], expected)
    w0 = lin.weight.detach().clone()
    lora.merge()
    torch.testing.assert_close(lora(x), y)
    lora.unmerge()
    torch.testing.assert_close(lin.weight, w0)
    torch.testing.assert_close(lora(x), y)
    with pytest.raises(ValueError, match="of one width"):
        nora.LoRALinear(lin, row_ranges=[(0, 12), (24, 30)])


def test_lora_row_ranges_add_their_update_where_index_add_would():
    torch.manual_seed(0)
    lin = nn.Linear(6, 36)
    lora = nora.LoRALinear(lin, rank=2, alpha=4, row_ranges=[(0, 12), (24, 36)])
    with torch.no_grad():
        lora.lora_B.normal_()
        x = torch.randn(3, 5, 6)
        rows = torch.cat([torch.arange(0, 12), torch.arange(24, 36)])
        update = torch.einsum("...i,tri,twr->...tw", x, lora.lora_A, lora.lora_B).flatten(-2) * lora.scaling
        torch.testing.assert_close(lora(x), lin(x).index_add(-1, rows, update))
        torch.testing.assert_close(lora.weight, lin.weight.index_add(0, rows, lora.delta_weight().flatten(0, 1)))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: the weight is stored (in, out) and the layer computes x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def in_out_layers_train_and_merge_exactly(model):
    """model[0] and model[2]: LoRA on (in, out) weights. A few steps, then model[2].weight is W0 + (B A)^T
    in its own layout, and merge keeps the outputs."""
    train_steps(model, steps=3, x=torch.randn(16, 8), classes=8)
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(model[2].weight, model[2].base.weight + (model[2].delta_weight()[0]).T)
        torch.testing.assert_close(nora.merge(model)(x), before, atol=1e-6, rtol=1e-6)


def test_lora_on_an_in_out_weight_merges_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 24), nn.GELU(approximate="tanh"), Conv1D(24, 8))
    with pytest.raises(ValueError, match="neither an nn.Linear nor HF's Conv1D"):     # a look-alike is not guessed
        nora.add_lora(model, rank=2, alpha=4, targets=("0", "2"))
    model[0] = nora.LoRALinear(model[0], rank=2, alpha=4, row_ranges=[(0, 8), (16, 24)], fan_in_fan_out=True)
    model[2] = nora.LoRALinear(model[2], rank=2, alpha=4, fan_in_fan_out=True)
    assert model[0].lora_A.shape == (2, 2, 8) and model[0].lora_B.shape == (2, 8, 2) and model[2].row_ranges == [(0, 8)]
    nora.freeze(model)
    in_out_layers_train_and_merge_exactly(model)


# --- 6. Putting adapters on a model -----------------------------------------------------------

def test_everything_but_the_vit_works_on_its_own_for_a_copier_with_another_model():
    source = open(nora.__file__).read()
    cut = source.index("# =============================================================================\n# Appendix D.")
    lib = {}
    exec(compile(source[:cut], "nora.py without Appendix D", "exec"), lib)        # the ViT and loaders left out
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)), torch.randn(5, 16)
    lib["add_lora"](lib["add_nora"](model, groups=8, rank=2, example=x), targets=("0", "2"))
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert isinstance(model[1], lib["NoRA"]) and isinstance(model[0], lib["LoRALinear"])


def test_nora_py_copied_into_a_package_adapts_its_own_vit(tmp_path):
    import shutil
    import subprocess
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    shutil.copy(nora.__file__, tmp_path / "myproj" / "nora.py")
    code = ("import torch; from myproj import nora; m = nora.VisionTransformer('tiny', img_size=32, depth=1); "
            "nora.add_lora(nora.add_nora(m, example=torch.zeros(1, 3, 32, 32)), rank=2); "
            "print(m.blocks[0].attn.qkv.row_ranges, type(m.blocks[0].mlp.act).__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[(0, 576)] NoRA"                              # all of qkv: no rows given


def test_add_nora_keeps_the_model_close_to_gelu_and_equal_to_the_rational_swap():
    gelu_model = tiny_vit()
    x = images(4) * 2
    with torch.no_grad():
        ref = gelu_model(x)
    swapped = tiny_vit()
    train_vit.replace_modules(swapped, lambda m: isinstance(m, nn.GELU), lambda m: train_vit.GroupRational(8, "gelu"))
    adapted = nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1))
    with torch.no_grad():
        out, out_swapped = adapted(x), swapped(x)
    assert torch.equal(out, out_swapped)
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()


def test_add_nora_trains_only_the_adapters_and_head_and_counts_match():
    model = nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1))
    nora.freeze(model, "head")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"blocks.{i}.mlp.act.{p}" for i in range(2) for p in ("A_P", "B_P", "A_Q", "B_Q")} | {"head.weight", "head.bias"}
    assert nora.count_parameters(model)[0] == 2 * 52 + 192 * 10 + 10
    with pytest.raises(ValueError, match="no ReLU module; its parameter-free modules are .*NoRA modules are not"):
        nora.add_nora(tiny_vit(), target=nn.ReLU, example=images(1))


def test_add_nora_then_add_lora_keeps_nora_trainable():
    model = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)), rank=4, alpha=8,
                          rows={"qkv": [(0, 192), (384, 576)]})
    nora.freeze(model)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"A_P", "B_P", "A_Q", "B_Q", "lora_A", "lora_B"}
    assert nora.count_parameters(model)[0] == 2 * 52 + 2 * 2 * (4 * 192 + 192 * 4)


def test_adding_an_adapter_changes_nothing_of_what_trains_and_freeze_keeps_what_it_is_told():
    model = nora.freeze(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)), "head")
    nora.add_lora(model, rank=2)
    assert model.head.weight.requires_grad and model.blocks[0].mlp.act.A_P.requires_grad
    assert model.blocks[0].attn.qkv.lora_A.requires_grad and not model.blocks[0].attn.qkv.base.weight.requires_grad
    dora = nora.freeze(nora.add_nora(nora.add_lora(tiny_vit(), rank=2, layer=train_vit.DoRALinear), example=images(1)))
    assert dora.blocks[0].attn.qkv.magnitude.requires_grad and dora.blocks[0].mlp.act.B_P.requires_grad
    assert not dora.blocks[0].attn.qkv.base.weight.requires_grad and not dora.blocks[0].mlp.fc1.weight.requires_grad
    with pytest.raises(ValueError, match=r"freeze: trainable: \['clasifier'\] name no module"):
        nora.freeze(model, "clasifier")


def test_add_nora_takes_classes_and_names_and_a_refusal_leaves_the_model_alone():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"0 \(GELU\) gets \(3, 4\) inputs whose channel axis no layer's output shows"):
        nora.add_nora(nn.Sequential(nn.GELU()), groups=1, example=x)                  # the model's own input
    assert isinstance(nora.add_nora(nn.Sequential(nn.GELU()), groups=1, example=x, channel_dim=-1)[0], nora.NoRA)
    model = nora.add_nora(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU()), groups=2,
                          target=(nn.GELU, nn.SiLU), example=x)
    assert isinstance(model[1], nora.NoRA) and isinstance(model[3], nora.NoRA) and model[3].function == "silu"
    nora.freeze(model, "0.weight", "0.bias")
    assert model[0].weight.requires_grad
    fresh = tiny_vit()
    for bad in (lambda: nora.add_nora(fresh, rank=0, example=images(1)), lambda: nora.add_lora(fresh, rank=-1),
                lambda: nora.add_nora(fresh, groups=7, example=images(1)), lambda: nora.add_nora(fresh, example=None)):
        with pytest.raises(ValueError):
            bad()
        assert all(p.requires_grad for p in fresh.parameters()) and not any(
            isinstance(m, nora.ADAPTERS) for m in fresh.modules())
    with pytest.raises(ValueError, match="pass example="):                          # widths are seen, not guessed
        nora.add_nora(fresh, channel_dim=-1, example=None)
    with pytest.raises(TypeError, match="example"):                                # and its signature says so
        nora.add_nora(fresh, groups=7)


@pytest.mark.parametrize("method", ["nora", "nora++", "lora"])
def test_training_lowers_the_loss_and_merge_keeps_outputs(method):
    model = tiny_vit()
    if method != "lora":
        nora.add_nora(model, groups=8, rank=2, example=images(1))
    if method != "nora":
        nora.add_lora(model, rank=4, alpha=8)
    nora.freeze(model, "head")
    losses = train_steps(model, steps=8, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    x = images(3, seed=5)
    with torch.no_grad():
        before = model(x)
        nora.merge(model)
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert not any(p.requires_grad for p in lora)                 # merged: they no longer reach the output


def test_nora_alone_moves_the_backbone_function():
    """With the head frozen, only NoRA can lower the loss, so its gradients must reach it."""
    model = nora.freeze(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)))
    losses = train_steps(model, steps=8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.01


def test_param_groups_give_the_head_its_own_lr():
    model = nora.add_nora(tiny_vit(), example=images(1))
    nora.freeze(model, "head")
    head, rest = train_vit.param_groups(model, 1e-3, head_lr=1e-2)
    assert head["lr"] == 1e-2 and rest["lr"] == 1e-3
    assert {id(p) for p in head["params"]} == {id(model.head.weight), id(model.head.bias)}
    assert len(rest["params"]) == 2 * 4                       # A_P, B_P, A_Q, B_Q in each of 2 blocks
    nora.add_lora(model)                                      # NoRA++: NoRA at its own lr, LoRA at lr
    head, noras, loras = train_vit.param_groups(model, 1e-3, head_lr=1e-2, nora_lr=3e-2)
    assert (head["lr"], noras["lr"], loras["lr"]) == (1e-2, 3e-2, 1e-3)
    assert len(noras["params"]) == 2 * 4 and len(loras["params"]) == 2 * 2      # lora_A, lora_B per block


def test_adapter_state_dict_loads_with_plain_torch():
    model = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, form="per_group", example=images(1)), rank=2)
    nora.freeze(model, "head")
    train_steps(model, steps=3)
    model.requires_grad_(False)                                  # common before export: the head is still kept
    state = nora.adapter_state_dict(model)
    assert all(k.startswith("head.") or "mlp.act." in k or "lora_" in k for k in state)
    assert {"head.weight", "blocks.0.mlp.act.B_Q"} <= set(state)
    fresh = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, form="per_group", example=images(1)), rank=2)
    fresh.load_state_dict(state, strict=False)
    x = images(3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\['head.weight', 'head.bias'\] train but"):
        nora.adapter_state_dict(nora.freeze(nora.add_nora(tiny_vit(), example=images(1)), "head"), extra=())
    with pytest.raises(ValueError, match="freeze: trainable must name modules"):
        nora.freeze(tiny_vit(), "")                    # not "every parameter"


def test_saving_after_a_lora_merge_and_loading_into_a_merged_model_are_refused(tmp_path):
    model = nora.freeze(nora.add_lora(tiny_vit(), rank=2, alpha=4), "head")
    train_steps(model, steps=2)
    nora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="save before merge"):
        nora.adapter_state_dict(nora.merge(model))        # its base weights hold B A: in no adapter tensor
    merged = nora.merge(nora.add_lora(tiny_vit(), rank=2, alpha=4))
    same = unchanged(merged)
    with pytest.raises(ValueError, match="LoRA is merged, so a loaded update would not count"):
        nora.load_adapter(merged, tmp_path / "a.safetensors")   # B A would never reach the output
    assert same()
    layer = nora.LoRALinear(nn.Linear(4, 4), rank=2)      # a base left trainable stays so through merge
    layer.merge()
    assert layer.base.weight.requires_grad and not layer.lora_A.requires_grad and not layer.lora_B.requires_grad


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")   # shape checks seen while tracing
def test_state_dict_holds_only_tensors_and_exports(tmp_path):
    model = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)), rank=2)
    nora.freeze(model, "head")
    train_steps(model, steps=2)
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
    x = images(2)
    with torch.no_grad():
        expected = model(x)
    nora.merge(model)                                     # trainable parameters remain: export must cope
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("onnx") is None:          # torch.onnx.export needs it; not a dependency
        pytest.skip("torch.onnx.export needs the onnx package (.ci/run installs it)")
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_a_model_built_on_the_meta_device_loads_to_the_same_outputs(tmp_path):
    model = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)), rank=2)
    train_steps(model, steps=2)
    with torch.device("meta"):                            # build without memory, then load real weights
        empty = nora.add_lora(nora.add_nora(tiny_vit(), groups=8, rank=2, example=images(1)), rank=2)
    nora.save_adapter(nora.freeze(model), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="meta device"):                   # loading there would do nothing
        nora.load_adapter(empty, tmp_path / "a.safetensors")
    empty.to_empty(device="cpu").load_state_dict(model.state_dict())
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(empty(x), model(x), atol=0, rtol=0)


def torchvision_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    base = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval()
    with torch.no_grad():
        base.heads.head.weight.normal_(0, 0.02)
    return base


@pytest.mark.parametrize("kind", ["nora", "nora++", "torchvision vit_b_16 classes", "compiled"])
def test_save_adapter_then_load_adapter_into_the_same_adapters_reproduces_it(tmp_path, kind):
    import copy
    x, tv = images(2), kind.startswith("torchvision")
    base = torchvision_vit() if tv else tiny_vit()

    def adapted(model):                                   # the same calls, to train and to load into
        model = nora.add_nora(model, groups=4 if tv else 8, example=x)
        if tv:                                            # nn.MultiheadAttention reads out_proj.weight itself
            model = nora.add_lora(model, rank=2, targets=("out_proj",))
        elif kind == "nora++":
            model = nora.add_lora(model, rank=2)
        return model
    model = nora.freeze(adapted(copy.deepcopy(base)), "heads" if tv else "head")
    train_steps(model, steps=2, x=x)
    model.eval()
    with torch.no_grad():
        y = model(x)
    saved = torch.compile(model) if kind == "compiled" else model          # its names are the model's
    nora.save_adapter(saved, tmp_path / "a.safetensors")
    assert not any("_orig_mod" in k for k in nora.read_safetensors(tmp_path / "a.safetensors"))
    extra = ("heads",) if tv else ("head",)
    with pytest.raises(ValueError, match="does not hold the file's adapters"):   # the calls were not made
        nora.load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors", extra=extra)
    plain = adapted(copy.deepcopy(base))
    fresh = nora.load_adapter(torch.compile(plain) if kind == "compiled" else plain, tmp_path / "a.safetensors",
                              extra=extra)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), y, atol=0, rtol=0)
    assert fresh is plain                                 # (the compiled model's own module)
    nora.merge(model)
    if kind in ("nora", "compiled"):                      # a merged NoRA is a NoRA: its file gives the same model
        nora.save_adapter(model, tmp_path / "b.safetensors")
        merged = nora.load_adapter(adapted(copy.deepcopy(base)), tmp_path / "b.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(x), y, atol=1e-5, rtol=1e-5)
        return
    with pytest.raises(ValueError, match="save before merge"):              # a merged LoRA is in no tensor
        nora.save_adapter(model, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def edited(path, out, tensors=None, described=None):
    """A copy of an adapter file with its tensors (a dict to update, or a function) and description changed."""
    import json
    state, meta = nora.read_safetensors(path, metadata=True)
    about = json.loads(meta["nora"])
    state = tensors(state) if callable(tensors) else {**state, **(tensors or {})}
    if described:
        described(about)
    nora.write_safetensors(out, state, {"nora": json.dumps(about)})
    return out


def unchanged(model):
    """A check that ``model``'s state is still what it is now."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: set(model.state_dict()) == set(before) and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_refused_adapter_leaves_the_model_as_it_was(tmp_path):
    def deep(depth):
        torch.manual_seed(0)
        model = nora.VisionTransformer("tiny", patch_size=16, img_size=32, num_classes=10, depth=depth)
        return nora.freeze(nora.add_nora(model, groups=8, example=images(1)), "head")
    source = deep(3)
    train_steps(source, steps=1)
    nora.save_adapter(source, tmp_path / "deep.safetensors")
    nora.save_adapter(deep(2), tmp_path / "a.safetensors")
    a = tmp_path / "a.safetensors"
    for bad, match in ((tmp_path / "deep.safetensors", "does not hold"),        # a depth-3 adapter, a depth-2 model
                       (edited(a, tmp_path / "s.safetensors", described=lambda d: d["blocks.1.mlp.act"].update(
                           alpha=9.0)), "1 modules differ: blocks.1.mlp.act"),
                       (edited(a, tmp_path / "n.safetensors", {"blocks.0.mlp.act.B_P": torch.full((8, 2), float("nan"))}),
                        "NaN"),
                       (edited(a, tmp_path / "h.safetensors", {"blocks.0.mlp.act.B_P": torch.full((8, 2), 1e30)}), "1e6"),
                       (edited(a, tmp_path / "d.safetensors", {"blocks.0.mlp.act.numerator":
                                                               torch.full((8, 6), 1e300, dtype=torch.float64)}), "inf"),
                       (edited(a, tmp_path / "w.safetensors", {"blocks.0.attn.qkv.weight": torch.zeros(576, 192)}),
                        "neither the adapters'")):
        target = deep(2)
        same = unchanged(target)
        with pytest.raises(ValueError, match=match):
            nora.load_adapter(target, bad)
        assert same()                                     # nothing moved


def test_an_adapter_file_cannot_write_the_backbone_or_allocate_anything(tmp_path):
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    adapted = lambda model: nora.add_lora(nora.add_nora(model, groups=4, example=x), rank=2, targets=("2",))
    trained = nora.freeze(adapted(copy_of(plain)))
    train_steps(trained, steps=2, x=x, classes=4)
    a = tmp_path / "a.safetensors"
    nora.save_adapter(trained, a)
    cases = {
        "backbone tensor": ({"0.weight": torch.zeros(16, 8)}, None, "neither the adapters'"),
        "backbone path as an activation": (None, lambda d: d.update({"0": dict(d["1"], channels=[16])}),
                                           "does not hold"),
        "huge rank": (None, lambda d: d["1"].update(rank=10 ** 9), "does not hold"),
        "huge lora rank": (None, lambda d: d["2"].update(rank=10 ** 9), "does not hold"),
        "a list for a module": (None, lambda d: d.update({"1": [[[[[]]]]]}), "no readable"),
        "wrong type": (None, lambda d: d["1"].update(rank="2"), "does not hold"),
    }
    for name, (tensors, described, match) in cases.items():
        bad = edited(a, tmp_path / f"{len(name)}.safetensors", tensors, described)
        model = adapted(copy_of(plain))
        same = unchanged(model)
        with pytest.raises(ValueError, match=match):
            nora.load_adapter(model, bad)
        assert same(), name
    deep = tmp_path / "deep.safetensors"
    nora.write_safetensors(deep, nora.read_safetensors(a), {"nora": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="no readable description"):
        nora.load_adapter(adapted(copy_of(plain)), deep)
    narrow = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 4))          # 12 channels, not 16
    with pytest.raises(ValueError, match=r"'channels': \[16\].* in the file, .*'channels': \[12\].* here"):
        nora.load_adapter(adapted(narrow), a)
    with pytest.raises(ValueError, match="a folder"):
        nora.load_adapter(adapted(copy_of(plain)), tmp_path)
    with pytest.raises(TypeError, match="load_state_dict"):
        nora.load_adapter(adapted(copy_of(plain)), nora.adapter_state_dict(trained))


def test_an_adapter_of_two_calls_or_of_a_class_named_with_its_init_loads_back(tmp_path):
    class MyAct(nn.Module):                               # a class add_nora does not know: target= and init= name it
        def forward(self, x):
            return F.gelu(x)
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), MyAct(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))

    def adapted(model, alpha=None):
        model = nora.add_nora(model, groups=4, target=MyAct, init="gelu", example=x)
        return nora.add_nora(model, groups=2, rank=4, alpha=alpha, example=x)   # a second call, other settings
    model = nora.freeze(adapted(copy_of(base)))
    train_steps(model, steps=2, x=x, classes=4)
    nora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = nora.load_adapter(adapted(copy_of(base)), tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    other = adapted(copy_of(base), alpha=1.0)             # a setting no shape shows
    same = unchanged(other)
    with pytest.raises(ValueError, match="'alpha': 8.0.* in the file, .*'alpha': 1.0.* here"):
        nora.load_adapter(other, tmp_path / "a.safetensors")
    assert same()
    def by_hand(model):                                   # section 5's loop: no add_nora
        model[3] = nora.NoRA(2)
        return nora.freeze(model)
    hand = by_hand(copy_of(base))
    train_steps(hand, steps=2, x=x, classes=4)
    nora.save_adapter(hand, tmp_path / "b.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(nora.load_adapter(by_hand(copy_of(base)), tmp_path / "b.safetensors")(x), hand(x))


def test_a_second_hostile_pass_finds_no_silent_wrong_load(tmp_path):
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    adapted = lambda model: nora.add_nora(model, groups=4, example=x)
    trained = nora.freeze(adapted(copy_of(plain)))
    a = tmp_path / "a.safetensors"
    nora.save_adapter(trained, a)
    state = nora.read_safetensors(a)
    moved = {f"2.{k[2:]}": v for k, v in state.items() if k.startswith("1.")}  # the activation's tensors, on "2"
    for name, tensors, described, match in (
            ("a Linear named as an activation", lambda s: {**s, **moved}, lambda d: d.update(
                {"2": dict(d["1"], function="torch.nn.modules.linear.Linear", channels=[4])}), "does not hold"),
            ("integers", {"1.B_P": torch.full((4, 2), 10 ** 18, dtype=torch.int64)}, None, "int64")):
        model = adapted(copy_of(plain))
        same = unchanged(model)
        with pytest.raises(ValueError, match=match):
            nora.load_adapter(model, edited(a, tmp_path / f"{len(name)}.safetensors", tensors, described))
        assert same() and type(model[2]) is nn.Linear, name
    head = nora.freeze(nora.add_lora(copy_of(plain), rank=2, targets=("2",)), "2")   # LoRA and its base trained
    nora.save_adapter(head, tmp_path / "h.safetensors")
    back = nora.load_adapter(nora.add_lora(copy_of(plain), rank=2, targets=("2",)), tmp_path / "h.safetensors",
                             extra=("2",))                # "2" names its base too
    with torch.no_grad():
        torch.testing.assert_close(back(x), head(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"extra: \['clasifier'\] name no module"):
        nora.save_adapter(nora.freeze(copy_of(trained)), tmp_path / "t.safetensors", extra=("clasifier",))
    nora.save_adapter(nn.DataParallel(trained), tmp_path / "dp.safetensors")               # the wrapper's names go
    assert all(not k.startswith("module.") for k in nora.read_safetensors(tmp_path / "dp.safetensors"))
    nora.load_adapter(nn.DataParallel(adapted(copy_of(plain))), tmp_path / "dp.safetensors")


def test_a_fourth_pass_tied_heads_ranks_subclasses_typos_and_what_a_file_lacks(tmp_path):
    class LM(nn.Module):                                  # a language model's head tied to its embedding
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.fc, self.act = nn.Embedding(10, 8), nn.Linear(8, 8), nn.GELU()
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t):
            return self.head(self.act(self.fc(self.embed(t))))
    tokens = torch.tensor([[1, 2]])
    lm = nora.freeze(nora.add_nora(LM(), groups=8, example=tokens))
    with torch.no_grad():
        lm.embed.weight.add_(5)
    nora.save_adapter(lm, tmp_path / "lm.safetensors")   # 'head' by default: the tied weight with it
    other = nora.add_nora(LM(), groups=8, example=tokens)
    same = unchanged(other)
    with pytest.raises(ValueError, match=r"\['embed.weight'\] share a tensor the file writes"):
        nora.load_adapter(other, tmp_path / "lm.safetensors")
    assert same()
    with pytest.raises(ValueError, match=r"holds nothing for \['head'\]"):       # not the model's own random head
        nora.save_adapter(nora.freeze(copy_of(lm)), tmp_path / "bare.safetensors", extra=())
        nora.load_adapter(nora.add_nora(LM(), groups=8, example=tokens), tmp_path / "bare.safetensors")
    tied = nora.freeze(LM(), "head")                      # a name that reaches a weight by its second path
    assert tied.embed.weight.requires_grad
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 2, 1))
    nora.add_nora(conv, groups=8, example=torch.randn(3, 8, 8))         # one unbatched image as the example
    with torch.no_grad():
        conv[1].B_P.normal_()
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(conv(x)[0], conv(x[0]))               # batched or not, the same groups

    class Transposed(nn.Linear):                          # an nn.Linear whose forward is its own
        def forward(self, x):
            return super().forward(x).transpose(1, 2)
    with pytest.raises(ValueError, match="whose channel axis no layer's output shows"):
        nora.add_nora(nn.Sequential(Transposed(8, 16), nn.GELU()), groups=4, example=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="or its forward is its own"):
        nora.add_lora(nn.Sequential(Transposed(8, 16)), targets=("0",))
    wrapped = nora.add_nora(nn.DataParallel(nn.Sequential(nn.Linear(8, 16), nn.GELU())), groups=4,
                            example=torch.randn(2, 8), per_module={"1": dict(groups=2)})   # the model's own names
    assert wrapped.module[1].numerator.shape[0] == 2
    vit = tiny_vit()
    with pytest.raises(ValueError, match=r"no linear layer named fc_1 or mlp"):         # a typo beside a good target
        nora.add_lora(vit, rank=2, targets=("qkv", "fc_1", "mlp"))
    assert not any(isinstance(m, nora.LoRALinear) for m in vit.modules())


def test_a_third_pass_shared_modules_tied_weights_merges_and_names(tmp_path):
    class Block(nn.Module):
        def __init__(self, act, fc=None):
            super().__init__()
            self.fc, self.act = fc or nn.Linear(8, 8), act

        def forward(self, x):
            return x + self.act(self.fc(x))
    act, x = nn.GELU(), torch.randn(2, 8)
    shared = nn.Sequential(*[Block(act) for _ in range(3)])            # one GELU at three paths
    with pytest.raises(ValueError, match=r"one GELU module is used at \['0.act', '1.act', '2.act'\]"):
        nora.add_nora(shared, groups=2, example=x)
    fc = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="is used at .*untie them"):                   # one Linear at two paths
        nora.add_lora(nn.Sequential(Block(nn.GELU(), fc), Block(nn.GELU(), fc)), targets=("fc",))
    tied = nn.ModuleDict(dict(emb=nn.Embedding(10, 8), head=nn.Linear(8, 10, bias=False)))
    tied.head.weight = tied.emb.weight                                 # a language model's tied embedding
    with pytest.raises(ValueError, match="head .* is used at"):
        nora.add_lora(tied, targets=("head",))
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 2)))
    nora.add_lora(model, rank=2, targets=("0", "2"))
    model[0].lora_A.requires_grad_(False)                  # a side the caller froze
    with pytest.raises(TypeError, match="no stored weight"):
        nora.merge(model)                                  # the second cannot merge: the first is put back
    assert not model[0].merged and not model[2].merged
    assert not model[0].lora_A.requires_grad and model[0].lora_B.requires_grad    # as the caller left them
    marked = nora.freeze(nn.Sequential(nn.Linear(4, 8), nn.GELU()), "0.weight")
    nora.add_lora(marked, rank=2, targets=("0",))
    assert marked[0].base.weight.requires_grad and "0.base.weight" in nora.adapter_state_dict(marked)
    assert nora.freeze(torch.compile(nn.Sequential(nn.Linear(4, 4))), "0") is not None   # through wrappers
    from collections import UserDict

    class Keywords(nn.Module):                            # a tokenizer's output is a Mapping, not a dict
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.GELU()

        def forward(self, input_ids=None):
            return self.act(self.fc(input_ids))
    nora.add_nora(Keywords(), groups=2, example=UserDict(input_ids=x))


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_save_and_load_name_what_else_they_write_and_keep_a_classifier_across_freezing(tmp_path):
    class Classifier(nn.Module):                          # a Hugging Face-style head, not named "head"
        def __init__(self):
            super().__init__()
            self.body, self.act, self.classifier = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)

        def forward(self, x):
            return self.classifier(self.act(self.body(x)))
    x = torch.randn(6, 8)
    torch.manual_seed(0)
    base = Classifier()
    model = nora.freeze(nora.add_nora(copy_of(base), groups=4, example=x), "classifier")
    train_steps(model, steps=2, x=x, classes=3)
    nora.save_adapter(model, tmp_path / "a.safetensors")   # the classifier trains, so it is kept
    nora.freeze(model)                                    # as before deployment: the classifier no longer trains
    with pytest.raises(ValueError, match=r"\['classifier.weight', 'classifier.bias'\] train but"):
        nora.save_adapter(nora.freeze(copy_of(model), "classifier"), tmp_path / "x.safetensors", extra=())
    assert "classifier.weight" in nora.read_safetensors(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"(?s)holds \['classifier.bias', 'classifier.weight'\].*extra="):
        nora.load_adapter(nora.add_nora(copy_of(base), groups=4, example=x), tmp_path / "a.safetensors")
    fresh = nora.load_adapter(nora.add_nora(copy_of(base), groups=4, example=x), tmp_path / "a.safetensors",
                              extra=("classifier",))       # the caller names it
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    bn = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GELU())
    nora.add_nora(bn, groups=2, example=images(2))
    with pytest.raises(ValueError, match="statistics=True"):
        nora.save_adapter(bn, tmp_path / "bn.safetensors")
    nora.save_adapter(bn, tmp_path / "bn.safetensors", statistics=True)
    with pytest.raises(ValueError, match="statistics=True for BatchNorm"):
        nora.load_adapter(nora.add_nora(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GELU()), groups=2,
                                        example=images(2)), tmp_path / "bn.safetensors")


@pytest.mark.parametrize("edit", ["missing groups", "bad rows", "a module fewer", "not json", "a list of settings"])
def test_a_hand_edited_adapter_description_is_refused(tmp_path, edit):
    adapted = lambda model: nora.add_lora(nora.add_nora(model, groups=8, example=images(1)), rank=2)
    nora.save_adapter(adapted(tiny_vit()), tmp_path / "a.safetensors")
    bad = edited(tmp_path / "a.safetensors", tmp_path / "b.safetensors", described={
        "missing groups": lambda d: d["blocks.0.mlp.act"].pop("groups"),
        "bad rows": lambda d: d["blocks.0.attn.qkv"].update(rows=5),
        "a module fewer": lambda d: d.pop("blocks.1.attn.qkv"), "not json": lambda d: d.clear(),
        "a list of settings": lambda d: d.update({"blocks.0.mlp.act": [1, 2]})}[edit])
    if edit == "not json":
        nora.write_safetensors(bad, nora.read_safetensors(bad), {"nora": "{not json"})
    model = adapted(tiny_vit())
    same = unchanged(model)
    with pytest.raises(ValueError, match="does not hold|no readable description"):
        nora.load_adapter(model, bad)
    assert same()


def test_add_nora_and_add_lora_refuse_what_they_cannot_get_right_by_name():
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        nora.add_nora(tiny_vit(), groups=0, example=images(1))
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        nora.add_nora(tiny_vit(), groups=2.5, example=images(1))
    with pytest.raises(ValueError, match="fails on the example= input"):
        nora.add_nora(tiny_vit(), example=torch.randn(2, 5))

    class Copy(nn.Module):                                # channels moved to dim 1 by a copy, with equal sizes
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.GELU()

        def forward(self, x):
            return self.act(self.fc(x).transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="whose channel axis no layer's output shows"):
        nora.add_nora(Copy(), groups=4, example=torch.randn(2, 8, 8))

    class Square(nn.Module):                              # a 2-D weight, but neither nn.Linear nor HF's Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(6, 6))

        def forward(self, x):
            return x @ self.weight

    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)
    with pytest.raises(ValueError, match="neither an nn.Linear nor HF's Conv1D"):
        nora.add_lora(nn.Sequential(Square()), targets=("0",))
    attention = type("Attention", (MyAttention,), {})             # a user's own class called Attention: all rows
    assert nora.add_lora(nn.Sequential(attention()), targets=("qkv",))[0].qkv.row_ranges == [(0, 12)]
    for rows in ([(4, 2)], [(-3, 3)], (0, 3), [(0, 4), (2, 6)], [(0, 4), (4, 6)]):   # reversed, negative, ...
        with pytest.raises(ValueError, match="rows must be \\(start, stop\\) ranges"):
            nora.add_lora(nn.Sequential(MyAttention()), targets=("qkv",), rows={"qkv": rows})
        with pytest.raises(ValueError, match="rows must be \\(start, stop\\) ranges"):
            nora.LoRALinear(nn.Linear(4, 12), row_ranges=rows)
    twice = nora.add_lora(nn.Sequential(MyAttention()), targets=("qkv",), rows={"qkv": [(0, 4)]})
    with pytest.raises(ValueError, match="has LoRA already"):
        nora.add_lora(twice, targets=("qkv",), rows={"qkv": [(0, 4)]})


def test_a_fused_qkv_gets_lora_on_every_row_unless_rows_say_which():
    class Attention(nn.Module):                           # timm's TinyViT and EfficientFormer: q, k, v per head
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
    model = nora.add_lora(nn.Sequential(Attention()), targets=("qkv",))
    assert model[0].qkv.row_ranges == [(0, 24)]           # no class name decides a layout
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    assert nora.add_lora(vit, rank=2).blocks[0].attn.qkv.row_ranges == [(0, 576)]
    qv = nora.add_lora(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32), rank=2,
                       rows={"qkv": [(0, 192), (384, 576)]})
    assert qv.blocks[0].attn.qkv.row_ranges == [(0, 192), (384, 576)]


# --- Appendix A. Kernels and speed ------------------------------------------------------------

def test_blocked_eager_kernels_and_compiled_path_match_the_whole_tensor_kernels(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 50, 64, requires_grad=True)
    num = (torch.randn(4, 6) * 0.3).requires_grad_()
    den = (torch.randn(4, 4) * 0.3).requires_grad_()
    g = torch.randn(2, 50, 64)

    def grads():
        x.grad = num.grad = den.grad = None
        nora.rational(x, num, den).backward(g)
        return x.grad.clone(), num.grad.clone(), den.grad.clone()
    monkeypatch.setitem(nora._kernels, "chunk", None)
    whole = grads()
    y_whole = nora.rational(x, num, den)
    monkeypatch.setitem(nora._kernels, "chunk", 640)                 # 10 rows a block: 10 blocks
    assert len(nora._chunks(x.view(-1, 64))) == 10
    torch.testing.assert_close(nora.rational(x, num, den), y_whole)
    for a, b in zip(grads(), whole):
        torch.testing.assert_close(a, b)
    if not train_vit.use_compiled_rational():                              # takes ~10 s; warns where it cannot
        pytest.skip("torch.compile is not available here")
    try:
        for a, b in zip(grads(), whole):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for rows in (7, 33):                                              # other batch sizes: no new graph
            xr = x.detach()[:, :rows].clone().requires_grad_()
            nora.rational(xr, num, den).sum().backward()
            expected = nora.rational_reference(xr.detach(), num.detach(), den.detach())
            torch.testing.assert_close(nora.rational(xr, num, den), expected, atol=1e-5, rtol=1e-5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        nora._kernels.update(nora._EAGER)
    assert nora._kernels["forward"] is nora._rational_forward


def test_rational_saves_only_the_input_for_backward():
    x = torch.randn(64, 32, requires_grad=True)
    num, den = (torch.randn(4, 6, requires_grad=True), torch.randn(4, 4, requires_grad=True))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        nora.rational(x, num, den)
    assert sorted(saved) == sorted([x.numel(), num.numel(), den.numel()])


def test_backward_computes_only_the_gradients_autograd_asks_for(monkeypatch):
    seen = []
    kernel = nora._kernels["backward"]
    monkeypatch.setitem(nora._kernels, "backward", lambda *args: seen.append(args[-1]) or kernel(*args))
    x = torch.randn(3, 8, dtype=torch.float64)
    num, den = (torch.tensor(c, dtype=torch.float64).repeat(2, 1) for c in nora.GELU_COEFFS)
    num.requires_grad_()
    assert torch.autograd.gradcheck(nora.rational, (x, num, den))          # the input and Q frozen
    assert seen and all(needs == (False, True, False) for needs in seen)
    x.requires_grad_()
    assert torch.autograd.gradcheck(nora.rational, (x, num, den)) and seen[-1] == (True, True, False)


def test_use_compiled_rational_does_not_move_the_global_rng(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)        # the warm-up, without compiling
    torch.manual_seed(0)
    train_vit.use_compiled_rational()
    nora._kernels.update(nora._EAGER)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


def test_compiled_kernels_run_only_on_the_device_they_were_compiled_for(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: calls.append(a[0].device.type) or fn(*a)))
    try:
        assert train_vit.use_compiled_rational(device="meta")     # stands in for a GPU here
        calls.clear()
        num, den = (torch.tensor(c).repeat(2, 1) for c in nora.GELU_COEFFS)
        nora.rational(torch.randn(3, 8), num, den)                    # a CPU tensor: the eager kernels
        assert calls == []
        nora._kernels["forward"](torch.randn(3, 8).to("meta"), num.to("meta"), den.to("meta"))
        assert calls == ["meta"]
    finally:
        nora._kernels.update(nora._EAGER)


# --- Appendix B. Reading other people's models ------------------------------------------------

@pytest.mark.parametrize("name", list(interop.torchvision_models()))
def test_torchvision_models_swap_train_reload_merge_and_export(name):
    make, x, lora_targets, settings = interop.torchvision_models()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # mobilenet's ReLUs warn that they move at init
        row = interop.check(make, x, lora_targets, **settings)
    assert int(row["replaced"].split()[0]) > 0
    assert row["round trip"] == 0                         # BatchNorm statistics travel with the adapter
    assert row["merge"] < 1e-5 and row.get("NoRA++ merge", 0) < 1e-5
    assert row["export"].startswith("ok") and float(row["export"][4:-1]) < 1e-5
    convolutional = ("maxvit", "efficientnet", "mobilenet")
    assert ("(dim -3)" in row["replaced"]) == any(n in name for n in convolutional)   # (N, C, H, W) stages
    if not any(n in name for n in convolutional):         # their random BatchNorms leave inputs ~1e-4 (or ~0)
        assert row["init change"] < (0.1 if "v2" in name else 0.05)   # swin v2's post-norm: 0.087


def test_add_nora_knows_each_activation_by_its_class_and_never_calls_one():
    class MyGELU(nn.Module):                              # computes GELU, but its class is nobody's we have read
        calls = 0

        def forward(self, x):
            MyGELU.calls += 1
            return F.gelu(x)

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 8), MyGELU(),
                          nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8), nn.Tanh())
    assert [nora.activation_name(m) for m in model[1::2]] == ["gelu_tanh", None, "silu", None]
    x = torch.randn(2, 4)
    nora.add_nora(model, groups=2, example=x)
    assert [type(m).__name__ for m in model[1::2]] == ["NoRA", "MyGELU", "SiLU", "Tanh"]
    assert MyGELU.calls == 1                                                  # the example's run, nothing else
    torch.testing.assert_close(model[1].numerator[0], torch.tensor(nora.GELU_TANH_COEFFS[0]))
    nora.add_nora(model, groups=2, target="silu", example=x)
    torch.testing.assert_close(model[5].numerator[0], torch.tensor(nora.SILU_COEFFS[0]))
    with pytest.raises(ValueError, match=r"no gelu or gelu_tanh module; .* are .*'MyGELU'.*'Tanh'.*NoRA modules"):
        nora.add_nora(model, groups=2, example=x)
    with pytest.raises(ValueError, match=r"3 is a MyGELU, whose function add_nora does not know.*init="):
        nora.add_nora(model, groups=2, target=MyGELU, example=x)
    nora.add_nora(model, groups=2, target=MyGELU, init="gelu", example=x)
    nora.add_nora(model, groups=2, target=nn.Tanh, init=nora.fit_rational(torch.tanh, x_range=(-4, 4)), example=x)
    assert all(isinstance(m, nora.NoRA) for m in model[1::2])
    with pytest.raises(ValueError, match=r"modules are \['SiLU \(silu\)'\]"):    # what it has, said plainly
        nora.add_nora(nn.Sequential(nn.Linear(8, 16), nn.SiLU()), example=torch.randn(2, 8))


def test_finding_activations_runs_no_module_and_the_example_leaves_every_buffer_as_it_was():
    class Observer(nn.Module):                            # a quantisation observer: it learns a range from its inputs
        def __init__(self):
            super().__init__()
            self.register_buffer("low", torch.tensor(0.0))

        def forward(self, x):
            self.low.copy_(torch.minimum(self.low, x.min()))
            return x

    model = nn.Sequential(nn.Linear(4, 8), Observer(), nn.GELU())
    with pytest.raises(ValueError, match="no SiLU module"):
        nora.add_nora(model, target=nn.SiLU, example=torch.randn(2, 4))
    assert model[1].low == 0                              # never called to see what it computes
    nora.add_nora(model, groups=2, example=torch.randn(2, 4) * 100)   # (it returns the linear layer's output itself)
    assert model[1].low == 0 and model[2].channel_dim == -1   # the example ran, and its range was put back


def test_gelu_on_an_nchw_feature_map_is_grouped_over_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 4, 1)).eval()
    nora.add_nora(model, groups=8, rank=2, example=torch.randn(2, 3, 9, 7))
    act = model[2]
    assert act.channel_dim == -3                          # counted from the end: one image (C, H, W) works too
    with torch.no_grad():
        act.B_P.normal_()                                 # give each group its own function
        x = torch.randn(2, 16, 6, 6)
        num, den = act.coefficients()
        expected = nora.rational_reference(x.movedim(1, -1), num, den).movedim(-1, 1)
        torch.testing.assert_close(act(x), expected)
        assert act(x).is_contiguous() and act(x).view(2, -1).shape == (2, 576)   # older code .view()s its output
        model(torch.randn(2, 3, 5, 11))                   # any image size: the groups are channels
    with pytest.raises(ValueError, match=r"(?s)add_nora: 1 \(GELU\) acts on \[16\] channels.*per_module=\{'1': dict\(groups=2\)\}"):
        nora.add_nora(nn.Sequential(nn.Conv2d(3, 16, 3), nn.GELU()), groups=3, example=torch.randn(1, 3, 5, 5))


class LeViTMlp(nn.Module):
    """timm LeViT's MLP: each linear is followed by a BatchNorm1d run on x.flatten(0, 1), then reshaped
    back to (B, N, C): a view of the BatchNorm's output, whose channels are last."""
    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.stem, self.stem_act = nn.Conv2d(3, dim, 1), nn.GELU()
        self.ln1, self.bn1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)
        self.act = nn.GELU()
        self.ln2 = nn.Linear(hidden, dim)
        self.attn_act = nn.GELU()                         # LeViT's attention: an activation on attn @ v

    def forward(self, img):
        x = self.stem_act(self.stem(img)).flatten(2).transpose(1, 2)
        h = self.bn1(self.ln1(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1)
        x = self.ln2(self.act(h))
        return self.attn_act(torch.softmax(x @ x.transpose(1, 2), -1) @ x)


class Wav2Vec2Like(nn.Module):
    """wav2vec2's layouts: a conv layer that does conv, transpose, LayerNorm, transpose, GELU on (N, C, L),
    and a positional conv whose GELU gets a slice that drops the last time step."""
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv1d(1, c, 3, padding=1), nn.LayerNorm(c), nn.GELU()
        self.pos_conv, self.pos_act = nn.Conv1d(c, c, 4, padding=2), nn.GELU()

    def forward(self, x):                                 # (N, 1, L) -> (N, C, L)
        h = self.act(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))
        return h + self.pos_act(self.pos_conv(h)[:, :, :-1])


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: the activation is called inside the norm's forward, on no layer's output."""
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(super().forward(x))


class MobileViTLike(nn.Module):
    """MobileViT's layouts: a conv stage with BatchNormAct2d, then a transformer MLP on (B * P, N, C) patches."""
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), BatchNormAct2d(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 2 * c), nn.SiLU(), nn.Linear(2 * c, c)

    def forward(self, x):
        h = self.bn(self.conv(x))                         # (B, C, H, W)
        B, C, H, W = h.shape
        patches = h.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(B * 4, H * W // 4, C)
        return self.fc2(self.act(self.fc1(patches)))


@pytest.mark.parametrize("make, example, unseen, said, expected", [
    (LeViTMlp, torch.randn(2, 3, 2, 2), "attn_act", {"channel_dim": -1, "per_module": {"stem_act": dict(channel_dim=1)}},
     {"stem_act": -3, "act": -1, "attn_act": -1}),
    (Wav2Vec2Like, torch.randn(2, 1, 6), "pos_act", {"per_module": {"pos_act": dict(channel_dim=1)}},
     {"act": -2, "pos_act": -2}),
    (MobileViTLike, torch.randn(2, 3, 4, 4), "bn.act", {"per_module": {"bn.act": dict(channel_dim=1)}},
     {"bn.act": -3, "act": -1}),
], ids=["levit", "wav2vec2", "mobilevit"])
def test_the_channel_axis_is_seen_through_views_and_asked_for_elsewhere(make, example, unseen, said, expected):
    torch.manual_seed(0)
    model = make().eval()
    target = ("silu",) if make is MobileViTLike else ("gelu",)
    with pytest.raises(ValueError, match=f"add_nora: {unseen} .* gets .* inputs whose channel axis no layer's output"):
        nora.add_nora(model, groups=2, target=target, example=example)
    assert not any(isinstance(m, nora.NoRA) for m in model.modules())
    with torch.no_grad():
        before = model(example)
    nora.add_nora(model, groups=2, target=target, example=example, **said)
    assert {p: m.channel_dim for p, m in model.named_modules() if isinstance(m, nora.NoRA)} == expected
    assert model.training is False and all(not m.training for m in model.modules())   # eval mode as it was
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nora.NoRA):                   # every group its own function: a wrong axis would show
                m.B_P.normal_(0, 0.5)
        y = model(example)
    assert y.shape == before.shape and torch.isfinite(y).all()


def test_an_axis_that_contradicts_the_example_is_refused_and_so_is_a_flattened_one():
    model = LeViTMlp().eval()
    with pytest.raises(ValueError, match=r"stem_act \(GELU\) gets its channels on axis 1 of its \(2, 8, 2, 2\) input, "
                                         r"not on channel_dim=-1; pass per_module=\{'stem_act': dict\(channel_dim=1\)\}"):
        nora.add_nora(model, groups=2, channel_dim=-1, example=torch.randn(2, 3, 2, 2))   # -1 would cut the width

    class Flat(nn.Module):                                # tokens folded into features: (B, 4, 16) -> (B, 64)
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 16), nn.GELU()

        def forward(self, x):
            return self.act(self.fc(x).flatten(1))
    with pytest.raises(ValueError, match=r"act \(GELU\) gets \(2, 64\) inputs whose channel axis no layer's output"):
        nora.add_nora(Flat(), groups=4, example=torch.randn(2, 4, 8))


def test_a_layernorm_over_several_axes_shows_no_channel_axis_and_grow_keeps_to_the_widths():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.LayerNorm([16, 8, 8]), nn.GELU())
    with pytest.raises(ValueError, match=r"2 \(GELU\) gets \(2, 16, 8, 8\) inputs whose channel axis"):
        nora.add_nora(model, groups=4, example=torch.randn(2, 3, 8, 8))
    nora.add_nora(model, groups=4, example=torch.randn(2, 3, 8, 8), channel_dim=1)
    with pytest.raises(ValueError, match="divide the \\[16\\] channels"):
        train_vit.grow_groups(model[2], 40)
    assert model[2].numerator.shape[0] == 4
    train_vit.grow_groups(model[2], 16)


def test_an_activation_the_example_does_not_run_is_refused_or_left_as_the_caller_says():
    class Mamba(nn.Module):                               # HF Mamba keeps an `act` it never calls on the CPU path
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.mlp_act = nn.Linear(8, 8), nn.SiLU(), nn.SiLU()

        def forward(self, x):
            return self.mlp_act(self.fc(x))
    model = Mamba()
    with pytest.raises(ValueError, match=r"act \(SiLU\) did not run on the example.*per_module=\{'act': None\}"):
        nora.add_nora(model, groups=2, target="silu", example=torch.randn(2, 8))
    nora.add_nora(model, groups=2, target="silu", example=torch.randn(2, 8), per_module={"act": None})
    assert type(model.act) is nn.SiLU and isinstance(model.mlp_act, nora.NoRA)


def test_a_squeeze_excitation_width_is_refused_before_any_change_with_the_call_to_make():
    from torchvision.models import EfficientNet
    from torchvision.models.efficientnet import _efficientnet_conf
    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    torch.manual_seed(0)
    model, x = EfficientNet(setting, 0.2, last_channel=last, num_classes=10).eval(), images(2)
    with pytest.raises(ValueError, match=r"(?s)block\.\d\.activation \(SiLU\) acts on \[\d+\] channels.*per_module=") as refusal:
        nora.add_nora(model, groups=8, target="silu", example=x)
    assert not any(isinstance(m, nora.NoRA) for m in model.modules())
    per_module = {}                                       # the calls it says to make, one line each
    for line in str(refusal.value).splitlines():
        if "per_module=" in line:
            per_module.update(eval(line.rpartition("per_module=")[2]))
    assert len(per_module) == str(refusal.value).count("cannot be split")
    nora.add_nora(model, groups=8, target="silu", example=x, per_module=per_module)
    noras = {p: m for p, m in model.named_modules() if isinstance(m, nora.NoRA)}
    assert len(noras) == 22 and all(m.channel_dim == -3 for m in noras.values())
    assert {noras[p].numerator.shape[0] for p in per_module} < {8} | {noras[p].numerator.shape[0] for p in per_module}
    model(x)


def test_lora_refuses_multihead_attentions_own_qkv_weight_and_adapts_its_out_proj_exactly():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(32, 8, 1, 2, 32, 64, num_classes=10).eval()
    for targets in (("in_proj",), ("self_attention",)):  # q | k | v in a weight no layer owns: nothing to wrap
        with pytest.raises(ValueError, match=r"keeps q \| k \| v in a weight of its own, in_proj_weight"):
            nora.add_lora(model, rank=2, targets=targets)
    assert not any(isinstance(m, nora.LoRALinear) for m in model.modules())
    nora.add_lora(model, rank=2, alpha=4, targets=("out_proj",))   # read as .weight by nn.MultiheadAttention
    attention = model.encoder.layers[0].self_attention
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.heads.head.weight.normal_()                 # torchvision starts the head at zero
        before = model(x)
        attention.out_proj.lora_B.normal_()
        after = model(x)
        assert (after - before).abs().max() > 1e-3        # the attention reads the adapted weight
        nora.merge(model)
        torch.testing.assert_close(model(x), after, atol=1e-6, rtol=1e-6)


def test_nora_in_a_transformer_encoder_layer_is_used_in_eval_mode_too():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=nn.GELU(), batch_first=True)
    x = torch.randn(2, 5, 16)
    nora.add_nora(layer, groups=4, example=x)
    with torch.no_grad():
        layer.linear1.weight.mul_(3)                      # pre-activations far enough out for NoRA to differ
        layer.activation.B_P.normal_(0, 1.0)
        train = layer.train()(x)
        evaluated = layer.eval()(x)                        # PyTorch's fast path would compute GELU itself
    torch.testing.assert_close(evaluated, train, atol=1e-5, rtol=1e-5)


def test_fused_projections_get_the_rows_the_caller_gives_and_names_match_at_dots():
    class GPTBigCodeAttention(nn.Module):                 # multi-query: q | k | v = 16 | 4 | 4 rows
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(16, 24), nn.Linear(16, 16)

        def forward(self, x):
            return self.c_proj(self.c_attn(x)[..., :16])

    assert nora.add_lora(nn.Sequential(GPTBigCodeAttention()), targets=("c_attn",))[0].c_attn.row_ranges == [(0, 24)]
    model = nn.Sequential(GPTBigCodeAttention())          # all rows, as no layout is guessed; or those given:
    nora.add_lora(model, rank=2, targets=("c_attn",), rows={"c_attn": [(0, 16)]})   # q alone, said by the caller
    assert model[0].c_attn.row_ranges == [(0, 16)]

    class DebertaAttention(nn.Module):                    # `pos_query_proj` is not `query_proj`
        def __init__(self):
            super().__init__()
            self.query_proj, self.pos_query_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.Sequential(DebertaAttention())
    nora.add_lora(model, rank=2, targets=("query_proj",))
    assert isinstance(model[0].query_proj, nora.LoRALinear) and type(model[0].pos_query_proj) is nn.Linear
    with pytest.raises(ValueError, match=r"named qkv; its layers are named \['pos_query_proj', 'query_proj'\]"):
        nora.add_lora(nn.Sequential(DebertaAttention()), targets=("qkv",))


def test_lora_on_hugging_faces_conv1d_merges_exactly():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(24, 8), nn.GELU(approximate="tanh"), pytorch_utils.Conv1D(8, 24))
    nora.add_lora(model, rank=2, alpha=4, targets=("0", "2"), rows={"0": [(0, 8), (16, 24)]})   # q and v, given
    assert model[0].fan_in_fan_out and model[0].row_ranges == [(0, 8), (16, 24)]
    in_out_layers_train_and_merge_exactly(model)


def test_replacing_relu_says_that_the_model_moves_at_init():
    with pytest.warns(UserWarning, match=r"ReLU's rational is up to 0\.18 off"):
        nora.add_nora(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), groups=2, target="relu", example=torch.randn(2, 4))


# --- Appendix C. Checks -----------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: nora.NoRA(0, 2), lambda: nora.NoRA(8, 0), lambda: nora.NoRA(8, 2, alpha=0.0),
    lambda: nora.NoRA(8, 2, alpha=float("nan")), lambda: train_vit.grow_groups(nora.NoRA(8, 2), 0),
    lambda: train_vit.grow_groups(nora.NoRA(8, 2), True),
    lambda: nora.NoRA(8, 2, alpha=1e300), lambda: nora.NoRA(8, 2, basis_scale=1e-9),
    lambda: nora.NoRA(8, 2, channel_dim="x"), lambda: nora.NoRA(8, 2, channel_dim=1.0),
    lambda: nora.NoRA(2, init=(torch.tensor(1.0), torch.tensor(2.0))),
    lambda: nora.NoRA(2, init=(torch.zeros(2, 2, 6), torch.zeros(2, 2, 4))),
    lambda: nora.fit_rational(F.gelu, num_degree=0), lambda: nora.fit_rational(F.gelu, den_degree=1),
    lambda: nora.fit_rational(F.gelu, num_degree=1.5), lambda: nora.fit_rational(F.gelu, num_degree=True),
    lambda: nora.fit_rational(F.gelu, iters=0), lambda: nora.fit_rational(torch.log),
    lambda: nora.fit_rational(F.gelu, x_range=(0, 0)), lambda: nora.fit_rational(F.gelu, x_range=(0, 1e-300)),
    lambda: nora.fit_rational(F.gelu, x_range=(-1e80, 1e80)), lambda: nora.fit_rational(F.gelu, weight=lambda x: -x * x),
    lambda: nora.add_lora(tiny_vit(), rank=0), lambda: nora.add_lora(tiny_vit(), rows={"qkv": [(0, 1000)]}),
    lambda: nora.freeze(tiny_vit(), 3), lambda: nora.freeze(tiny_vit(), ""),
    lambda: nora.add_nora(tiny_vit(), example=images(1), per_module=[("blocks.0.mlp.act", {})]),
    lambda: nora.add_nora(tiny_vit(), example=images(1), per_module={"blocks.0.mlp.act": dict(channel_dim=1.5)}),
    lambda: nora.add_nora(tiny_vit(), example=images(1), per_module={0: dict(groups=2), "blocks.0.mlp.act": None}),
    lambda: nora.add_nora(tiny_vit(), example=images(1), channel_dim=True),
])
def test_bad_arguments_fail_when_given_with_one_line_errors(make):
    with pytest.raises(ValueError):
        make()


def test_arguments_are_checked_by_type_and_stored_as_plain_python(tmp_path):
    for bad in (dict(groups=True), dict(rank=True), dict(alpha=True), dict(basis_scale=True), dict(groups=2.0)):
        with pytest.raises(ValueError, match="must be a positive"):
            nora.NoRA(**bad)
    m = nora.NoRA(groups=np.int64(8), rank=np.int32(2), alpha=np.float32(4), channel_dim=np.int64(-1))
    assert m.numerator.shape == (8, 6) and type(m.rank) is int and type(m.scaling) is float and type(m.channel_dim) is int
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU())
    nora.add_nora(model, groups=np.int64(2), example=torch.randn(2, 4), alpha=np.float32(4),
                  per_module={"1": dict(channel_dim=np.int64(-1))})
    nora.save_adapter(model, tmp_path / "a.safetensors")             # (numpy numbers are no JSON)


def test_a_rational_of_the_lowest_degrees_fit_rational_accepts_trains():
    num, den = nora.fit_rational(F.gelu, num_degree=1, den_degree=2, warn_above=10)
    m = nora.NoRA(2, 2, init=(num, den)).double()
    with torch.no_grad():
        m.B_P.normal_(), m.B_Q.normal_()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(nora.rational, (x, *(c.double().repeat(2, 1).requires_grad_() for c in (num, den))))
    assert torch.equal(nora.fit_rational(lambda x: x * 0)[0], torch.zeros(6, dtype=torch.float64))   # a zero function


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_of_half_inputs_are_computed_in_float32(dtype):
    num, den = (torch.tensor(c).repeat(1, 1) for c in nora.GELU_COEFFS)
    x = torch.tensor([[10.0, -10.0, 3.0, 0.5]])
    g32, = torch.autograd.grad(nora.rational(x.requires_grad_(), num, den).sum(), x)
    xh = x.detach().to(dtype).requires_grad_()
    g, = torch.autograd.grad(nora.rational(xh, num, den).sum(), xh)   # x^5 overflows float16
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), g32, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("damage", ["overlap", "bool offsets", "negative shape", "huge header", "short"])
def test_safetensors_reader_refuses_files_that_would_blow_up_or_lie(tmp_path, damage):
    import json
    import struct
    t = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    header = {"overlap": {"a": t, "b": t}, "bool offsets": {"a": {**t, "data_offsets": [False, 16]}},
              "negative shape": {"a": {**t, "shape": [-1, -4]}}}.get(damage, {"a": t})
    head = json.dumps(header).encode()
    length = 2 ** 64 - 1 if damage == "huge header" else len(head)
    data = struct.pack("<Q", length) + head + bytes(16)
    (tmp_path / "x.safetensors").write_bytes(data[:6] if damage == "short" else data)
    with pytest.raises(ValueError, match="x.safetensors is not a valid .safetensors file"):
        nora.read_safetensors(tmp_path / "x.safetensors")


def test_our_safetensors_writer_is_read_by_the_reference_reader_and_written_atomically(tmp_path, monkeypatch):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).to(torch.bfloat16),
             "d": torch.tensor(2.5, dtype=torch.float64)}
    nora.write_safetensors(tmp_path / "s.safetensors", state, {"k": "v"})
    back, meta = nora.read_safetensors(tmp_path / "s.safetensors", metadata=True)
    assert meta == {"k": "v"} and all(torch.equal(back[k], v) for k, v in state.items())
    safetensors = pytest.importorskip("safetensors.torch")              # the reference reader, where installed
    assert all(torch.equal(safetensors.load_file(tmp_path / "s.safetensors")[k], v) for k, v in state.items())
    before = (tmp_path / "s.safetensors").read_bytes()
    monkeypatch.setattr(nora.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):                     # a full disk mid-write
        nora.write_safetensors(tmp_path / "s.safetensors", {"a": torch.zeros(1000)})
    assert (tmp_path / "s.safetensors").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_write_atomic_follows_links_keeps_permissions_and_plants_nothing(tmp_path):
    import os
    target, link = tmp_path / "records.json", tmp_path / "link.json"
    target.write_text("old")
    os.chmod(target, 0o600)
    link.symlink_to(target)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for pid in range(os.getpid() - 2, os.getpid() + 3):              # the names the old writer would have used
        (tmp_path / f".link.json.{pid}.tmp").symlink_to(victim)
        (tmp_path / f".records.json.{pid}.tmp").symlink_to(victim)
    nora.write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new" and victim.read_text() == "keep"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    os.link(target, tmp_path / "hard.json")
    with pytest.raises(OSError, match="other hard link"):
        nora.write_atomic(target, "newer")
    assert (tmp_path / "hard.json").read_text() == "new"
    with pytest.raises(FileExistsError):
        nora.write_atomic(victim, "x", replace=False)
    assert victim.read_text() == "keep"


# --- Appendix E. The ViT and its weights ------------------------------------------------------

def test_vit_state_dict_has_timms_names_and_shapes():
    sd = nora.VisionTransformer("tiny").state_dict()
    assert sd["cls_token"].shape == (1, 1, 192) and sd["pos_embed"].shape == (1, 197, 192)
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert sd["blocks.11.attn.qkv.weight"].shape == (576, 192)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (768, 192) and sd["head.weight"].shape == (1000, 192)
    assert sum(v.numel() for v in sd.values()) == 5_717_416                   # timm's vit_tiny count
    assert "blocks.0.ls1.gamma" in nora.VisionTransformer("small", layer_scale=True).state_dict()


def test_our_vit_matches_timm_with_the_same_weights():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = nora.VisionTransformer("tiny", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict())
    x = images(2, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-fp16"])
def test_load_pretrained_from_safetensors(tmp_path, fmt):
    src = tiny_vit()
    for p in src.parameters():                 # make every tensor distinct from a fresh init
        nn.init.normal_(p, std=0.1)
    sd = src.state_dict()
    path = tmp_path / "w.safetensors"
    write_safetensors(path, sd if fmt == "safetensors" else {k: v.half() for k, v in sd.items()})
    dst = nora.load_pretrained(tiny_vit(), path)
    tol = dict(atol=1e-3, rtol=1e-3) if fmt.endswith("fp16") else dict(atol=0, rtol=0)
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, sd[k].to(v.dtype), **tol)


def test_a_pickled_checkpoint_is_refused_unread(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))
    torch.save({"model": tiny_vit().state_dict(), "evil": Evil()}, tmp_path / "w.pth")
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="(?s)w.pth is not a valid .safetensors file.*another file"):
        nora.load_pretrained(model, tmp_path / "w.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_pretrained_resamples_pos_embed_and_replaces_a_wrong_head(tmp_path, capsys):
    src = tiny_vit(num_classes=1000)
    with torch.no_grad():                     # position embedding value = row + 2 * column
        grid = torch.linspace(-1, 1, 2)
        src.pos_embed[0, 1:] = (grid[:, None, None] + 2 * grid[None, :, None]).reshape(4, 1) * torch.ones(192)
    write_safetensors(tmp_path / "w.safetensors", src.state_dict())
    model = tiny_vit(num_classes=10)
    model.patch_embed = nora.PatchEmbed(64, 16, 192)              # 64 px: a 4 x 4 grid
    model.pos_embed = nn.Parameter(torch.zeros(1, 17, 192))
    head = model.head.weight.detach().clone()
    nora.load_pretrained(model, tmp_path / "w.safetensors")
    assert "1000 classes" in capsys.readouterr().out
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.pos_embed[0, 0], src.pos_embed[0, 0])       # class position kept
    pe = model.pos_embed[0, 1:, 0].reshape(4, 4)
    # bicubic resampling is linear and separable, so steps along a row stay twice those down a
    # column (a transposed grid would swap them)
    torch.testing.assert_close(pe[0] - pe[0, 0], 2 * (pe[:, 0] - pe[0, 0]))
    assert (pe[0, 1:] > pe[0, :-1]).all()
    torch.testing.assert_close(pe.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_load_pretrained_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        nora.load_pretrained(tiny_vit(), tmp_path / "missing.safetensors")
    write_safetensors(tmp_path / "small.safetensors", nora.VisionTransformer("small", img_size=32).state_dict())
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not match this model"):
        nora.load_pretrained(model, tmp_path / "small.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("content, match", [
    (b"", "not a valid .safetensors"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ", "not a valid .safetensors"),
    (b"<!DOCTYPE html><html>", "not a valid .safetensors"),
    (len(h := b'{"w": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}').to_bytes(8, "little") + h + b"x",
     "unknown dtype"),
])
def test_corrupt_safetensors_name_the_file_and_say_what_to_do(tmp_path, content, match):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=f"(?s)bad.safetensors.*{match}.*another file"):
        nora.load_pretrained(tiny_vit(), tmp_path / "bad.safetensors")


def test_odd_downloads_are_refused_by_name_and_bad_ones_leave_the_cache(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / "x-wrong.safetensors"                 # a download of a ViT-S for a ViT-Tiny
    write_safetensors(cached, nora.VisionTransformer("small", img_size=32, depth=1).state_dict())
    with monkeypatch.context() as m:
        m.setattr(nora, "download", lambda url, cache_dir=None: cached)
        with pytest.raises(ValueError, match="(?s)does not match this model.*deleted"):
            nora.load_pretrained(tiny_vit(), "https://example.invalid/x-wrong.safetensors")
    assert not cached.exists()
    long = "http://127.0.0.1:9/" + "a" * 300 + ".safetensors"          # a name longer than a file name may be
    with pytest.raises(RuntimeError, match="could not download") as e:
        nora.download(long, cache_dir=tmp_path / "c")
    assert "too long" not in str(e.value)
    url = "http://127.0.0.1:9/folder.safetensors"                       # a cache entry that is a folder
    name = f"{__import__('hashlib').sha256(url.encode()).hexdigest()[:10]}-folder.safetensors"
    (tmp_path / "d" / name).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="is not a file; remove it"):
        nora.download(url, cache_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="not a URL"):
        nora.download("http://127.0.0.1:9/a\x00b.safetensors", cache_dir=tmp_path / "e")


def test_download_from_loopback_server_caches_and_verifies(tmp_path):
    src = tiny_vit()
    write_safetensors(tmp_path / "w.safetensors", src.state_dict())
    payload = (tmp_path / "w.safetensors").read_bytes()
    with _Server(payload) as server:
        model = nora.load_pretrained(tiny_vit(), f"{server.url}/model.safetensors", cache_dir=tmp_path / "cache")
        for k, v in model.state_dict().items():
            assert torch.equal(v, src.state_dict()[k])
        with pytest.raises(RuntimeError, match="(?s)could not download .*pass its local path"):
            nora.download(f"{server.url}/nothing-here", cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("model.safetensors")
    # the server is gone: the cached copy is used
    assert nora.download(f"{server.url}/model.safetensors", cache_dir=tmp_path / "cache") == cached[0]
    with _Server(payload) as server:
        # the hub's download button adds a query string: the cached name must keep its suffix
        path = nora.download(f"{server.url}/model.safetensors?download=true", cache_dir=tmp_path / "q")
        assert path.name.endswith("-model.safetensors")
        nora.load_pretrained(tiny_vit(), f"{server.url}/model.safetensors?download=true", cache_dir=tmp_path / "q")
    with _Server(b"<html>not found</html>") as server:              # an error page served as the file
        with pytest.raises(ValueError, match="(?s)not a valid .safetensors.*deleted: run again"):
            nora.load_pretrained(tiny_vit(), f"{server.url}/model.safetensors", cache_dir=tmp_path / "html")
    assert not any((tmp_path / "html").iterdir())                 # the bad copy is not kept


def test_download_offline_says_how_to_use_a_local_file(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)offline.*local path"):
        nora.download("http://127.0.0.1:9/model.safetensors", cache_dir=tmp_path)   # port 9: nothing listens


# --- train_vit.py and fit_gelu.py -------------------------------------------------------------

@pytest.mark.parametrize("method", __import__("train_vit").METHODS)
def test_train_vit_runs_every_method_and_writes_results(cifar_root, tmp_path, method):
    import json
    import train_vit
    dataset = "cifar100" if method in ("nora", "lora", "rational") else "cifar10"
    out = tmp_path / "results.json"
    for _ in range(2):                                              # appends, not overwrites
        rec = train_vit.main(["--dataset", dataset, "--data-root", str(cifar_root), "--method", method,
                              "--out", str(out), *TINY_RUN])
    records = json.loads(out.read_text())
    assert len(records) == 2 and records[0]["method"] == method and records[0]["dataset"] == dataset
    assert records[0]["accuracy"] == records[1]["accuracy"]          # seeded: the same run twice
    assert 0 < rec["trainable"] <= rec["total"] and len(rec["history"]) == 1
    if method.startswith("nora"):                                   # how far NoRA moved in 1 step: a little,
        assert 0 < rec["drift"] < 1.0         # (ours at its default lr 3e-2, monomials at 1e-3)
        assert rec["layers_b_n_below_zero"] == 0
    else:
        assert rec["drift"] is None


def test_table5_adapts_one_side_only():
    import train_vit
    count = lambda model: sum(p.numel() for m in model.modules() if isinstance(m, nora.NoRA)
                              for p in m.parameters() if p.requires_grad)
    assert count(train_vit.prepare(tiny_vit(), "nora-num")) == 2 * (2 * 6 + 8 * 2)         # 2 blocks
    assert count(train_vit.prepare(tiny_vit(), "nora-den")) == 2 * (2 * 4 + 8 * 2)
    model = train_vit.prepare(tiny_vit(), "nora-num")
    train_steps(model, steps=3)
    for m in (m for m in model.modules() if isinstance(m, nora.NoRA)):
        num, den = m.coefficients()
        assert not torch.equal(num, m.numerator) and torch.equal(den, m.denominator)


def test_nf4_levels_are_a_buffer_that_moves_with_the_layer():
    q = train_vit.NF4Linear(nn.Linear(64, 8))
    assert "levels" in dict(q.named_buffers()) and "levels" not in q.state_dict()
    assert q.to(torch.float64).levels.dtype == torch.float64 and q.weight.dtype == torch.float64


def test_merge_refuses_a_quantised_base_instead_of_dropping_the_update():
    model = __import__("train_vit").prepare(tiny_vit(), "qlora", lora_rank=2)
    train_steps(model, steps=2)
    x = images(2)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(TypeError, match="no stored weight"):
            nora.merge(model)
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_train_vit_default_learning_rates_are_the_validation_choices_and_any_lr_flag_overrides_them():
    import train_vit
    lrs = lambda *argv: train_vit.learning_rates(train_vit.parse_args(list(argv)))
    assert lrs() == (1e-3, train_vit.HEAD_LR, train_vit.NORA_LR) == (1e-3, 1e-2, 3e-2)   # dev/RESULTS.md
    assert lrs("--method", "lora")[:2] == (1e-3, train_vit.HEAD_LR)       # LoRA keeps the paper's 1e-3
    assert lrs("--method", "nora-monomial") == (1e-3, train_vit.HEAD_LR, 1e-3)   # the paper's basis: its lr
    assert lrs("--method", "nora", "--basis-scale", "1")[2] == 1e-3       # so does NoRA(basis_scale=1)
    assert lrs("--lr", "3e-2") == (3e-2, 3e-2, 3e-2)                      # --lr: everything at it (the paper)
    assert lrs("--lr", "3e-2", "--head-lr", "0.1", "--nora-lr", "1e-3") == (3e-2, 0.1, 1e-3)


def test_train_vit_saved_adapter_reloads_to_the_same_accuracy(cifar_root, tmp_path, capsys):
    import train_vit
    save = tmp_path / "adapter.pt"
    rec = train_vit.main(["--data-root", str(cifar_root), "--method", "nora++", "--save", str(save), *TINY_RUN])
    assert save.stat().st_size < 200_000
    again = train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", str(save),
                            "--plot-activations", str(tmp_path / "a.svg"), *TINY_RUN])
    assert again["accuracy"] == rec["accuracy"] and (tmp_path / "a.svg").read_text().startswith("<svg")
    # the saved run's dataset is used even when the command line does not repeat it: this folder
    # holds only CIFAR-100, so reading the default CIFAR-10 would fail
    only100 = tmp_path / "only100"
    write_cifar(only100, "cifar100", n_train=60)
    rec100 = train_vit.main(["--data-root", str(only100), "--dataset", "cifar100", "--method", "nora",
                             "--save", str(save), *TINY_RUN])
    again = train_vit.main(["--data-root", str(only100), "--no-download", "--eval-adapter", str(save), *TINY_RUN])
    assert again["accuracy"] == rec100["accuracy"]


def test_saved_run_remembers_its_checkpoint_file(cifar_root, tmp_path):
    import train_vit
    ckpt = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    nora.write_safetensors(ckpt, nora.VisionTransformer("tiny", img_size=32, depth=1, num_classes=0).state_dict())
    run = [a for a in TINY_RUN if a not in ("--weights", "none")]
    save = tmp_path / "adapter.pt"
    rec = train_vit.main(["--data-root", str(cifar_root), "--weights", str(ckpt), "--save", str(save), *run])
    again = train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", str(save), *run])   # no --weights
    assert again["accuracy"] == rec["accuracy"]


def test_eval_adapter_refuses_a_bare_state_dict_and_never_unpickles_code(cifar_root, tmp_path):
    import train_vit
    nora.save_adapter(nora.add_nora(tiny_vit(), example=images(1)), tmp_path / "bare.safetensors")
    with pytest.raises(SystemExit, match="not a train_vit.py --save file"):
        train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", str(tmp_path / "bare.safetensors"), *TINY_RUN])

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))
    torch.save({"args": Evil(), "state": {}}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="could not be read"):
        train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", str(tmp_path / "evil.pt"), *TINY_RUN])


@pytest.mark.parametrize("settings, says", [
    (dict(method="bogus"), "invalid choice"), (dict(dataset="mnist"), "invalid choice"), (dict(model="x"), "invalid choice"),
    (dict(img_size=0), "at least 1"), (dict(img_size=40000), "at most 1024"), (dict(depth=-1), "must be positive"),
    (dict(depth=99), "at most 12"), (dict(lora_rank=10 ** 9), "at most 192"), (dict(rank="two"), "invalid int"),
    (dict(weights="http://127.0.0.1:9/w.safetensors"), "names a URL"), (dict(method="dora"), "keep NoRA and LoRA"),
])
def test_eval_adapter_checks_the_files_run_settings_as_it_checks_flags(cifar_root, tmp_path, capsys, settings, says):
    import json
    import train_vit
    run = {"method": "nora", "groups": 8, "rank": 2, "model": nora.DEFAULT_WEIGHTS, "img_size": 32, "depth": 1,
           "dataset": "cifar10", "seed": 0, "weights": "none", **settings}
    nora.write_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(1)}, {"train_vit": json.dumps(run)})
    with pytest.raises(SystemExit) as e:
        train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", str(tmp_path / "a.safetensors"),
                        "--no-compile"])
    assert says in capsys.readouterr().err + str(e.value.code)
def test_model_records_set_architecture_and_normalisation(monkeypatch, tmp_path):
    import train_vit
    args = train_vit.parse_args(["--model", "vit_small_patch14_dinov2.lvd142m", "--weights", "none", "--depth", "1",
                                 "--img-size", "28", "--dataset", "cifar100"])
    model, _ = train_vit.build_model(args)
    assert model.patch_embed.proj.kernel_size == (14, 14) and model.cls_token.shape[-1] == 384
    assert hasattr(model.blocks[0].ls1, "gamma") and args.mean == nora.IMAGENET_MEAN
    # a record's name downloads timm's checkpoint from the hub (here a local file stands in)
    ckpt = tmp_path / "w.safetensors"
    nora.write_safetensors(ckpt, nora.VisionTransformer("tiny", img_size=32, depth=1).state_dict())
    asked = []
    monkeypatch.setattr(nora, "download", lambda url, cache_dir=None: asked.append(url) or ckpt)
    nora.load_pretrained(nora.VisionTransformer("tiny", img_size=32, depth=1), "deit_tiny_patch16_224.fb_in1k")
    assert asked == ["https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors"]


def test_plots_are_svg_files_with_one_panel_per_layer(cifar_root, tmp_path):
    import xml.dom.minidom
    import fit_gelu
    import train_vit
    fit_gelu.main(["--plot", str(tmp_path / "fit.svg")])
    svg = xml.dom.minidom.parse(str(tmp_path / "fit.svg"))
    assert len(svg.getElementsByTagName("polyline")) == 3                  # GELU, its rational, the error
    run = [a if a != "1" else "2" for a in TINY_RUN]                        # --depth 2, --epochs 2
    train_vit.main(["--data-root", str(cifar_root), "--groups", "4", "--plot-activations", str(tmp_path / "a.svg"), *run])
    svg = xml.dom.minidom.parse(str(tmp_path / "a.svg"))
    titles = [t.firstChild.data for t in svg.getElementsByTagName("text")]
    assert "blocks.0" in titles and "blocks.1" in titles
    assert "blocks.1: minus GELU" in titles
    assert len(svg.getElementsByTagName("polyline")) == 2 * (1 + 4 + 4)   # per layer: GELU + 4 groups, 4 changes


def test_train_vit_grows_groups_and_runs_a_table(cifar_root, tmp_path, monkeypatch):
    import train_vit
    monkeypatch.chdir(tmp_path)
    rec = train_vit.main(["--data-root", str(cifar_root), "--groups", "32", "--grow-from", "8", "--rank", "3", *TINY_RUN])
    assert rec["trainable"] == 3 * 10 + 2 * 32 * 3 + 192 * 10 + 10
    train_vit.main(["--data-root", str(cifar_root), "--dataset", "cifar100", "--table", "activations", *TINY_RUN])
    text = (tmp_path / "table-activations-cifar100-paper.md").read_text()
    assert "| prelu |" in text and "| nora |" in text and "77.46" in text


def test_the_benchmark_runs_and_reports_ratios(tmp_path):
    """Smoke test of the benchmark command (paper Table 6 and the rational alone): it must run and write
    its tables. The timings it prints are measurements, not assertions."""
    bench = dev_script("bench")
    bench.main(["--repeats", "1", "--batch", "1", "--threads", "2", "--out", str(tmp_path / "b.md")])
    text = (tmp_path / "b.md").read_text()
    for row in ("| GELU |", "| ours, eager |", "| LoRA |", "| NoRA, eager |", "| NoRA++, eager |", "| NoRA merged, eager |"):
        assert row in text
    assert "| NoRA, eager | 624 |" in text                # NoRA's trainable count at G = 8, r = 2: 12 x 52
    assert "| GELU | 1 | 8 | 1 | 12 |" in text   # one pass each way: read x, write y (float32)


def test_train_vit_missing_data_offline_says_where_to_put_it(tmp_path):
    import train_vit
    with pytest.raises(SystemExit, match="not found. Put the extracted"):
        train_vit.main(["--data-root", str(tmp_path), "--no-download", *TINY_RUN])
    incomplete = tmp_path / "inc"
    write_cifar(incomplete, "cifar10")
    (incomplete / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(SystemExit, match="data_batch_3 is missing"):
        train_vit.main(["--data-root", str(incomplete), *TINY_RUN])


@pytest.mark.parametrize("damage", ["empty", "truncated", "shape", "labels"])
def test_corrupt_cifar_batches_name_the_file(tmp_path, damage):
    import pickle
    import train_vit
    write_cifar(tmp_path, "cifar10")
    f = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage in ("empty", "truncated"):
        f.write_bytes(b"" if damage == "empty" else f.read_bytes()[:100])
    else:
        batch = pickle.loads(f.read_bytes())
        if damage == "shape":
            batch["data"] = batch["data"][:, :100]
        else:
            del batch["labels"]
        f.write_bytes(pickle.dumps(batch))
    with pytest.raises(SystemExit, match="data_batch_2 is not a valid cifar10 batch.*re-download"):
        train_vit.main(["--data-root", str(tmp_path), "--no-download", *TINY_RUN])


def test_train_vit_downloads_cifar_from_a_server_and_checks_its_md5(tmp_path, monkeypatch):
    import hashlib
    import tarfile
    import train_vit
    write_cifar(tmp_path / "src", "cifar10")
    with tarfile.open(tmp_path / "cifar.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    payload = (tmp_path / "cifar.tar.gz").read_bytes()
    folder, train_files, test_file, key, _, _ = train_vit.CIFAR["cifar10"]
    with _Server(payload, path="/cifar-10-python.tar.gz") as server:
        url = f"{server.url}/cifar-10-python.tar.gz"
        monkeypatch.setitem(train_vit.CIFAR, "cifar10", (folder, train_files, test_file, key, url, "0" * 32))
        with pytest.raises(SystemExit, match="could not download cifar10"):
            train_vit.main(["--data-root", str(tmp_path / "bad"), *TINY_RUN])
        md5 = hashlib.md5(payload).hexdigest()
        monkeypatch.setitem(train_vit.CIFAR, "cifar10", (folder, train_files, test_file, key, url, md5))
        rec = train_vit.main(["--data-root", str(tmp_path / "data"), *TINY_RUN])
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file() and rec["accuracy"] >= 0


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--steps", "-1"], ["--batch-size", "0"], ["--log-every", "0"], ["--groups", "0"],
    ["--alpha", "nan"], ["--table", "methods", "--save", "a.pt"], ["--table", "methods", "--method", "lora"],
    ["--table", "methods", "--eval-adapter", "a.pt"], ["--eval-adapter", "missing.pt"],
    ["--save", "no/such/folder/a.pt"], ["--out", "."], ["--out", "corrupt.json"], ["--out", "object.json"],
    ["--table", "methods", "--plot-activations", "a.svg"], ["--table", "study"],
])
def test_train_vit_rejects_bad_arguments_before_training(tmp_path, monkeypatch, capsys, argv):
    import train_vit
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.json").write_text("[{")
    (tmp_path / "object.json").write_text("{}")
    (tmp_path / "a.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        train_vit.main(["--data-root", str(tmp_path / "nothing"), "--no-download", *TINY_RUN, *argv])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err       # argparse's usage error, not a traceback


def test_train_vit_main_leaves_the_callers_torch_settings_alone(cifar_root):
    import train_vit
    threads = torch.get_num_threads()
    train_vit.main(["--data-root", str(cifar_root), "--method", "head", *TINY_RUN, "--threads", "1"])
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads


def test_the_training_loop_syncs_with_the_device_only_when_it_logs(cifar_root, tmp_path, monkeypatch):
    import inspect
    import train_vit
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if inspect.stack()[1].function == "train":    # called by train_vit.train itself
                calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(train_vit, "evaluate", lambda *a, **k: 50.0)   # epoch-end evaluation: not the loop
    train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--epochs", "2", "--log-every", "2",
                    "--out", str(tmp_path / "r.json")])
    assert calls == ["item"] * 4                          # 8 steps, logged every 2: one loss.item() each


def test_train_vit_compiles_the_rational_by_default_with_the_eager_result(cifar_root, tmp_path, capsys):
    import train_vit
    run = lambda *flags: train_vit.main(["--data-root", str(cifar_root), *TINY_RUN[:-1], *flags,
                                         "--epochs", "2", "--out", str(tmp_path / "r.json")])
    eager = run("--no-compile")
    compiled = run()
    if "rational: compiled" not in capsys.readouterr().out:
        pytest.skip("torch.compile is not available here")
    assert nora._kernels["forward"] is nora._rational_forward      # main() leaves the library as it found it
    assert compiled["history"] == eager["history"]
    assert compiled["drift"] == pytest.approx(eager["drift"], rel=1e-4)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_torchrun_with_two_processes_trains_what_one_process_trains(cifar_root, tmp_path):
    import json
    import subprocess
    import train_vit
    flags = ["--data-root", str(cifar_root), *TINY_RUN, "--epochs", "2", "--batch-size", "10"]
    train_vit.main([*flags, "--save", str(tmp_path / "one.pt"), "--out", str(tmp_path / "one.json")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train_vit.py", *flags, "--threads", "1", "--save", str(tmp_path / "two.pt"),
                           "--out", str(tmp_path / "two.json")],
                          cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("RESULT") == 1                                  # only rank 0 prints
    assert len(json.loads((tmp_path / "two.json").read_text())) == 1        # and writes one record
    one, two = (nora.read_safetensors(tmp_path / f) for f in ("one.pt", "two.pt"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5)
    assert not torch.equal(one["blocks.0.mlp.act.B_P"], torch.zeros_like(one["blocks.0.mlp.act.B_P"]))


def test_cifar_batches_cannot_run_code_and_are_checked_for_type_and_range(tmp_path):
    import os
    import pickle
    import train_vit

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    for name, batch in (("code", {"data": Evil(), "labels": [0]}),
                        ("float", {"data": np.random.rand(4, 3072), "labels": [0, 1, 2, 3]}),
                        ("labels", {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 999]})):
        root = tmp_path / name
        write_cifar(root, "cifar10")
        with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
            pickle.dump(batch, f)
        with pytest.raises(SystemExit, match="data_batch_2 is not a valid cifar10 batch"):
            train_vit.main(["--data-root", str(root), *TINY_RUN])
    assert not (tmp_path / "ran").exists()


def test_records_survive_two_writers_and_a_crash(tmp_path):
    import json
    import multiprocessing
    import train_vit
    out = tmp_path / "r.json"
    (tmp_path / "link.json").symlink_to(out)             # the second writer names the file through a link
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(_append_records, [(str(tmp_path / f), w) for w, f in enumerate(("r.json", "link.json"))])
    records = json.loads(out.read_text())
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(2) for i in range(25)]
    before = out.read_bytes()
    args = type("Args", (), dict(out=str(out), process=0))()
    real = train_vit.nora.os.replace
    train_vit.nora.os.replace = lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    try:
        with pytest.raises(OSError):
            train_vit.append_record(args, {"writer": 9, "i": 0})
    finally:
        train_vit.nora.os.replace = real
    assert out.read_bytes() == before


def _append_records(out, writer):
    import train_vit
    args = type("Args", (), dict(out=out, process=0))()
    for i in range(25):
        train_vit.append_record(args, {"writer": writer, "i": i})


@pytest.mark.parametrize("argv", [
    ["--save", "same.json", "--out", "same.json"], ["--save", "x.svg", "--plot-activations", "x.svg"],
    ["--eval-adapter", "a.pt", "--save", "b.safetensors"], ["--train-subset", "-5"], ["--test-subset", "-1"],
    ["--threads", "-1"], ["--grow-from", "3", "--groups", "8"], ["--groups", "7"], ["--img-size", "8"],
    ["--out", "list.json"], ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--groups", "7"],
])
def test_train_vit_refuses_clashing_outputs_and_impossible_flags_before_reading_data(tmp_path, monkeypatch, capsys, argv):
    import train_vit
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        train_vit.main(["--data-root", str(tmp_path / "nothing"), "--no-download", *TINY_RUN[:-2], *argv])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_train_vit_never_writes_over_what_it_reads(cifar_root, tmp_path, capsys):
    import shutil
    import train_vit
    data = tmp_path / "data"
    shutil.copytree(cifar_root, data)
    (tmp_path / "keep.safetensors").write_bytes(b"x")
    (tmp_path / "w.pth").write_bytes(b"x")
    for argv in (["--eval-adapter", str(tmp_path / "keep.safetensors"), "--plot-activations", str(tmp_path / "keep.safetensors")],
                 ["--weights", str(tmp_path / "w.pth"), "--save", str(tmp_path / "w.pth")],
                 ["--save", str(data / "cifar-10-batches-py" / "test_batch")]):
        with pytest.raises(SystemExit) as e:
            train_vit.main(["--data-root", str(data), *TINY_RUN[2:], *argv])
        assert e.value.code == 2 and "would be overwritten" in capsys.readouterr().err
    assert (tmp_path / "keep.safetensors").read_bytes() == b"x" and (tmp_path / "w.pth").read_bytes() == b"x"


def test_train_vit_stops_with_a_message_where_the_batch_is_larger_than_the_data(cifar_root):
    import train_vit
    with pytest.raises(SystemExit, match="--batch-size 64 is more than the 40 training images"):
        train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--batch-size", "64"])


def test_eval_adapter_restores_the_seed_and_writes_a_record_and_tables_never_replace_each_other(cifar_root, tmp_path,
                                                                                                monkeypatch):
    import json
    import train_vit
    monkeypatch.chdir(tmp_path)
    rec = train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--seed", "3", "--save", "a.safetensors"])
    again = train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--eval-adapter", "a.safetensors",
                            "--out", "e.json"])                             # --weights none: the backbone is the seed's
    assert again["accuracy"] == rec["accuracy"]
    assert json.loads((tmp_path / "e.json").read_text())[0]["eval_adapter"] == "a.safetensors"
    args = train_vit.parse_args(["--table", "methods"])
    train_vit.write_table(args, "methods", "a finished table")
    train_vit.write_table(args, "methods", "an empty template")          # a mistyped redraw
    assert (tmp_path / "table-methods-cifar10-paper.md").read_text() == "a finished table\n"
    assert (tmp_path / "table-methods-cifar10-paper-2.md").read_text() == "an empty template\n"


def test_fit_gelu_reads_images_without_running_code(tmp_path, monkeypatch):
    import os
    import fit_gelu

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")          # a common workaround that disarms torch.load
    with pytest.raises((Exception, SystemExit)):
        fit_gelu.vit_and_images("vit_tiny_patch16_224.augreg_in21k_ft_in1k", str(write_checkpoint(tmp_path)),
                                str(tmp_path / "evil.pt"), 32)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv, says", [
    (["--range", "0", "1e-300"], "--range"), (["--out", "."], "is a folder"), (["--plot", "/missing/x.svg"], "folder that does not exist"),
    (["--out", "W", "--weights", "W"], "is an input of this run"), (["--out", "a.json", "--plot", "a.json"], "same file"),
    (["--weights", "W"], "not a valid .safetensors"),      # read before the fits, not after them
])
def test_fit_gelu_refuses_before_any_work_and_never_writes_over_its_inputs(tmp_path, monkeypatch, capsys, argv, says):
    import fit_gelu
    monkeypatch.chdir(tmp_path)
    (tmp_path / "W").write_bytes(b"checkpoint")
    monkeypatch.setattr(nora, "fit_rational", lambda *a, **k: pytest.fail("fitted before refusing"))
    if "--range" in argv:
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        fit_gelu.main(argv)
    assert says in capsys.readouterr().err + str(e.value.code) and e.value.code != 0
    assert (tmp_path / "W").read_bytes() == b"checkpoint"


def test_train_vit_says_what_is_missing_before_it_compiles_and_saves_only_what_it_can_load(tmp_path, monkeypatch,
                                                                                            capsys):
    import train_vit
    monkeypatch.setattr(train_vit, "use_compiled_rational", lambda **k: pytest.fail("compiled before finding the data"))
    with pytest.raises(SystemExit, match="not found. Put the extracted"):
        train_vit.main(["--data-root", str(tmp_path), "--no-download", "--weights", "none", "--depth", "1"])
    with pytest.raises(SystemExit) as e:
        train_vit.main(["--data-root", str(tmp_path), "--method", "vpt", "--save", str(tmp_path / "a.safetensors")])
    assert e.value.code == 2 and "keep NoRA and LoRA adapters" in capsys.readouterr().err


def test_eval_adapter_refuses_flags_that_differ_from_the_saved_run_and_finds_its_checkpoint_anywhere(cifar_root,
                                                                                                         tmp_path,
                                                                                                         monkeypatch):
    import train_vit
    ckpt = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    nora.write_safetensors(ckpt, nora.VisionTransformer("tiny", img_size=32, depth=2, num_classes=0).state_dict())
    run = [a for a in TINY_RUN if a not in ("--weights", "none")]             # --depth 1 of a depth-2 checkpoint
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    rec = train_vit.main(["--data-root", str(cifar_root), "--weights", "../w.safetensors", "--save", "s.safetensors",
                          *run])
    monkeypatch.chdir(tmp_path)                          # elsewhere: the saved relative path would miss it
    again = train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", "a/s.safetensors", *run])
    assert again["accuracy"] == rec["accuracy"]
    with pytest.raises(SystemExit, match="differ from --seed 7"):
        train_vit.main(["--data-root", str(cifar_root), "--eval-adapter", "a/s.safetensors", *run, "--seed", "7"])
    (tmp_path / "r.json").write_text("[]")
    (tmp_path / "r2.json").hardlink_to(tmp_path / "r.json")
    with pytest.raises(SystemExit) as e:                 # refused before it trains, not when it writes
        train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--out", "r.json"])
    assert e.value.code == 2 and (tmp_path / "r2.json").read_text() == "[]"


def test_outputs_that_are_no_regular_files_are_refused_and_flags_are_compared_as_parsed(cifar_root, tmp_path,
                                                                                           monkeypatch, capsys):
    import os
    import train_vit
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="no regular file"):
        nora.write_atomic(tmp_path / "fifo", "x")
    for argv in (["--save", "fifo"], ["--out", "/dev/null"]):
        with pytest.raises(SystemExit) as e:             # before any data is read (reading --out would block)
            train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, *argv])
        assert e.value.code == 2 and "no regular file" in capsys.readouterr().err
    train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--seed", "3", "--save", "s.safetensors"])
    for spelt in (["--seed=5"], ["--see", "5"]):           # however the flag is spelt
        with pytest.raises(SystemExit, match="differ from --seed 5"):
            train_vit.main(["--data-root", str(cifar_root), *TINY_RUN, "--eval-adapter", "s.safetensors", *spelt])
    (tmp_path / "table-t-cifar10-paper.md").mkdir()        # a folder with a table's name
    assert train_vit.write_table(train_vit.parse_args([]), "t", "a table").name == "table-t-cifar10-paper-2.md"


def test_tables_finishing_together_keep_every_table(tmp_path, monkeypatch):
    import threading
    import train_vit
    monkeypatch.chdir(tmp_path)
    args = train_vit.parse_args(["--table", "methods"])
    for trial in range(5):
        texts = [f"table {trial}.{i}" for i in range(4)]
        threads = [threading.Thread(target=train_vit.write_table, args=(args, f"t{trial}", text)) for text in texts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        written = sorted(f.read_text() for f in tmp_path.glob(f"table-t{trial}-*.md"))
        assert written == sorted(text + "\n" for text in texts)


def write_checkpoint(folder):
    torch.manual_seed(0)
    nora.write_safetensors(folder / "w.safetensors", nora.VisionTransformer("tiny", img_size=32, depth=1,
                                                                            num_classes=0).state_dict())
    return folder / "w.safetensors"


# --- dev/ scripts -----------------------------------------------------------------------------

def test_study_picks_each_lr_on_validation_and_reports_test_over_seeds(cifar_root, tmp_path, monkeypatch):
    import json
    import train_vit
    sweeps = dev_script("sweeps")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "STUDY", {"head": (1e-3, 1e-2), "nora": (1e-3,)})
    monkeypatch.setattr(sweeps, "STABILITY", dict(lrs=(1e-2,), groups=(8,), ranks=(2,)))
    seen = []
    real_evaluate = train_vit.evaluate
    monkeypatch.setattr(train_vit, "evaluate", lambda m, x, y, *a: seen.append(len(x)) or real_evaluate(m, x, y, *a))
    sweeps.main(["study", "--data-root", str(cifar_root), "--seeds", "2", "--val-fraction", "0.25",
                    *TINY_RUN])
    text = latest_table(tmp_path, "study")
    assert "| head | 0.001: " in text and "| nora | 0.001: " in text and "validation split of 10 training images" in text
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["head", "head", "head", "nora", "nora"]
    assert all(r["head_lr"] is None for r in records[:3]) and {r["head_lr"] for r in records[3:]} <= {1e-3, 1e-2}
    assert seen.count(20) == 3 + 2                   # the test set: every run's (recorded), chosen on validation
    (tmp_path / "results.json").unlink()
    sweeps.main(["study", "--data-root", str(cifar_root), "--rows", "nora", "--head-lr", "0.01",
                    "--seeds", "1", *TINY_RUN])
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["head_lr"]) for r in records] == [("nora", 0.01)]
    text = latest_table(tmp_path, "study")
    assert "The head trains at --head-lr (0.01)" in text and "nora++" not in text      # no row, no note
    (tmp_path / "results.json").unlink()
    monkeypatch.setitem(sweeps.STUDY, "nora++", (1e-3,))
    sweeps.main(["study", "--data-root", str(cifar_root), "--rows", "nora++", "--head-lr", "0.01",
                    "--nora-lr", "0.03", "--seeds", "1", *TINY_RUN])          # NoRA at its own lr, LoRA swept
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["lr"], r["head_lr"], r["nora_lr"]) for r in records] == [("nora++", 1e-3, 0.01, 0.03)]
    assert "in nora++, NoRA's parameters train at --nora-lr (0.03)" in latest_table(tmp_path, "study")
    (tmp_path / "results.json").unlink()
    monkeypatch.setitem(sweeps.STUDY, "head", (1e-2,))
    sweeps.main(["stability", "--data-root", str(cifar_root), *TINY_RUN])
    text = latest_table(tmp_path, "stability")
    assert "| NoRA G = 8, r = 2 |" in text and "the head trains at lr 0.01 in every run" in text
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["head", "nora", "nora-monomial", "nora-monomial"]
    assert [(r["lr"], r["head_lr"]) for r in records] == [(1e-2, None)] + [(1e-2, 1e-2)] * 3


def test_sweeps_choose_on_validation_never_on_test(cifar_root, tmp_path, monkeypatch):
    import train_vit
    sweeps = dev_script("sweeps")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "STUDY", {"head": (1e-3, 1e-2, 1e-1)})
    # scores by (images scored, the run's lr): validation (10 images) prefers 1e-2, the test set (20) 1e-1
    score = {(10, 1e-3): 50.0, (10, 1e-2): 70.0, (10, 1e-1): 60.0, (20, 1e-3): 10.0, (20, 1e-2): 20.0, (20, 1e-1): 90.0}
    running, real_train = {}, train_vit.train
    monkeypatch.setattr(train_vit, "train", lambda args, *a, **k: running.update(lr=args.lr) or real_train(args, *a, **k))
    monkeypatch.setattr(train_vit, "evaluate", lambda m, x, *a: score[len(x), running["lr"]])
    sweeps.main(["study", "--data-root", str(cifar_root), "--seeds", "1", "--val-fraction", "0.25", *TINY_RUN])
    text = latest_table(tmp_path, "study")
    assert "| head | 0.001: 50.0, 0.01: 70.0, 0.1: 60.0 | 0.01 | 20.0 +- 0.0 |" in text


def test_frontier_plot_draws_each_familys_frontier_through_the_sizes_that_beat_every_smaller_one(tmp_path):
    sweeps = dev_script("sweeps")
    # (backbone params, mean, sd): the 100-parameter size is worse than the 10-parameter one, so the
    # line skips it; a family with one point has no line
    sweeps.plot_frontier(tmp_path / "f.svg", [("nora", [(1000, 85.0, 1.0), (10, 80.0, 1.0), (100, 79.0, 1.0)]),
                                                 ("vpt", [(50, 70.0, 0.0)])], head=60.0)
    svg = (tmp_path / "f.svg").read_text()
    (line,) = re.findall(r'<polyline points="([^"]*)"', svg)
    xs = [float(p.split(",")[0]) for p in line.split()]
    circles = sorted(float(x) for x in re.findall(r'<circle cx="([^"]*)"', svg))
    assert len(circles) == 4 and xs == [circles[0], circles[3]]      # 10 and 1000 parameters, in order


def test_frontier_resumes_from_its_results_and_redraws_without_training(cifar_root, tmp_path, monkeypatch):
    import json
    import train_vit
    sweeps = dev_script("sweeps")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweeps, "FRONTIER", {
        "head": dict(method="head", lrs=(1e-3, 1e-2), choose={}, check=[], sizes=[{}]),
        "lora": dict(method="lora", lrs=(1e-3, 1e-2, 1e-1), choose=dict(lora_rank=2), check=[dict(lora_rank=1)],
                     sizes=[dict(lora_rank=1), dict(lora_rank=2)]),
        "nora": dict(method="nora", lrs=(1e-3, 1e-2, 1e-1), choose=dict(groups=8, rank=2), check=[dict(groups=8, rank=1)],
                     sizes=[dict(groups=8, rank=1), dict(groups=8, rank=2)]),
        "full": dict(method="full", lrs=(1e-3, 1e-2, 1e-1), choose={}, check=[], sizes=[{}], head_lr=3e-3)})
    argv = ["frontier", "--data-root", str(cifar_root), "--seeds", "3", "--val-fraction", "0.25",
            "--plot", "f.svg", *TINY_RUN]
    # validation (10 images) prefers the head at 1e-2, the top of its grid, then 3e-2 one step beyond,
    # the new top, below 1e-1 two steps beyond; LoRA and NoRA at 1e-2, inside theirs, with their head
    # at 1e-2, a step below the head family's: that row wins at the bottom of the head lrs, so 3e-3 is
    # tried too, and loses. LoRA's check at r = 1 prefers 1e-1, the top of the family's lr and its
    # neighbours, so it tries 3e-1 too, which loses: r = 1 runs its seeds at 1e-1. Full fine-tuning's
    # head is fixed at 3e-3: one grid. The test set (20 images) scores every run 50.
    score, head_bonus = {1e-3: 10.0, 1e-2: 30.0, 3e-2: 40.0, 1e-1: 5.0, 3e-1: 0.0}, {1e-2: 5.0, 3e-3: 2.0}
    trained, real_train = [], train_vit.train
    monkeypatch.setattr(train_vit, "train", lambda args, *a, **k: trained.append(args) or real_train(args, *a, **k))

    def validation(a):
        return score[a.lr] + head_bonus.get(a.head_lr, 0) + 50 * (a.method == "lora" and a.lora_rank == 1 and a.lr == 1e-1)
    monkeypatch.setattr(train_vit, "evaluate", lambda m, x, *a: validation(trained[-1]) if len(x) == 10 else 50.0)
    sweeps.main(argv)
    # head: 2 lrs, 3e-2 and 1e-1 (the grid grew twice), seeds 1 and 2; lora: 3 lrs x 3 head lrs at
    # r = 2, r = 1 at 1e-2, r = 1 at its two neighbours and one step beyond (the check), seeds 1 and
    # 2 of both sizes; nora: the same but the step beyond; full: 3 lrs, seeds 1 and 2. Seed 1 runs at
    # every point before seed 2 does.
    assert len(trained) == 6 + 17 + 16 + 5
    assert [a.lr for a in trained if a.method == "lora" and a.lora_rank == 1] == [1e-2, 1e-3, 1e-1, 3e-1, 1e-1, 1e-1]
    assert [a.seed for a in trained[-12:]] == [1] * 6 + [2] * 6
    assert [a.lr for a in trained[:4]] == [1e-3, 1e-2, 3e-2, 1e-1] and trained[4].head_lr == 1e-2
    assert {a.head_lr for a in trained if a.method == "head"} == {None}
    assert {a.head_lr for a in trained if a.method in ("lora", "nora")} == {3e-3, 1e-2, 3e-2}
    assert {a.head_lr for a in trained[4 + 9 + 9:] if a.method in ("lora", "nora")} == {1e-2}   # after the choice: the chosen
    assert [(a.lr, a.head_lr) for a in trained if a.method == "full"] == [(1e-3, 3e-3), (1e-2, 3e-3), (1e-1, 3e-3), (1e-2, 3e-3), (1e-2, 3e-3)]
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 44 and all(r["validation"] is not None and r["test"] is not None for r in records)
    assert {r["backbone"] for r in records if r["method"] == "nora" and r["rank"] == 1} == {(8 * 1 + 6 + 8 * 1 + 4) * 1}
    text = (tmp_path / "table-frontier-cifar10-paper.md").read_text()
    assert "| nora G = 8, r = 1 | 26 | 0.01, head 0.01 | 50.0 +- 0.0 | 50.0, 50.0, 50.0 | 3 of 3 |" in text
    assert "| lora r = 1 | 768 | 0.1, head 0.01 | 50.0 +- 0.0 | 50.0, 50.0, 50.0 | 3 of 3 |" in text
    assert "| lora r = 1 | 0.001: 15.0, 0.01: 35.0, 0.1: 60.0, 0.3: 5.0 | 0.1, head 0.01 |" in text
    assert "| head (chosen here) | 0.001: 10.0, 0.01: 30.0, 0.03: 40.0, 0.1: 5.0 | 0.03 |" in text
    assert "| nora G = 8, r = 2 (chosen here) with the head at 0.003 | 0.001: 12.0, 0.01: 32.0, 0.1: 7.0 | 0.01, head 0.01 |" in text
    assert "| nora G = 8, r = 1 | 0.001: 15.0, 0.01: 35.0, 0.1: 10.0 | 0.01, head 0.01 |" in text and "Gap closed" in text
    svg = (tmp_path / "f.svg").read_text()
    assert "| full (chosen here) with the head at 0.003 | 0.001: 12.0, 0.01: 32.0, 0.1: 7.0 | 0.01, head 0.003 |" in text
    assert svg.count("<circle") == 5 and "head only" in svg
    # interrupted: the last run is missing; only it trains again, and the table is the same
    (tmp_path / "results.json").write_text(json.dumps(records[:-1]))
    trained.clear()
    sweeps.main(argv)
    assert len(trained) == 1 and (tmp_path / "table-frontier-cifar10-paper.md").read_text() == text
    # --redraw: no data read, no training, the same figure
    trained.clear()
    sweeps.main(["frontier", "--redraw", "--data-root", str(cifar_root), "--plot", "g.svg", "--seeds", "3", "--val-fraction", "0.25",
                    *TINY_RUN])
    assert not trained and (tmp_path / "g.svg").read_text() == svg


@pytest.mark.parametrize("argv", [
    ["stability", "--rows", "nora"], ["study", "--rows", "nope"], ["study", "--rows", "nora"],
    ["study", "--rows", "nora++", "--head-lr", "0.01"], ["study", "--plot", "f.svg"], ["study", "--redraw"],
    ["frontier", "--table", "methods"], ["frontier", "--method", "lora"], ["study", "--seeds", "0"],
    ["study", "--val-fraction", "1.5"], ["frontier", "--plot", "no/such/folder/f.svg"], ["nope"],
])
def test_sweeps_reject_bad_arguments_before_training(tmp_path, monkeypatch, capsys, argv):
    sweeps = dev_script("sweeps")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sweeps.main([*argv, "--data-root", str(tmp_path / "nothing"), "--no-download", *TINY_RUN])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_gpu_check_dry_run_passes_every_check_on_the_cpu(tmp_path):
    """dev/gpu_check.py is the one command a lent GPU runs: its CPU dry run, on tiny sizes and the same
    code path (gloo for NCCL, no network), must pass every check before device time is spent."""
    import json
    import subprocess
    done = subprocess.run([sys.executable, "dev/gpu_check.py", "--device", "cpu", "--small", "--out", str(tmp_path)],
                          cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| FAIL" not in report and "| ERROR" not in report, report
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(data["checks"]) >= 25 and all(c["result"] == "PASS" for c in data["checks"])
    assert data["data"]["recompiles"] == 0 and not data["notes"]        # no recompiles, no section skipped
    assert {"activation", "vit", "projected_minutes", "flagship", "torchrun"} <= data["data"].keys()
