"""NoRA on models nobody on this project wrote: the basic workflow, checked end to end.

    python dev/interop.py                 # torchvision; timm and Hugging Face too where installed
    python dev/interop.py --unweighted    # the same with the unweighted [-8, 8] fits (the earlier ones)

For each model (random weights, tiny configs, small inputs, nothing downloaded): add_nora, the
output change of the swap at init, a few training steps, the adapter saved as a tensors-only state
dict and loaded into a fresh model (max difference), merge (max difference), NoRA++ (LoRA added
too, trained, merged), torch.export of the merged model, and HF's save_pretrained. test_nora.py
runs `check` on the torchvision models; timm and transformers are not dependencies, so this
script covers them.
"""
import copy
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nora  # noqa: E402


def output(y):
    """The tensor a model returns, also from HF's output objects and tuples."""
    y = getattr(y, "logits", getattr(y, "last_hidden_state", y))
    return y[0] if isinstance(y, (tuple, list)) else y


def train(model, x, steps=3, lr=1e-2):
    """A few AdamW steps on a made-up loss, in train mode (so BatchNorm statistics move too);
    NoRA's B gets a random start first, so that the update is not zero after so few steps."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nora.NoRA):
                m.B_P.normal_(0, 0.5), m.B_Q.normal_(0, 0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = output(model(x)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def max_diff(a, b):
    return (output(a).float() - output(b).float()).abs().max().item()


def check(make, x, lora_targets=None, groups=4, rank=2, **nora_kwargs):
    """Run the NoRA workflow on make() with input x; returns a dict with one entry per column."""
    torch.manual_seed(0)
    base = make().eval()
    with torch.no_grad():                                 # torchvision's ViT starts with a zero head: all outputs 0
        for p in base.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    row = {}
    with torch.no_grad():
        y0 = base(x)
    model = nora.add_nora(copy.deepcopy(base), groups, rank, **nora_kwargs)
    kinds = sorted({f"{type(m).__name__}" for m in base.modules() if id(m) in
                    {id(b) for b, a in zip(base.modules(), model.modules()) if isinstance(a, nora.NoRA)}})
    noras = [m for m in model.modules() if isinstance(m, nora.NoRA)]
    row["replaced"] = f"{len(noras)} {'/'.join(kinds)}" + (" (dim 1)" if any(m.channel_dim == 1 for m in noras) else "")
    with torch.no_grad():
        row["init change"] = max_diff(model(x), y0) / output(y0).abs().max().item()
    train(model, x)
    with torch.no_grad():
        y1 = model(x)
    state = nora.adapter_state_dict(model, extra=())
    assert all(isinstance(v, torch.Tensor) for v in state.values()), "state dict holds non-tensors"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = nora.add_nora(copy.deepcopy(base), groups, rank, **nora_kwargs)
    nora.load_adapter(fresh, torch.load(buffer, weights_only=True))
    with torch.no_grad():
        row["round trip"] = max_diff(fresh(x), y1)
        row["merge"] = max_diff(nora.merge(fresh)(x), y1)
    try:
        exported = torch.export.export(fresh, (x,))
        with torch.no_grad():
            row["export"] = f"ok ({max_diff(exported.module()(x), y1):.1e})"
    except Exception as e:                                # report, do not stop: the table says what failed
        row["export"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if hasattr(fresh, "save_pretrained"):                 # Hugging Face: a state dict of tensors only
        with tempfile.TemporaryDirectory() as folder:
            fresh.save_pretrained(folder)
            row["save_pretrained"] = "ok"
    if lora_targets:
        plus = nora.add_lora(nora.add_nora(copy.deepcopy(base), groups, rank, **nora_kwargs), rank=2, alpha=4,
                             targets=lora_targets)
        train(plus, x, steps=2)
        with torch.no_grad():
            y2 = plus(x)
            row["NoRA++ merge"] = max_diff(nora.merge(plus)(x), y2)
    return row


def torchvision_models():
    from torchvision.models import ConvNeXt, MaxVit, SwinTransformer, VisionTransformer
    from torchvision.models.convnext import CNBlockConfig
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "torchvision vit (vit_b_16's classes)": (lambda: VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), img,
                                                 ("qkv", "out_proj")),
        "torchvision swin_t's classes": (lambda: SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10),
                                         img, ("qkv",)),
        "torchvision convnext_tiny's classes": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                                                                 num_classes=10), img, None),
        "torchvision maxvit_t's classes": (lambda: MaxVit((32, 32), 8, 2, [16, 32], [1, 1], 8, 0.0, num_classes=10),
                                           img, ("to_qkv",)),
    }


def timm_models():
    import timm
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(pretrained=False, num_classes=10, img_size=32)
    return {
        "timm vit_tiny_patch16_224 (depth 2)": (lambda: timm.create_model("vit_tiny_patch16_224", depth=2, **kw), img,
                                                ("qkv",)),
        "timm convnext_atto, conv_mlp": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10,
                                                                   conv_mlp=True), img, None),
        "timm convnext_atto, channels-last MLP": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10, conv_mlp=False), img, None),
    }


def hf_models():
    import transformers as hf
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    small = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2)
    return {
        "HF GPT-2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=100, n_layer=2, n_head=2, n_embd=32,
                                                               n_positions=16, use_cache=False)), ids, ("c_attn", "c_proj")),
        "HF BERT": (lambda: hf.BertModel(hf.BertConfig(hidden_size=32, intermediate_size=64, **small)), ids,
                    ("query", "value")),
        "HF LLaMA": (lambda: hf.LlamaForCausalLM(hf.LlamaConfig(hidden_size=32, intermediate_size=64,
                                                                num_key_value_heads=2, use_cache=False, **small)), ids,
                     ("q_proj", "v_proj")),
    }


def main():
    if "--unweighted" in sys.argv:
        for name, fn in nora.ACTIVATIONS.items():
            nora.COEFFS[name] = nora.fit_rational(fn, x_range=(-8, 8), weight=None)
    families = [torchvision_models]
    for module, models in (("timm", timm_models), ("transformers", hf_models)):
        try:
            __import__(module)
            families.append(models)
        except ImportError:
            print(f"({module} is not installed: its models are skipped)")
    rows = []
    for family in families:
        for name, (make, x, targets) in family().items():
            kwargs = dict(target="silu") if "LLaMA" in name else {}
            row = check(make, x, targets, **kwargs)
            rows.append((name, row))
            print(name, row, flush=True)
    columns = ["replaced", "init change", "round trip", "merge", "NoRA++ merge", "export", "save_pretrained"]
    fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else str(v)
    print("\n| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(fmt(row.get(c, "n/a")) for c in columns) + " |")


if __name__ == "__main__":
    main()
