"""Call level (PROTOCOL.md, level 2): the attention call as transformers makes it.

``hf_flashattn.integration.attention_forward`` against transformers' own
``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (default dispatch), with a
module that has ``is_causal=True``, ``num_key_value_groups`` and ``training=True``; q, k, v
created as (batch, seq, heads, dim) and transposed, K/V heads unexpanded, no mask (causal), but
for the padded layer, where each impl gets its own mask function's mask (``layer_masks``).

    python benchmarks/bench_call.py                    # the five layers, ~1-2 minutes
    python benchmarks/bench_call.py --layers gpt2      # one layer
    python benchmarks/bench_call.py --extra 4,16,16,2048,256   # and any other layer
    python benchmarks/bench_call.py --sweep            # + head_dim x GQA x dtype x N (fwd+bwd)

Per layer and mode (fwd, fwd+bwd): GPU time by ``do_bench`` (median, L2 flushed) and host
time per call: ``host_us_busy``, 20 calls issued while the GPU is held busy (so no launch waits
on it: the host's time alone, ``common.busy_host_us``), and the mean wall time of 200 calls
issued without synchronising (``host_us``; once the GPU queue fills that is the GPU's time);
and the GPU time of the call's kernels alone (``kernel_ms``, torch.profiler). Results before
2026-12-01's thirteenth session have ``host_us_20`` (20 calls after a sync) instead of
``host_us_busy``, which supersedes it. "fwd" runs
with autograd recording, as in a training step. The JSON (rewritten after each case) has
"environment", "results" and "ratios_vs_sdpa": {"call/<case>/<mode>": sdpa_ms / our_ms} (> 1:
we are faster), plus "call/<case>/<mode>/host" (``host_us_busy``) and ".../kernel" (``kernel_ms``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import (
    bench_ms,
    busy_host_us,
    default_out,
    environment,
    error_string,
    jsonable,
    kernel_ms,
    write_json,
)
from torch import nn

DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
HOST_CALLS = 200


@dataclass(frozen=True)
class Layer:
    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    dropout: float = 0.0
    dtype: str = "bf16"
    # right-padded rows (a padding collator's batch): each row's real tokens; None: unpadded
    lengths: tuple[int, ...] | None = None


LAYERS = {
    "llama_0.5b": Layer(batch=4, heads_q=12, heads_kv=4, seq_len=2048, head_dim=128),
    # bench_models.py's llama_padded rows: each impl takes its own mask function's mask
    "llama_0.5b_padded": Layer(
        batch=4, heads_q=12, heads_kv=4, seq_len=2048, head_dim=128, lengths=(1041, 756, 964, 798)
    ),
    "gpt2": Layer(batch=8, heads_q=12, heads_kv=12, seq_len=1024, head_dim=64),
    "gpt2_dropout": Layer(batch=8, heads_q=12, heads_kv=12, seq_len=1024, head_dim=64, dropout=0.1),
    "llama3_8b": Layer(batch=1, heads_q=32, heads_kv=8, seq_len=8192, head_dim=128),
}


def parse_layer(spec: str) -> tuple[str, Layer]:
    """A layer given on the command line as batch,heads_q,heads_kv,seq,dim: (its name, it)."""
    batch, heads_q, heads_kv, seq, dim = (int(x) for x in spec.split(","))
    return f"extra_{spec}", Layer(batch, heads_q, heads_kv, seq, dim)


# --sweep: 16 query heads, 16k tokens per call
SWEEP_HEAD_DIMS = (64, 80, 96, 128, 256)
SWEEP_GROUPS = (1, 4, 8)
SWEEP_SEQS = (2048, 8192)
SWEEP_HEADS, SWEEP_TOKENS = 16, 16384


def sweep_layers(dtypes) -> dict[str, Layer]:
    layers = {}
    for dtype, head_dim, group, seq_len in itertools.product(
        dtypes, SWEEP_HEAD_DIMS, SWEEP_GROUPS, SWEEP_SEQS
    ):
        name = f"sweep/{dtype}/d{head_dim}/g{group}/n{seq_len}"
        layers[name] = Layer(
            batch=max(1, SWEEP_TOKENS // seq_len),
            heads_q=SWEEP_HEADS,
            heads_kv=SWEEP_HEADS // group,
            seq_len=seq_len,
            head_dim=head_dim,
            dtype=dtype,
        )
    return layers


class AttentionModule(nn.Module):
    """What the attention functions read from a model's attention module."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = layer.heads_q // layer.heads_kv
        self.layer_idx = 0
        self.train()


