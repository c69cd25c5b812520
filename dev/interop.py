"""NoRA on models nobody on this project wrote: the basic workflow, checked end to end.

    python dev/interop.py                 # torchvision; timm and Hugging Face too where installed
    python dev/interop.py --unweighted    # the same with the unweighted [-8, 8] fits (the earlier ones)
    python dev/interop.py Mixtral timm    # only the models whose names contain one of these words

For each model (random weights, tiny configs, small inputs, nothing downloaded): add_nora, the
output change of the swap at init, a few training steps, the adapter saved as a tensors-only state
dict and loaded into a fresh model (max difference), merge (max difference), NoRA++ (LoRA added
too, trained, merged), torch.export of the merged model, and HF's save_pretrained. test_nora.py
runs `check` on the torchvision models; timm and transformers are not dependencies, so this
script covers them.
"""
import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nora  # noqa: E402


def output(y):
    """The tensor a model returns, also from HF's output objects and tuples."""
    y = getattr(y, "logits", getattr(y, "last_hidden_state", y))
    return y[0] if isinstance(y, (tuple, list)) else y


def call(model, x):
    """model(x), or model(**x) for a dict of keyword arguments (T5's input_ids and decoder_input_ids)."""
    return model(**x) if isinstance(x, dict) else model(x)


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
        loss = output(call(model, x)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def max_diff(a, b):
    return (output(a).float() - output(b).float()).abs().max().item()


def check(make, x, lora_targets=None, groups=4, rank=2, **nora_kwargs):
    """Run the NoRA workflow on make() with input x (also add_nora's example, from which it sees each
    activation's channel axis and width); returns a dict with one entry per column. ``lora_targets``:
    add_lora's targets, or a dict of its keyword arguments (targets=, rows=)."""
    nora_kwargs = dict(example=x, **nora_kwargs)
    torch.manual_seed(0)
    base = make().eval()
    with torch.no_grad():                                 # torchvision's ViT starts with a zero head: all outputs 0;
        for name, p in base.named_parameters():           # timm's SwinV2 zeroes its res-post-norm scales: dead branches
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
            elif name.endswith("weight") and not p.any():
                p.fill_(1)
    row = {}
    with torch.no_grad():
        y0 = call(base, x)
    adapted = lambda m: nora.add_nora(m, groups, rank, **nora_kwargs)   # the same call, to train and to load into
    model = nora.freeze(adapted(copy.deepcopy(base)))
    kinds = sorted({f"{type(m).__name__}" for m in base.modules() if id(m) in
                    {id(b) for b, a in zip(base.modules(), model.modules()) if isinstance(a, nora.NoRA)}})
    noras = [m for m in model.modules() if isinstance(m, nora.NoRA)]
    dims = sorted({m.channel_dim for m in noras} - {-1})                   # (N, C, H, W) stages: dim 1
    row["replaced"] = f"{len(noras)} {'/'.join(kinds)}" + (f" (dim {', '.join(map(str, dims))})" if dims else "")
    with torch.no_grad():
        row["init change"] = max_diff(call(model, x), y0) / output(y0).abs().max().item()
    train(model, x)
    with torch.no_grad():
        y1 = call(model, x)
    with tempfile.TemporaryDirectory() as folder:        # the adapter file, loaded into the plain model's adapters
        nora.save_adapter(model, f"{folder}/a.safetensors", extra=(), statistics=True)
        fresh = nora.load_adapter(adapted(copy.deepcopy(base)), f"{folder}/a.safetensors", extra=(), statistics=True)
    with torch.no_grad():
        row["round trip"] = max_diff(call(fresh, x), y1)
        row["merge"] = max_diff(call(nora.merge(fresh), x), y1)
    try:
        exported = torch.export.export(fresh, (), x) if isinstance(x, dict) else torch.export.export(fresh, (x,))
        with torch.no_grad():
            row["export"] = f"ok ({max_diff(call(exported.module(), x), y1):.1e})"
    except Exception as e:                                # report, do not stop: the table says what failed
        row["export"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if hasattr(fresh, "save_pretrained"):                 # Hugging Face: a state dict of tensors only
        with tempfile.TemporaryDirectory() as folder:
            fresh.save_pretrained(folder)
            row["save_pretrained"] = "ok"
    if lora_targets:
        lora = lora_targets if isinstance(lora_targets, dict) else dict(targets=lora_targets)
        plus = nora.freeze(nora.add_lora(adapted(copy.deepcopy(base)), rank=2, alpha=4, **lora))
        train(plus, x, steps=2)
        with torch.no_grad():
            y2 = call(plus, x)
            row["NoRA++ merge"] = max_diff(call(nora.merge(plus), x), y2)
    return row


def torchvision_models():
    """{name: (make, input, LoRA targets or None, add_nora's settings)}: tiny configs of torchvision's classes."""
    from torchvision.models import ConvNeXt, EfficientNet, MaxVit, MobileNetV3, SwinTransformer, VisionTransformer
    from torchvision.models.convnext import CNBlockConfig
    from torchvision.models.efficientnet import _efficientnet_conf
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    efficientnet = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    mobilenet = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return {
        "torchvision vit (vit_b_16's classes)": (lambda: VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), img,
                                                 ("out_proj",), {}),
        "torchvision swin_t's classes": (lambda: SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10),
                                         img, ("qkv",), {}),
        "torchvision swin_v2_t's classes": (lambda: SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10,
                                                                    block=SwinTransformerBlockV2,
                                                                    downsample_layer=PatchMergingV2), img, ("qkv",), {}),
        "torchvision convnext_tiny's classes": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                                                                 num_classes=10), img, None, {}),
        "torchvision maxvit_t's classes": (lambda: MaxVit((32, 32), 8, 2, [16, 32], [1, 1], 8, 0.0, num_classes=10),
                                           img, ("to_qkv",), {}),
        # SiLU everywhere; the squeeze-excitation activations see 2 to 10 channels: one group there
        "torchvision efficientnet_b0's classes": (lambda: EfficientNet(efficientnet[0], 0.2, last_channel=efficientnet[1],
                                                                       num_classes=10), img, None,
                                                  dict(target="silu", groups=2)),
        "torchvision mobilenet_v3_small's classes": (lambda: MobileNetV3(*mobilenet, num_classes=10), img, None,
                                                     dict(target="relu", groups=2)),
    }


