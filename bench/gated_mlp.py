"""A gated MLP on a decode step: torchext.nn.QuantGatedMLP (gate and up on one Q8_1 input) against the
down projection's fused alternatives, the same layers unfused and the dense bf16 MLP, in the same run.

    python bench/gated_mlp.py [--out DIR] [--dtype bfloat16] [--kernels]

For rows 1-8 of three real MLP shapes (hidden -> intermediate -> hidden: Gemma 3 270M's 640 -> 2048 with
GELU-tanh, Qwen3 0.6B's 1024 -> 3072 and Llama 3 8B's 4096 -> 14336 with SiLU; gate and up Q4_K, down
Q6_K as in Q4_K_M files), µs per MLP call, each timed as 100 back-to-back calls captured in one CUDA
graph (bench/common.GraphTimer). Each variant starts from shared_input's gate and up (quantize_q8_1 and
two GEMVs), but unfused and bf16:
- gated_gemv: the down layer's forward_gated_silu / forward_gated_gelu (gated_*_qmatmul: for up to 8 rows
  where the DP4A GEMV runs, its CTAs compute and quantize act(gate) * up themselves, one launch; else
  gated_*_quantize_q8_1 and the GEMV);
- split: gated_*_quantize_q8_1 (act(gate) * up computed and quantized once, in one kernel), then the down
  layer's forward_q8_1: gated_gemv's bits;
- gated_mlp: QuantGatedMLP (torchext.nn.gated_mlp), the down layer on act(gate) * up: the activation, the
  product, quantize_q8_1 and the GEMV;
- unfused: each QuantLinear on its own input, as a model that only swapped nn.Linear for QuantLinear runs;
- bf16: the dense MLP, three nn.Linear in the activations' dtype and the same activation.
The Gemma and Qwen weights stay in L2 between calls; Llama's (115 MB packed, 352 MB in bf16) do not.
Writes DIR/gated_mlp.json and prints a table. Nothing here is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import latency_bench, random_quant_weight, time_calls  # noqa: E402

from torchext import QType, gated_gelu_quantize_q8_1, gated_silu_quantize_q8_1  # noqa: E402
from torchext.nn import GATE_ACTIVATIONS, QuantGatedMLP, QuantLinear, shared_input  # noqa: E402

CALLS = 100
SHAPES = [("gemma3-270m", 640, 2048, "gelu_tanh"), ("qwen3-0.6b", 1024, 3072, "silu"),
          ("llama3-8b", 4096, 14336, "silu")]
ROWS = [1, 2, 4, 8]
FORMATS = ("Q4_K", "Q4_K", "Q6_K")  # gate, up, down


def activation_fn(activation: str):
    approximate = GATE_ACTIVATIONS[activation]
    return F.silu if approximate is None else (lambda g: F.gelu(g, approximate=approximate))


def measure(name: str, hidden: int, inter: int, activation: str, dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    quant = [QuantLinear(random_quant_weight(f, n, k, 1, "cuda", gen)[0], QType[f], k, n)
             for f, (n, k) in zip(FORMATS, shapes)]
    dense = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype) for n, k in shapes]
    mlp = QuantGatedMLP(*quant, activation)
    act = activation_fn(activation)
    gate_proj, up_proj, down_proj = quant

    approximate = GATE_ACTIVATIONS[activation]

    def gated_quantize(gate, up):
        if approximate is None:
            return gated_silu_quantize_q8_1(gate, up)
        return gated_gelu_quantize_q8_1(gate, up, approximate)

    def split(x):
        gate, up = shared_input(x, gate_proj, up_proj)
        return down_proj.forward_q8_1(gated_quantize(gate, up), x.dtype)

    def gated_gemv(x):
        gate, up = shared_input(x, gate_proj, up_proj)
        if approximate is None:
            return down_proj.forward_gated_silu(gate, up)
        return down_proj.forward_gated_gelu(gate, up, approximate)

    out = []
    for rows in ROWS:
        x = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
        calls = {
            "gated_gemv": lambda i: gated_gemv(x),
            "split": lambda i: split(x),
            "gated_mlp": lambda i: mlp(x),
            "unfused": lambda i: down_proj(act(gate_proj(x)) * up_proj(x)),
            "bf16": lambda i: dense[2](act(dense[0](x)) * dense[1](x)),
        }
        with torch.no_grad():
            out.append(time_calls(calls, CALLS, {"mlp": name, "hidden": hidden, "inter": inter,
                                                 "activation": activation, "rows": rows}))
    return out


def main() -> None:
    rows = latency_bench(__doc__, "gated_mlp", lambda dtype: [r for s in SHAPES for r in measure(*s, dtype)], CALLS)
    names = ["gated_gemv", "split", "gated_mlp", "unfused", "bf16"]
    print(f"{'mlp':>12} {'rows':>4} " + " ".join(f"{n:>10}" for n in names) + "  gated_mlp/bf16  gated_mlp/unfused")
    for r in rows:
        print(f"{r['mlp']:>12} {r['rows']:>4} " + " ".join(f"{r[n]:10.2f}" for n in names)
              + f"  {r['gated_mlp'] / r['bf16']:14.2f}  {r['gated_mlp'] / r['unfused']:17.2f}")


if __name__ == "__main__":
    main()
