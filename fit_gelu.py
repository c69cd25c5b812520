"""Fit the safe rational P(x) / (1 + |S(x)|) of nora.py to GELU (and SiLU, ReLU) and show where the fit holds.

    python fit_gelu.py                     # GELU on [-12, 12], weighted by nora.preactivation_weight
    python fit_gelu.py --all               # GELU, its tanh approximation, SiLU and ReLU
    python fit_gelu.py --range -8 8 --unweighted   # another fitting range, every point weighted alike
    python fit_gelu.py --plot fit.svg      # and draw them

Prints the coefficients in a form that can be pasted into nora.py, a table of max / mean error
on several ranges, and the values at far-out points. With --model (a record of nora.PRETRAINED)
and --weights (its checkpoint file; without it, the hub's) it also measures where that model's
fc1 outputs (the GELU inputs) lie, on random-noise images or, with --images, on a .pt tensor of
normalised images, and how strongly the rational's output responds to each coefficient there, in
the paper's monomial basis and in NoRA's (x/3)^i:

    python fit_gelu.py --model vit_small_patch14_dinov2.lvd142m --weights dinov2_vits14.safetensors --img-size 56
"""
import argparse
import colorsys
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import nora

ACTIVATIONS = nora.ACTIVATIONS


# Plain SVG line plots that any browser shows, so drawing adds no dependency (train_vit.py and
# dev/sweeps.py draw with them too).

def hue(degrees):
    """A strong colour ``degrees`` round the colour wheel, as '#rrggbb' (not CSS hsl(), which some
    SVG renderers draw black)."""
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
    nora.write_atomic(path, "\n".join(out + ["</svg>"]) + "\n")


def error_table(fn, num, den, ranges=(3, 6, 8, 10, 12, 16)):
    rows = []
    for r in ranges:
        x = torch.linspace(-r, r, 20001, dtype=torch.float64)
        err = (nora.rational(x[None], num[None], den[None])[0] - fn(x)).abs()
        rows.append((f"[-{r}, {r}]", err.max().item(), err.mean().item()))
    return rows


def vit_and_images(model_name, weights, images, img_size):
    """The checkpoint's ViT and the images to run it on, read before any fit: a bad file stops the
    script before it works, not after."""
    model = nora.create_vit(model_name, img_size=img_size, num_classes=0)
    try:
        nora.load_pretrained(model, weights or model_name, verbose=False)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    try:
        x = torch.load(images, weights_only=True) if images else torch.randn(8, 3, img_size, img_size,
                                                                             generator=torch.Generator().manual_seed(0))
    except Exception as e:                                # not a torch file, or one that holds code
        raise SystemExit(f"error: --images {images} could not be read as a tensor ({type(e).__name__}: {e})")
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3 and x.is_floating_point()):
        raise SystemExit(f"error: --images {images} holds no (N, 3, S, S) float tensor of normalised images")
    return model.eval(), x