def implementations() -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_flashattn.integration import attention_forward

    return {"ours": attention_forward, "sdpa": sdpa_attention_forward}


def padding_rows(layer: Layer, device) -> torch.Tensor:
    """(batch, seq) bool: the padded layer's real tokens (its rows' lengths, right-padded)."""
    lengths = torch.tensor(layer.lengths, device=device)
    return torch.arange(layer.seq_len, device=device) < lengths[:, None]


def layer_masks(layer: Layer) -> dict:
    """Each impl's attention mask, as its own mask function builds it from the rows' padding
    (what a model's forward hands every layer): ours a (batch, seq) padding mask whose rows'
    lengths it memoises, sdpa's a (batch, 1, seq, seq) one. None without padding."""
    if layer.lengths is None:
        return {"ours": None, "sdpa": None}
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from hf_flashattn.integration import attention_mask

    padding = padding_rows(layer, DEVICE)
    args = dict(
        batch_size=layer.batch,
        q_length=layer.seq_len,
        kv_length=layer.seq_len,
        q_offset=0,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding,
        allow_is_causal_skip=True,  # as create_causal_mask asks
        device=DEVICE,
    )
    return {"ours": attention_mask(**args), "sdpa": sdpa_mask(**args)}


def make_inputs(layer: Layer):
    dtype = DTYPES[layer.dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def make(heads):
        t = torch.randn(
            layer.batch,
            layer.seq_len,
            heads,
            layer.head_dim,
            device=DEVICE,
            dtype=dtype,
            generator=gen,
        )
        return t.transpose(1, 2).requires_grad_()  # (batch, heads, seq, dim), as models pass

    q, k, v = make(layer.heads_q), make(layer.heads_kv), make(layer.heads_kv)
    dout = torch.randn(
        layer.batch,
        layer.seq_len,
        layer.heads_q,
        layer.head_dim,
        device=DEVICE,
        dtype=dtype,
        generator=gen,
    )
    return q, k, v, dout


def step(attn, module, layer: Layer, q, k, v, dout, mode: str, mask=None):
    """The call (``mode`` "fwd") or the call and its backward; ``mask``: the impl's mask for a
    padded layer (``layer_masks``)."""
    kw = dict(attention_mask=mask, scaling=layer.head_dim**-0.5, dropout=layer.dropout)
    if mode == "fwd":
        return lambda: attn(module, q, k, v, **kw)[0]

    def fwd_bwd():
        out = attn(module, q, k, v, **kw)[0]
        # autograd.grad, not .backward: no .grad accumulation, the same work for both
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd_bwd


def host_us(fn, calls: int) -> float:
    """Mean wall time of ``calls`` calls issued without synchronising, after a sync."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def measure(fn) -> dict:
    fn()  # compile / plan outside the timings
    result = {"ms": bench_ms(fn)}
    result["host_us"] = host_us(fn, HOST_CALLS)
    result["host_us_busy"] = busy_host_us(fn)
    # the GPU time of the call's kernels alone: where the host sets the pace (GPT-2's layer),
    # ms above is the host's, and this says how far the kernels are from the peer's
    result["kernel_ms"] = kernel_ms(fn)
    return result


def spot_check(impls, module, layer, q, k, v, masks) -> dict:
    """max |ours - sdpa| of the output at the real tokens (no-dropout layers only: the dropout
    masks differ; a padded query's row differs by design, ours zeros)."""
    kw = dict(scaling=layer.head_dim**-0.5, dropout=0.0)
    with torch.no_grad():
        ours = impls["ours"](module, q, k, v, attention_mask=masks["ours"], **kw)[0]
        ref = impls["sdpa"](module, q, k, v, attention_mask=masks["sdpa"], **kw)[0]
    if layer.lengths is not None:
        real = padding_rows(layer, q.device)
        ours, ref = ours[real], ref[real]  # (batch, seq, heads, dim) at the real tokens
    return {
        "max_abs_diff_vs_sdpa": (ours.float() - ref.float()).abs().max().item(),
        "nan": bool(torch.isnan(ours).any()),
    }


def bench_layer(name: str, layer: Layer, impls: dict, modes) -> dict:
    module = AttentionModule(layer)
    q, k, v, dout = make_inputs(layer)
    masks = layer_masks(layer)
    record = {"case": name, **asdict(layer), "impls": {}}
    for impl_name, attn in impls.items():
        record["impls"][impl_name] = {}
        for mode in modes:
            try:
                result = measure(step(attn, module, layer, q, k, v, dout, mode, masks[impl_name]))
            except Exception as exc:  # one failing case must not end the run
                result = {"error": error_string(exc)}
            record["impls"][impl_name][mode] = result
    if layer.dropout == 0.0:
        try:
            record["check"] = spot_check(impls, module, layer, q, k, v, masks)
        except Exception as exc:
            record["check"] = {"error": error_string(exc)}
    del q, k, v, dout
    torch.cuda.empty_cache()
    return record


def ratios_vs_sdpa(results: list[dict]) -> dict:
    """{"call/<case>/<mode>": sdpa_ms / our_ms, "call/<case>/<mode>/host" and
    "call/<case>/<mode>/kernel": the same of host_us_busy and kernel_ms}."""
    ratios = {}
    for r in results:
        ours, sdpa = r["impls"].get("ours", {}), r["impls"].get("sdpa", {})
        for mode in MODES:
            a, b = ours.get(mode, {}), sdpa.get(mode, {})
            for suffix, key in (("", "ms"), ("/host", "host_us_busy"), ("/kernel", "kernel_ms")):
                if a.get(key) and b.get(key):
                    ratios[f"call/{r['case']}/{mode}{suffix}"] = b[key] / a[key]
    return ratios


def report(data: dict) -> str:
    lines = [
        f"{'case':34s} {'mode':8s} {'ours ms':>8s} {'sdpa ms':>8s} {'ratio':>6s} "
        f"{'kernels':>7s} {'ours host us':>12s} {'sdpa host us':>12s}  (host_us, 200 calls)"
    ]
    for r in data["results"]:
        for mode in MODES:
            o = r["impls"].get("ours", {}).get(mode, {})
            s = r["impls"].get("sdpa", {}).get(mode, {})
            if not o and not s:
                continue
            ratio = data["ratios_vs_sdpa"].get(f"call/{r['case']}/{mode}")
            kernels = data["ratios_vs_sdpa"].get(f"call/{r['case']}/{mode}/kernel")
            lines.append(
                f"{r['case']:34s} {mode:8s} {o.get('ms', float('nan')):8.3f} "
                f"{s.get('ms', float('nan')):8.3f} {ratio or float('nan'):6.2f} "
                f"{kernels or float('nan'):7.2f} "
                f"{o.get('host_us_busy', float('nan')):12.1f} "
                f"{s.get('host_us_busy', float('nan')):12.1f}"
                f"  ({o.get('host_us', float('nan')):.1f} / {s.get('host_us', float('nan')):.1f})"
                + (
                    f"  ERROR {o.get('error') or s.get('error')}"
                    if "error" in o or "error" in s
                    else ""
                )
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also head_dim {64,80,96,128,256} x GQA {1,4,8} x dtypes x N {2048,8192}, fwd+bwd "
        "(each new shape compiles the kernels: several minutes)",
    )
    p.add_argument("--sweep-only", action="store_true", help="the sweep without the five layers")
    p.add_argument("--extra", nargs="*", default=[], help="layers: batch,heads_q,heads_kv,seq,dim")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--out", type=Path, default=None, help="JSON path; default benchmarks/results/")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; then stop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_call needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    out = args.out or default_out("call")
    impls = implementations()
    cases = [] if args.sweep_only else [(n, LAYERS[n], args.modes) for n in args.layers]
    cases += [(*parse_layer(spec), args.modes) for spec in args.extra]
    if args.sweep or args.sweep_only:
        cases += [(n, layer, ["fwd+bwd"]) for n, layer in sweep_layers(args.dtypes).items()]
    data = {
        "kind": "call",
        "environment": environment(),
        "args": jsonable(vars(args)),
        "results": [],
        "ratios_vs_sdpa": {},
    }
    for name, layer, modes in cases:
        if time.monotonic() - start > args.time_budget:
            data["stopped"] = "time budget"
            break
        t = time.monotonic()
        data["results"].append(bench_layer(name, layer, impls, modes))
        data["ratios_vs_sdpa"] = ratios_vs_sdpa(data["results"])
        write_json(out, data)
        print(
            f"[{time.monotonic() - start:4.0f}s] {name} ({time.monotonic() - t:.0f}s)", flush=True
        )
    print(report(data))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
