"""OpenAI's published dVAE (encoder.pkl, decoder.pkl) as a Tessera dVAE, and the reference
outputs Tessera's exactness test compares against.

    openai_dvae.py convert ENCODER.pkl DECODER.pkl OUT_DIR [--image-size N]
    openai_dvae.py make-reference OUT_DIR [--n-hid N --blocks B --vocab V --n-init I --image-size S --images K --seed X]

The pickles are whole PyTorch modules of the reference package (PyPI `DALL-E` 0.1). Unpickling
can run code, so they are read with torch's restricted loader, which builds only the classes
listed in ALLOWED (the reference package's and torch's own) and refuses anything else. Every
check runs before anything is written; the output files are written to temporary names and
renamed into place.
"""

import argparse
import collections
import json
import math
import os
import pickle
import struct
import sys

import torch
import torch.nn as nn

from dall_e import utils as dalle_utils
from dall_e.decoder import Decoder, DecoderBlock
from dall_e.encoder import Encoder, EncoderBlock

ALLOWED = [
    Encoder,
    EncoderBlock,
    Decoder,
    DecoderBlock,
    dalle_utils.Conv2d,
    nn.Sequential,
    nn.ReLU,
    nn.MaxPool2d,
    nn.Upsample,
    nn.Identity,
    collections.OrderedDict,
    set,
    torch.device,
]


class Refused(Exception):
    pass