def preactivation_ranges(model, x, label):
    """Where the ViT's fc1 outputs (the GELU inputs) lie on ``x``, and how strongly the output of the
    GELU rational responds to each numerator coefficient there, in the paper's monomial basis and
    in NoRA's scaled basis (x/s)^i (nora.NoRA)."""
    seen = []
    for block in model.blocks:
        block.mlp.act.register_forward_hook(lambda m, inp, out: seen.append(inp[0].flatten()))
    with torch.no_grad():
        model(x)
    print(f"\nfc1 outputs of {label}:")
    print("| layer | min | max | 0.01% | 99.99% | beyond +-8 |\n|---|---|---|---|---|---|")
    for i, a in enumerate(seen):
        q = torch.quantile(a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:10**6]],
                           torch.tensor([1e-4, 1 - 1e-4]))
        print(f"| {i} | {a.min():.2f} | {a.max():.2f} | {q[0]:.2f} | {q[1]:.2f} | {(a.abs() > 8).float().mean():.2e} |")
    a = torch.cat(seen).double()
    print("\nthe model's output when every GELU is swapped for a rational (the swap NoRA makes at step 0), "
          "relative to the GELU model's:\n| rational | change (L2) | change (max) |\n|---|---|---|")
    with torch.no_grad():
        y = model(x)
        for name, coeffs in (("shipped GELU fit (nora.GELU_COEFFS)", nora.GELU_COEFFS),
                             ("unweighted fit on [-8, 8]", nora.fit_rational(F.gelu, x_range=(-8, 8), weight=None))):
            for block in model.blocks:
                block.mlp.act = nora.NoRA(1, init=coeffs)   # B = 0: the base rational itself
            d = model(x) - y
            print(f"| {name} | {d.norm() / y.norm():.2%} | {d.abs().max() / y.abs().max():.2%} |")
    num, den = (torch.tensor(c, dtype=torch.float64) for c in nora.GELU_COEFFS)
    Q = 1 / nora.rational_reference(a[:, None], torch.ones(1, 1, dtype=torch.float64), den[None])[:, 0]   # P = 1
    s = nora.NoRA().basis_scale
    print(f"\nrms over these inputs of d phi / d(update of a_i) = (x/s)^i / Q(x), i = 0 .. {len(num) - 1}:")
    for name, scale in (("paper's monomials (s = 1)", 1.0), (f"NoRA's basis (s = {s:g})", s)):
        print(f"  {name}: " + ", ".join(f"{((a / scale) ** i / Q).pow(2).mean().sqrt():.3g}" for i in range(len(num))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--range", nargs=2, type=float, default=(-12.0, 12.0), metavar=("LO", "HI"))
    p.add_argument("--unweighted", action="store_true", help="weight every point of the range alike "
                   "(default: nora.preactivation_weight, where a pretrained ViT's GELU inputs lie)")
    p.add_argument("--all", action="store_true", help="also fit tanh-GELU, SiLU and ReLU")
    p.add_argument("--out", help="also write the coefficients and errors to this JSON file")
    p.add_argument("--weights", help="a ViT checkpoint (file or URL) whose pre-activations to measure")
    p.add_argument("--model", choices=nora.PRETRAINED,
                   help="the ViT that --weights fits (nora.PRETRAINED; default: the paper's ViT-Tiny); "
                        "given alone, its checkpoint is downloaded")
    p.add_argument("--images", help="a .pt tensor (N, 3, S, S) of normalised images for --weights")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--plot", help="draw each activation and its fitted rational, and the error, into this .svg file")
    args = p.parse_args(argv)
    patch = nora.PRETRAINED[args.model or nora.DEFAULT_WEIGHTS]["patch_size"]
    if not patch <= args.img_size <= 1024:
        p.error(f"--img-size must lie in [{patch}, 1024] (the model's patch; a size that fits), got {args.img_size}")
    for flag, path in (("--images", args.images), ("--weights", args.weights)):
        if path and "://" not in path and not Path(path).is_file():
            p.error(f"{flag} {path}: no such file; give the path of one")
    outputs = [Path(f) for f in (args.out, args.plot) if f]      # checked before any work, never over an input
    inputs = {Path(f).resolve() for f in (args.weights, args.images) if f and "://" not in f}
    for path in outputs:
        try:
            if nora.check_writable(path) in inputs:      # what nora.write_atomic would refuse, refused now
                raise OSError(f"{path} is an input of this run; give the output another path")
        except OSError as e:
            p.error(f"{path}: {e.strerror or e}")
    if len({path.resolve() for path in outputs}) < len(outputs):
        p.error("--out and --plot name the same file; give each its own")
    measured = vit_and_images(args.model or nora.DEFAULT_WEIGHTS, args.weights, args.images, args.img_size) \
        if args.weights or args.model else None
    try:
        nora.fit_rational(F.gelu, x_range=tuple(args.range), iters=1, warn_above=float("inf"))
    except ValueError as e:                               # (the range, before the real fits)
        p.error(f"--range: {e}")

    results, panels = {}, []
    for name in (ACTIVATIONS if args.all else ["gelu"]):
        fn = ACTIVATIONS[name]
        weight = None if args.unweighted else nora.preactivation_weight
        num, den = nora.fit_rational(fn, x_range=tuple(args.range), weight=weight)
        print(f"\n{name.upper()} fitted on [{args.range[0]:g}, {args.range[1]:g}]"
              f"{', unweighted' if args.unweighted else ''}; paste into nora.py:")
        print(f"{name.upper()}_COEFFS = (\n    [{', '.join(f'{c:.10e}' for c in num)}],\n"
              f"    [{', '.join(f'{c:.10e}' for c in den)}],\n)")
        table = error_table(fn, num, den)
        print("| range | max error | mean error |\n|---|---|---|")
        for r, mx, mean in table:
            print(f"| {r} | {mx:.4g} | {mean:.3g} |")
        far = torch.tensor([-20.0, -10.0, 10.0, 20.0], dtype=torch.float64)
        y = nora.rational(far[None], num[None], den[None])[0]
        print("far out: " + ", ".join(f"f({x:g}) = {v:.3f} (true {t:.3f})" for x, v, t in zip(far, y, fn(far))))
        x = torch.linspace(-12, 12, 241, dtype=torch.float64)
        y = nora.rational(x[None], num[None], den[None])[0]
        r = torch.linspace(*args.range, 241, dtype=torch.float64)          # the error on the fit range
        e = nora.rational(r[None], num[None], den[None])[0] - fn(r)
        panels += [(f"{name.upper()} (grey, dashed) and its rational", [(x, fn(x), "#888", True), (x, y, "#c33", False)]),
                   (f"rational - {name.upper()} on the fit range", [(r, e, "#c33", False)])]
        results[name] = {"range": list(args.range), "numerator": num.tolist(), "denominator": den.tolist(),
                         "errors": [{"range": r, "max": mx, "mean": mean} for r, mx, mean in table]}
    if args.out:
        nora.write_atomic(args.out, json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    if args.plot:
        write_svg(args.plot, panels, columns=2, width=360)
        print(f"\nwrote {args.plot}")
    if measured:
        preactivation_ranges(*measured, f"{args.weights or args.model} on "
                                        f"{'images ' + args.images if args.images else 'random-noise images'}")


if __name__ == "__main__":
    main()
