"""Record examples/finetune.py runs made on this machine as one results file (issue 13).

finetune.py writes a summary.json per run (loss curves, tokens/s, peak memory, processes) but
knows nothing of benchmarks; this adds what every results file carries — this machine's
``environment`` and ``ratios_vs_sdpa`` — and draws all runs' loss curves in one PNG. Run it
where the runs ran, right after them (the environment is read here, not from the summaries).

    python benchmarks/record_finetune.py real=out/real ddp2=out/ddp \\
        --out benchmarks/results/finetune_<gpu>_<date>.json

ratios_vs_sdpa (level ``model``): ``model/<case>/train`` = triton_attention tokens/s / sdpa
tokens/s in the same finetune.py run (same weights, batches and steps), for each case whose run
has both. Each case's summary is kept whole under ``cases``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import default_out, environment, write_json

OURS = "triton_attention"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="CASE=DIR: a name and finetune.py's --out-dir")
    p.add_argument("--out", type=Path, help="results JSON (default: results/finetune_<gpu>_<date>)")
    args = p.parse_args(argv)
    args.runs = dict(run.split("=", 1) for run in args.runs)
    return args


def ratios(cases: dict[str, dict]) -> dict[str, float]:
    out = {}
    for case, summary in cases.items():
        tokens = {r["attn_implementation"]: r["tokens_per_s"] for r in summary["runs"]}
        if "sdpa" in tokens and OURS in tokens:
            out[f"model/{case}/train"] = round(tokens[OURS] / tokens["sdpa"], 3)
    return out


def plot(cases: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, (case, summary) in zip(axes[0], cases.items(), strict=True):
        # distinct dashes: identical curves stay visible on top of each other
        for i, run in enumerate(summary["runs"]):
            steps, losses = zip(*run["losses"], strict=True)
            label = f"{run['attn_implementation']}: {run['tokens_per_s']:,.0f} tokens/s"
            ax.plot(steps, losses, ("-", "--", ":", "-.")[i % 4], label=label)
        title = f"{case}: {summary['num_processes']} x {summary['distributed_type']}"
        ax.set(xlabel="step", ylabel="training loss", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cases = {
        case: json.loads((Path(d) / "summary.json").read_text()) for case, d in args.runs.items()
    }
    out = args.out or default_out("finetune")
    result = {
        "kind": "finetune",
        "environment": environment(),
        "ratios_vs_sdpa": ratios(cases),
        "figure": out.with_suffix(".png").name,
        "cases": cases,
    }
    write_json(out, result)
    plot(cases, out.with_suffix(".png"))
    print("ratios_vs_sdpa", result["ratios_vs_sdpa"])
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
