"""Charts from the benchmark JSON files: grouped bars like flash-attn's README.

    python benchmarks/plot.py benchmarks/results/kernels_h100-80gb-hbm3_2025-01-01.json
    python benchmarks/plot.py a.json b.json --out both.png   # results of several runs merged

Kernel files give TFLOP/s per peer against sequence length, one panel per (dtype, mode,
head_dim, causal); model files give train tokens/s, decode tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {  # peer / attn_implementation -> legend label; the order is the bars' order
    "ours": "hf_flashattn (ours)",
    "triton_attention": "triton_attention (ours)",
    "sdpa_cudnn": "SDPA cuDNN",
    "sdpa_flash": "SDPA flash (FA2)",
    "sdpa_efficient": "SDPA mem-efficient",
    "flex": "FlexAttention",
    "sdpa": "sdpa",
    "flex_attention": "flex_attention",
    "eager": "eager",
}
COLORS = {
    "ours": "tab:red",
    "triton_attention": "tab:red",
    "sdpa_cudnn": "tab:blue",
    "sdpa_flash": "tab:orange",
    "sdpa_efficient": "tab:olive",
    "flex": "tab:green",
    "sdpa": "tab:blue",
    "flex_attention": "tab:green",
    "eager": "tab:gray",
}


def _ordered(names) -> list[str]:
    names = set(names)
    return [n for n in LABELS if n in names] + sorted(names - set(LABELS))


def _value_and_note(result: dict | None, key: str) -> tuple[float | None, str]:
    if not result:
        return None, ""
    if result.get(key) is not None:
        return result[key], ""
    return None, "skip" if "skipped" in result else "err"


def grouped_bars(
    ax, groups: list[str], series: dict[str, list[tuple[float | None, str]]], fmt: str = "{:.0f}"
) -> None:
    """One group of bars per x label, one bar per series; missing bars say why at the base."""
    width = 0.8 / max(len(series), 1)
    top = max((v for vals in series.values() for v, _ in vals if v is not None), default=1.0)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v, _ in values]
        ax.bar(xs, heights, width, label=LABELS.get(name, name), color=COLORS.get(name))
        for x, (value, note) in zip(xs, values, strict=True):
            text = fmt.format(value) if value is not None else note
            y = value if value is not None else 0.0
            ax.text(x, y + 0.01 * top, text, ha="center", va="bottom", rotation=90, fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, top * 1.25)
    ax.grid(axis="y", alpha=0.3)


def _subtitle(data: dict) -> str:
    runs = data.get("runs") or [{}]
    env = runs[-1].get("environment", {})
    text = (
        f"{env.get('device', '?')} | torch {env.get('torch')} | triton {env.get('triton')} | "
        f"transformers {env.get('transformers')} | cuDNN {env.get('cudnn')} | "
        f"{env.get('date', '')[:10]} | {str(env.get('git_commit', ''))[:12]}"
    )
    ceil = runs[-1].get("ceilings")
    if ceil:
        text += (
            f"\nceilings: bf16 matmul {ceil['matmul_bf16_8192_tflops']:.0f} TFLOP/s, "
            f"copy {ceil['copy_1gib_tbps']:.2f} TB/s"
        )
    return text


def plot_kernels(datas: list[dict]):
    merged = {}
    for data in datas:  # a later file wins for a shape measured twice
        for r in data["results"]:
            merged[(r["dtype"], r["mode"], r["head_dim"], r["causal"], r["seq_len"])] = r
    rows = sorted({k[:2] for k in merged}, key=lambda k: (k[0], k[1] != "fwd"))
    cols = sorted({k[2:4] for k in merged})
    fig, axes = plt.subplots(
        len(rows), len(cols), squeeze=False, figsize=(4.2 * len(cols), 3.2 * len(rows))
    )
    for (i, row), (j, col) in ((a, b) for a in enumerate(rows) for b in enumerate(cols)):
        ax = axes[i][j]
        seqs = sorted({k[4] for k in merged if k[:4] == row + col})
        records = [merged.get(row + col + (n,)) for n in seqs]
        peers = _ordered({p for r in records if r for p in r["peers"]})
        series = {
            p: [_value_and_note(r["peers"].get(p) if r else None, "tflops") for r in records]
            for p in peers
        }
        grouped_bars(ax, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in seqs], series)
        dtype, mode = row
        head_dim, causal = col
        ax.set_title(
            f"{dtype} {mode}, head_dim {head_dim}, {'causal' if causal else 'non-causal'}",
            fontsize=9,
        )
        if j == 0:
            ax.set_ylabel("TFLOP/s")
        if i == len(rows) - 1:
            ax.set_xlabel("sequence length (batch x seq = 32k tokens)")
    _legend(fig, axes)
    fig.suptitle("Attention kernels, TFLOP/s\n" + _subtitle(datas[-1]), fontsize=9)
    return fig


def plot_models(datas: list[dict]):
    train, decode = {}, {}  # (panel title, impl) -> result
    for data in datas:
        for r in data.get("train", []):
            train[(f"{r['model']} train step, {r['batch']} x {r['seq_len']}", r["impl"])] = r
        for r in data.get("decode", []):
            title = (
                f"{r['model']} decode +{r['new_tokens']}, batch {r['batch']}, prompt {r['prompt']}"
                f"{', ' + r['cache'] + ' cache' if r.get('cache', 'dynamic') != 'dynamic' else ''}"
            )
            decode[(title, r["impl"])] = r
    panels = [(t, train) for t in dict.fromkeys(k[0] for k in train)]
    panels += [(t, decode) for t in dict.fromkeys(k[0] for k in decode)]
    fig, axes = plt.subplots(2, len(panels), squeeze=False, figsize=(3.6 * len(panels), 6.4))
    for j, (title, table) in enumerate(panels):
        impls = _ordered(k[1] for k in table if k[0] == title)
        for i, (metric, label) in enumerate(
            (("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB"))
        ):
            ax = axes[i][j]
            series = {m: [_value_and_note(table.get((title, m)), metric)] for m in impls}
            grouped_bars(ax, [""], series, fmt="{:,.0f}" if metric == "tokens_per_s" else "{:.1f}")
            ax.set_xticks([])
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(title, fontsize=9)
    _legend(fig, axes)
    fig.suptitle("Models, bf16\n" + _subtitle(datas[-1]), fontsize=9)
    return fig


def _legend(fig, axes) -> None:
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))


def plot_files(paths: list[Path], out: Path | None = None) -> Path:
    """Plot one or more JSON files of the same kind; the PNG goes next to the first."""
    datas = [json.loads(Path(p).read_text()) for p in paths]
    kinds = {d["kind"] for d in datas}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge files of different kinds: {sorted(kinds)}")
    fig = {"kernels": plot_kernels, "models": plot_models}[kinds.pop()](datas)
    out = Path(out) if out else Path(paths[0]).with_suffix(".png")
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path; default: next to the JSON")
    args = p.parse_args(argv)
    print(f"wrote {plot_files(args.json, args.out)}")


if __name__ == "__main__":
    main()