def load_module(path, want):
    """The reference module pickled in `path`, which must be a `want` (Encoder or Decoder)."""
    kind = want.__name__.lower()
    if not os.path.isfile(path):
        raise Refused(f"{path}: no such file (the {kind} pickle)")
    if os.path.getsize(path) == 0:
        raise Refused(f"{path}: the file is empty (the {kind} pickle)")
    try:
        with torch.serialization.safe_globals(ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((l for l in first if "GLOBAL" in l or "Unsupported" in l), first[0] if first else "")
        raise Refused(
            f"{path}: refused: it asks to build something that is neither a class of the reference "
            f"dVAE nor torch's own ({detail.strip()}); no code from it was run"
        )
    except Exception as e:  # whatever a damaged or foreign file makes the reader raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Refused(f"{path}: not a readable PyTorch pickle (truncated, or a file of another kind): {msg}")
    if not isinstance(obj, want):
        other = {Encoder: "encoder", Decoder: "decoder"}.get(type(obj))
        if other:
            raise Refused(f"{path} holds the dVAE's {other}, but it was given as the {kind}: pass the encoder first, then the decoder")
        raise Refused(f"{path} holds a {type(obj).__name__}, not the reference dVAE's {want.__name__}")
    return obj


def conv_params(conv):
    return conv.w.detach().float().contiguous(), conv.b.detach().float().contiguous()


def tessera_tensors(prefix, module):
    """Tessera's names for the parameters of an Encoder or Decoder."""
    out = {}

    def put(name, conv):
        w, b = conv_params(conv)
        out[f"{prefix}.{name}.weight"] = w
        out[f"{prefix}.{name}.bias"] = b

    blocks = module.blocks
    put("input", blocks.input)
    for g in range(module.group_count):
        group = getattr(blocks, f"group_{g + 1}")
        for b in range(module.n_blk_per_group):
            blk = getattr(group, f"block_{b + 1}")
            if isinstance(blk.id_path, dalle_utils.Conv2d):
                put(f"groups.{g}.{b}.id", blk.id_path)
            for i in range(4):
                put(f"groups.{g}.{b}.res.{i}", getattr(blk.res_path, f"conv_{i + 1}"))
    put("output", blocks.output.conv)
    return out


def safetensors_bytes(tensors, metadata):
    header = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name].to(torch.float32).contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def write_temp(path, data):
    """Writes `data` beside `path` under a temporary name; returns that name (removed on error)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def write_atomic(path, data):
    os.replace(write_temp(path, data), path)


def convert(enc_path, dec_path, out_dir, image_size):
    enc = load_module(enc_path, Encoder)
    dec = load_module(dec_path, Decoder)
    for field in ["group_count", "n_hid", "n_blk_per_group", "vocab_size"]:
        a, b = getattr(enc, field), getattr(dec, field)
        if a != b:
            raise Refused(f"the encoder and decoder do not belong together: {field} {a} vs {b}")
    if enc.input_channels != 3 or dec.output_channels != 3:
        raise Refused("only RGB dVAEs (3 input and output channels) can be converted")
    down = 2 ** (enc.group_count - 1)
    if image_size < down or image_size % down:
        raise Refused(f"--image-size {image_size} is not a multiple of the dVAE's downsampling factor {down}")
    tensors = tessera_tensors("encoder", enc)
    tensors.update(tessera_tensors("decoder", dec))
    dvae = {
        "image_size": image_size,
        "vocab_size": enc.vocab_size,
        "hidden": enc.n_hid,
        "n_init": dec.n_init,
        "groups": enc.group_count,
        "blocks_per_group": enc.n_blk_per_group,
        "eps": dalle_utils.logit_laplace_eps,
    }
    config = {"name": "openai-dvae", "dvae": dvae}
    weights = safetensors_bytes(tensors, {"source": "OpenAI DALL-E dVAE (encoder.pkl, decoder.pkl)", "format": "pt"})
    if os.path.exists(os.path.join(out_dir, "dvae.safetensors")):
        raise Refused(f"{out_dir} already holds a dVAE: choose a new folder")
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = [("dvae.safetensors", weights), ("config.json", (json.dumps(config, indent=2) + "\n").encode())]
    temps = []
    try:
        for name, data in files:  # both written before either is put in place
            temps.append((write_temp(os.path.join(out_dir, name), data), name))
    except OSError as e:
        for tmp, _ in temps:
            os.remove(tmp)
        if created:
            os.rmdir(out_dir)
        raise Refused(f"{out_dir}: could not write the converted dVAE ({e}); nothing was kept")
    for tmp, name in temps:
        os.replace(tmp, os.path.join(out_dir, name))
    params = sum(t.numel() for t in tensors.values())
    grid = image_size // down
    print(
        f"converted: {params / 1e6:.1f} M parameters, {image_size} px images as {grid}×{grid} codes of "
        f"{enc.vocab_size} → {out_dir}"
    )


def make_reference(out_dir, n_hid, blocks, vocab, n_init, image_size, images, seed):
    """Seeded random reference modules, saved as the published files are, with their outputs."""
    torch.manual_seed(seed)
    enc = Encoder(n_hid=n_hid, n_blk_per_group=blocks, vocab_size=vocab)
    dec = Decoder(n_init=n_init, n_hid=n_hid, n_blk_per_group=blocks, vocab_size=vocab)
    with torch.no_grad():
        for m in (enc, dec):
            for name, p in m.named_parameters():
                if name.endswith(".b"):
                    p.normal_(std=0.1)  # non-zero biases, so a misplaced one shows
    os.makedirs(out_dir, exist_ok=True)
    torch.save(enc, os.path.join(out_dir, "encoder.pkl"))
    torch.save(dec, os.path.join(out_dir, "decoder.pkl"))
    x = torch.rand(images, 3, image_size, image_size)
    with torch.no_grad():
        logits = enc(dalle_utils.map_pixels(x))
        codes = logits.argmax(1)
        z = torch.nn.functional.one_hot(codes, vocab).permute(0, 3, 1, 2).float()
        stats = dec(z).float()
        rec = dalle_utils.unmap_pixels(torch.sigmoid(stats[:, :3]))
    ref = {"images": x, "logits": logits, "codes": codes.float(), "reconstruction": rec}
    write_atomic(os.path.join(out_dir, "reference.safetensors"), safetensors_bytes(ref, {"seed": str(seed)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("encoder")
    c.add_argument("decoder")
    c.add_argument("out_dir")
    c.add_argument("--image-size", type=int, default=256)
    r = sub.add_parser("make-reference")
    r.add_argument("out_dir")
    r.add_argument("--n-hid", type=int, default=256)
    r.add_argument("--blocks", type=int, default=2)
    r.add_argument("--vocab", type=int, default=8192)
    r.add_argument("--n-init", type=int, default=128)
    r.add_argument("--image-size", type=int, default=256)
    r.add_argument("--images", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        if a.cmd == "convert":
            convert(a.encoder, a.decoder, a.out_dir, a.image_size)
        else:
            make_reference(a.out_dir, a.n_hid, a.blocks, a.vocab, a.n_init, a.image_size, a.images, a.seed)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