def timm_models():
    import timm
    from timm.layers import SwiGLU
    from timm.models.mlp_mixer import MlpMixer
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    img64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    img96 = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))   # no map as wide as it is deep
    kw = dict(pretrained=False, num_classes=10)
    vit = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, **kw)     # the small ViT-like ones
    create = lambda name, **more: lambda: timm.create_model(name, **more)
    return {
        "timm vit_tiny_patch16_224 (depth 2)": (create("vit_tiny_patch16_224", depth=2, img_size=32, **kw), img,
                                                ("qkv",), {}),
        "timm convnext_atto, conv_mlp": (create("convnext_atto", conv_mlp=True, **kw), img, None, {}),
        "timm convnext_atto, channels-last MLP": (create("convnext_atto", conv_mlp=False, **kw), img, None, {}),
        "timm MlpMixer (mixer_s16_224's class)": (lambda: MlpMixer(10, 32, patch_size=8, num_blocks=2, embed_dim=32),
                                                  img, None, {}),
        # GluMlp: its SiLU gets a chunk of fc1's output, no layer's output whole: the axis is said
        "timm eva02_tiny_patch14_224 (GluMlp: SiLU on a chunk)": (
            create("eva02_tiny_patch14_224", **{**vit, "embed_dim": 48, "img_size": 28}), img[..., :28, :28],
            ("qkv",), dict(target="silu", channel_dim=-1)),
        "timm ViT, mlp_layer=SwiGLU": (create("vit_tiny_patch16_224", mlp_layer=SwiGLU, act_layer="silu", **vit), img,
                                       ("qkv",), dict(target="silu")),
        # LeViT's attention projections act on attn @ v, which no layer made: add_nora asks for their axis (the
        # last); its stem's activations get (N, C, H, W) maps, which the example shows, so -1 there is refused
        "timm levit_128s (Hardswish; channel_dim=-1, the stem's 1)": (
            create("levit_128s", img_size=64, **kw), img64, None,
            dict(target=torch.nn.Hardswish, channel_dim=-1, init=nora.fit_rational(F.hardswish, warn_above=0.05),
                 per_module={f"stem.act{i}": dict(channel_dim=1) for i in (1, 2, 3)})),
        "timm beit_base_patch16_224": (create("beit_base_patch16_224", **vit), img, ("qkv",), {}),
        "timm deit_tiny_distilled_patch16_224": (create("deit_tiny_distilled_patch16_224", **vit), img, ("qkv",), {}),
        "timm swinv2_tiny_window8_256": (create("swinv2_tiny_window8_256", embed_dim=16, depths=(1, 1),
                                                num_heads=(1, 2), window_size=4, img_size=32, **kw), img, ("qkv",), {}),
        # its convolutions' SiLU is called inside timm's BatchNormAct2d, on no layer's output: their axis is said
        "timm mobilevit_xxs (SiLU; per_module: its BatchNormAct2d on dim 1)": (
            create("mobilevit_xxs", **kw), img96, ("qkv",),
            dict(target="silu", per_module={p: dict(channel_dim=1) for p, m in
                                            timm.create_model("mobilevit_xxs", **kw).named_modules()
                                            if p.endswith("bn.act") and type(m) is torch.nn.SiLU})),
    }


