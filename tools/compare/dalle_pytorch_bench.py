"""Throughput of the DALLE-pytorch package (lucidrains) on configurations S and P, measured the
way `tessera bench` measures Tessera: medians of timed runs after a warm-up, sampling at batch 4
with its KV cache, training at batch 8 (forward, backward, gradient clipping, AdamW).

Its transformer is set up to match Tessera's: learned position embeddings (no rotary, no token
shift), full attention for S, and for P the row/column/conv pattern (its sparse attention classes
for training; `optimize_for_inference` masked attention with its cache for sampling). Prints JSON.
"""

import json
import statistics
import sys
import time
import types

# The package imports wrappers for pretrained VAEs that need downloads; this benchmark uses its
# own DiscreteVAE, so those wrappers are replaced by placeholders before the import.
_vae = types.ModuleType("dalle_pytorch.vae")
_vae.OpenAIDiscreteVAE = type("OpenAIDiscreteVAE", (), {})
_vae.VQGanVAE = type("VQGanVAE", (), {})
sys.modules["dalle_pytorch.vae"] = _vae

import warnings  # noqa: E402

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from dalle_pytorch.dalle_pytorch import DALLE, DiscreteVAE  # noqa: E402

CONFIGS = {
    "S": dict(image=64, codes=1024, text_vocab=4096, text_len=32, dim=256, depth=6, heads=8, dim_head=32,
              attn=("full",)),
    "P": dict(image=256, codes=8192, text_vocab=16384, text_len=256, dim=256, depth=4, heads=4, dim_head=64,
              attn=("axial_row", "axial_col", "axial_row", "conv_like")),
}


def build(c, for_inference):
    vae = DiscreteVAE(image_size=c["image"], num_tokens=c["codes"], codebook_dim=256, num_layers=3,
                      hidden_dim=64)
    return DALLE(dim=c["dim"], vae=vae, num_text_tokens=c["text_vocab"], text_seq_len=c["text_len"],
                 depth=c["depth"], heads=c["heads"], dim_head=c["dim_head"], attn_types=c["attn"],
                 rotary_emb=False, shift_tokens=False, optimize_for_inference=for_inference)


def timed(fn, runs):
    if runs > 1:  # a single run is long enough not to need a warm-up
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["S", "P"]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    report = {"implementation": f"dalle-pytorch (torch {torch.__version__})", "threads": threads,
              "runs": runs, "configs": {}}
    for name in names:
        c = CONFIGS[name]
        image_len = (c["image"] // 8) ** 2
        model = build(c, True).eval()
        text = torch.randint(1, c["text_vocab"], (4, c["text_len"]))
        with torch.no_grad():
            t_both = timed(lambda: model.generate_images(text, use_cache=True, filter_thres=0.0), runs)
            model.vae.decode = lambda codes: codes  # transformer only
            t_sample = timed(lambda: model.generate_images(text, use_cache=True, filter_thres=0.0), runs)
        model = build(c, False).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)
        ttext = torch.randint(1, c["text_vocab"], (8, c["text_len"]))
        codes = torch.randint(0, c["codes"], (8, image_len))

        def step():
            loss = model(ttext, codes, return_loss=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            opt.step()

        t_train = timed(step, runs)
        tokens = 4 * image_len
        report["configs"][name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "sample_tokens_per_s": tokens / t_sample,
            "sample_with_decode_tokens_per_s": tokens / t_both,
            "train_tokens_per_s": 8 * (c["text_len"] + image_len) / t_train,
        }
        print(f"{name} done", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
