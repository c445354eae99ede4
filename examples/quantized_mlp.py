"""A small model whose linear layers run on quantized weights.

    python examples/quantized_mlp.py [--format Q4_K] [--compile]

torchext.nn.quantize_linears swaps the model's nn.Linear layers (all but the small output layer
here) for QuantLinear layers that keep their weight as llama.cpp's bytes of the chosen format.
The script compares the outputs with the float model's, shows the weight memory, and takes one
training step: gradients flow through the quantized layers to everything that stayed in float
(their biases, the output layer, anything before them), while the quantized bytes stay fixed.
With --compile the quantized model also runs under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from torchext.formats import QUANTIZABLE_TYPES
from torchext.nn import QuantLinear, quantize_linears
from torchext.cli import default_device


def build_model() -> nn.Sequential:
    """A float MLP classifier: two wide layers and a small output layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(approximate="tanh"), nn.Linear(2048, 512),
                         nn.LayerNorm(512), nn.Linear(512, 10))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the layers' weights: the float ones and QuantLinear's raw bytes."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, (nn.Linear, QuantLinear)))


def main(argv=None) -> None:
    """Run the example with command-line arguments argv (default sys.argv[1:])."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the formats torchext.quantize makes (the grid IQ formats but IQ3_S come from files only): any other name
    # was a traceback
    formats = [q.name for q in QUANTIZABLE_TYPES]
    ap.add_argument("--format", default="Q4_K", type=str.upper, choices=formats, metavar="FORMAT",
                    help=f"one of {', '.join(formats)} (default Q4_K)")
    ap.add_argument("--compile", action="store_true", help="also run the quantized model under torch.compile")
    args = ap.parse_args(argv)
    device = default_device()  # the CPU also where the library was built without CUDA kernels

    model = build_model().to(device)
    # the output layer (qualified name "4") is small and sensitive: it stays in float
    quantized = quantize_linears(copy.deepcopy(model), args.format, filter=lambda name, m: name != "4")
    print(quantized)
    print(f"layer weights: {weight_bytes(model) / 2**20:.2f} MiB in float32, "
          f"{weight_bytes(quantized) / 2**20:.2f} MiB with {args.format}")

    x = torch.randn(4, 512, device=device)  # 4 rows: the Q8_1 GEMV path (torchext.ops.gemv_max_rows: 4 or more)
    with torch.no_grad():
        ref, y = model(x), quantized(x)
    print(f"logits differ from the float model's by {((y - ref).norm() / ref.norm()).item():.2%} (norm-relative); "
          f"the same top class for {(y.argmax(-1) == ref.argmax(-1)).sum().item()} of {len(x)} rows")

    target = torch.randint(0, 10, (len(x),), device=device)
    loss = F.cross_entropy(quantized(x), target)
    loss.backward()
    trained = [name for name, p in quantized.named_parameters() if p.grad is not None]
    print(f"one training step: loss {loss.item():.3f}; gradients reach {', '.join(trained)}")

    if args.compile:
        compiled = torch.compile(quantized, fullgraph=True)
        with torch.no_grad():
            yc = compiled(x)
        print(f"torch.compile(fullgraph=True): largest difference from eager {(yc - y).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