def hf_models():
    import transformers as hf
    from transformers.activations import QuickGELUActivation
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    seed = lambda: torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 8), generator=seed())
    img = torch.randn(2, 3, 32, 32, generator=seed())
    small = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2)
    enc = dict(hidden_size=32, intermediate_size=64, **small)                      # BERT-like
    llm = dict(num_key_value_heads=1, use_cache=False, **enc)                      # decoders, grouped-query
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    qv = ("q_proj", "v_proj")
    quick_gelu = dict(target=QuickGELUActivation, init=nora.fit_rational(lambda x: x * torch.sigmoid(1.702 * x)))
    silu = dict(target="silu")
    moe = dict(num_local_experts=4, num_experts_per_tok=2, **llm)
    experts = {f"model.layers.{i}.mlp.experts.act_fn": dict(channel_dim=-1) for i in range(2)}
    return {
        "HF GPT-2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=100, n_layer=2, n_head=2, n_embd=32,
                                                               n_positions=16, use_cache=False)), ids,
                     ("c_attn", "c_proj"), {}),
        "HF BERT": (lambda: hf.BertModel(hf.BertConfig(**enc)), ids, ("query", "value"), {}),
        "HF LLaMA": (lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**dict(llm, num_key_value_heads=2))), ids, qv, silu),
        "HF CLIP vision (quick_gelu)": (lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**vision)), img, qv, quick_gelu),
        "HF CLIP text (quick_gelu)": (lambda: hf.CLIPTextModel(hf.CLIPTextConfig(max_position_embeddings=16, **enc)),
                                      ids, qv, quick_gelu),
        "HF T5 (gated-gelu)": (lambda: hf.T5Model(hf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64,
                                                              num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                                                              use_cache=False)),
                               dict(input_ids=ids, decoder_input_ids=ids), ("q", "v"), {}),
        "HF DistilBERT": (lambda: hf.DistilBertModel(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64,
                                                                          n_layers=2, n_heads=2)), ids,
                          ("q_lin", "v_lin"), {}),
        "HF Whisper encoder": (lambda: WhisperEncoder(hf.WhisperConfig(d_model=32, encoder_layers=2,
                                                                       encoder_attention_heads=2, encoder_ffn_dim=64,
                                                                       num_mel_bins=8, max_source_positions=8)),
                               torch.randn(2, 8, 16, generator=seed()), qv, {}),
        # mask_time_prob=0: its training-mode masks come from numpy's RNG, which would change the table at each run;
        # its positional convolution's GELU gets a slice that drops the last time step: the axis is said
        "HF wav2vec2": (lambda: hf.Wav2Vec2Model(hf.Wav2Vec2Config(conv_dim=(16, 16), conv_stride=(5, 2),
                                                                   conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                                   num_conv_pos_embedding_groups=2, mask_time_prob=0.0,
                                                                   **enc)),
                        torch.randn(2, 400, generator=seed()), qv,
                        dict(per_module={"encoder.pos_conv_embed.activation": dict(channel_dim=1)})),
        "HF Mistral": (lambda: hf.MistralForCausalLM(hf.MistralConfig(**llm)), ids, qv, silu),
        "HF Qwen2": (lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**llm)), ids, qv, silu),
        "HF Gemma": (lambda: hf.GemmaForCausalLM(hf.GemmaConfig(head_dim=16, **llm)), ids, qv, {}),
        "HF Phi": (lambda: hf.PhiForCausalLM(hf.PhiConfig(**llm)), ids, qv, {}),
        "HF OPT (ReLU)": (lambda: hf.OPTForCausalLM(hf.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                                                                   use_cache=False, **small)), ids, qv,
                          dict(target="relu")),
        # the experts' SiLU gets a chunk of a product with the 3-D expert weights, which no layer makes: add_nora
        # refuses to guess (at intermediate 16 it once took the routed tokens for channels) and per_module says it
        "HF Mixtral (per_module given)": (lambda: hf.MixtralForCausalLM(hf.MixtralConfig(**moe)), ids, qv,
                                          dict(silu, per_module=experts)),
        # fused query_key_value is q | k | v per head (2 heads of 16 rows): the rows of each head's q and v
        "HF GPT-NeoX (LoRA rows: q, v per head)": (lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(use_cache=False,
                                                                                                  **enc)), ids,
                                                   dict(targets=("query_key_value",), rows={"query_key_value": [
                                                       (0, 16), (32, 48), (48, 64), (80, 96)]}), {}),
        # multi-query query_key_value: q (32 rows) | k (16) | v (16), and row ranges share one width: q, and the
        # attention's output projection
        "HF Falcon (LoRA: q rows, dense)": (lambda: hf.FalconForCausalLM(hf.FalconConfig(hidden_size=32,
                                                                                         use_cache=False, **small)),
                                            ids, dict(targets=("query_key_value", "dense"),
                                                      rows={"query_key_value": [(0, 32)]}), {}),
        # fused query_key_value is q | k | v per head: LoRA on the attention's output projection instead
        "HF Bloom (LoRA: dense)": (lambda: hf.BloomForCausalLM(hf.BloomConfig(vocab_size=100, hidden_size=32,
                                                                              n_layer=2, n_head=2, use_cache=False)),
                                   ids, ("dense",), {}),
        "HF ViT": (lambda: hf.ViTModel(hf.ViTConfig(**vision)), img, qv, {}),    # transformers 5: q_proj, not query
        "HF DeBERTa-v2 (relative attention)": (lambda: hf.DebertaV2Model(hf.DebertaV2Config(
            max_position_embeddings=16, relative_attention=True, pos_att_type=["p2c", "c2p"], **enc)), ids,
            ("query_proj", "value_proj"), {}),
        # multi-query c_attn: q (32 rows) | k (16) | v (16): q only, as add_lora's refusal suggests
        "HF GPTBigCode (multi-query; LoRA: q rows)": (lambda: hf.GPTBigCodeForCausalLM(hf.GPTBigCodeConfig(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16, use_cache=False)), ids,
            dict(targets=("c_attn",), rows={"c_attn": [(0, 32)]}), {}),
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
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = []
    for family in families:
        for name, (make, x, targets, kwargs) in family().items():
            if only and not any(word in name for word in only):
                continue
            try:
                row = check(make, x, targets, **kwargs)
            except Exception as e:                        # a crash is a row of the table too, with what it said
                row = {"replaced": f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            rows.append((name, row))
            print(name, row, flush=True)
    columns = ["replaced", "init change", "round trip", "merge", "NoRA++ merge", "export", "save_pretrained"]
    fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else str(v)
    print("\n| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(fmt(row.get(c, "n/a")) for c in columns) + " |")


if __name__ == "__main__":
    main()
