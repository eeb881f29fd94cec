"""Model level: train-step and decoding throughput of HF models per attn_implementation, as
BENCHMARKS.md asks: a LLaMA-style 0.5B (batch 4 x 2048, full rows and right-padded rows of
uneven lengths), GPT-2 small (batch 8 x 1024) and a 4-layer Llama-3-8B-shaped model (1 x 8192),
random init, bf16 weights, AdamW; greedy decoding of the LLaMA-style model with a KV cache.
The train step's impls are resident together and take turns step by step (bench_train).

    python benchmarks/bench_models.py                        # everything (see --help)
    python benchmarks/bench_models.py --parts train --models gpt2 --impls sdpa triton_attention

The JSON is rewritten after every configuration; a PNG (plot.py) is written next to it.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    GIB,
    default_out,
    environment,
    error_string,
    jsonable,
    raise_recompile_limit,
    write_json,
)

DEVICE = "cuda"
IMPLS = ("eager", "sdpa", "flex_attention", "triton_attention")
OURS = "triton_attention"  # registered with transformers by `import hf_flashattn`


@dataclass(frozen=True)
class ModelSpec:
    config: dict  # kwargs of the transformers config class
    config_class: str
    batch: int
    seq_len: int
    # right-padded batches: the real length of each row (attention_mask 0 and labels -100
    # after it), as a padding collator gives; None: every row full
    lengths: tuple[int, ...] | None = None
    # the model class's Auto loader: encoders train as masked LMs (labels = the ids here too)
    auto_class: str = "AutoModelForCausalLM"


_LLAMA_CONFIG = dict(
    hidden_size=1536,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=4,
    intermediate_size=4096,
    vocab_size=32000,
    max_position_embeddings=8192,
)
MODELS = {
    "llama": ModelSpec(
        config=_LLAMA_CONFIG,
        config_class="LlamaConfig",
        batch=4,
        seq_len=2048,
    ),
    # The same model on right-padded rows of uneven lengths: sdpa must take a mask there (issue 9
    # asks >= 1.2x sdpa here, which needs the kernels to skip padded blocks, not just mask them).
    "llama_padded": ModelSpec(
        config=_LLAMA_CONFIG,
        config_class="LlamaConfig",
        batch=4,
        seq_len=2048,
        lengths=(1041, 756, 964, 798),
    ),
    # GPT-2 small (124M) with its default dropout 0.1, which every implementation applies.
    "gpt2": ModelSpec(config={}, config_class="GPT2Config", batch=8, seq_len=1024),
    # The LLaMA-style model as a Mistral with a 1024-token sliding window, at 2 x 8192: sdpa
    # takes transformers' (q, k) windowed mask, the kernels visit only each window's blocks
    # (eager before the kernels had windows).
    "mistral_sw": ModelSpec(
        config=dict(_LLAMA_CONFIG, sliding_window=1024),
        config_class="MistralConfig",
        batch=2,
        seq_len=8192,
    ),
    # ModernBERT-base's shape (22 layers, 12 heads of 64, local layers with keys at most 64
    # away on either side, every third layer global) at 2 x 8192: sdpa takes transformers'
    # bidirectional windowed mask in the local layers; the kernels visit only the window's blocks.
    "modernbert": ModelSpec(
        config=dict(
            hidden_size=768,
            num_hidden_layers=22,
            num_attention_heads=12,
            intermediate_size=1152,
            vocab_size=50368,
            max_position_embeddings=8192,
            local_attention=128,
            global_attn_every_n_layers=3,
        ),
        config_class="ModernBertConfig",
        batch=2,
        seq_len=8192,
        auto_class="AutoModelForMaskedLM",
    ),
    # Gemma 2's attention (logits soft-capped at 50, alternating 1024-token sliding-window and
    # full layers, scale from query_pre_attn_scalar) on the LLaMA-style model's shapes at
    # 4 x 2048. transformers refuses sdpa for Gemma 2 (it takes no softcap): the peers are
    # eager and flex_attention, and the results file has no ratio against sdpa for it.
    "gemma2": ModelSpec(
        config=dict(
            _LLAMA_CONFIG,
            head_dim=128,
            sliding_window=1024,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=128,
        ),
        config_class="Gemma2Config",
        batch=4,
        seq_len=2048,
    ),
    # gpt-oss's attention (one learned sink per query head, alternating 128-token sliding-window
    # and full layers, 16:2 heads of 64) with a small mixture of experts (8, 2 per token), 12
    # layers, at 4 x 2048. transformers refuses sdpa for gpt-oss (no sinks): peers as Gemma 2's.
    "gpt_oss": ModelSpec(
        config=dict(
            hidden_size=1536,
            intermediate_size=1536,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            # gpt-oss's own (YaRN from a 4096-token original context, factor 32)
            max_position_embeddings=131072,
            sliding_window=128,
        ),
        config_class="GptOssConfig",
        batch=4,
        seq_len=2048,
    ),
    # Llama-3-8B's layer shapes (32:8 heads, D 128, MLP 14336, its 128k vocabulary) with 4
    # layers, one row of 8192 tokens: the long-sequence step issue 9 asks to report (~1.9B
    # parameters, most in the embeddings; ~25 GiB with AdamW).
    "llama3_8b_4l": ModelSpec(
        config=dict(
            hidden_size=4096,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
        config_class="LlamaConfig",
        batch=1,
        seq_len=8192,
    ),
}
DECODE_MODEL = "llama"


def build(name: str, impl: str, dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised model on the GPU, bf16 unless asked (seeded: the same weights for
    every impl)."""
    import transformers

    if impl == OURS:
        import hf_flashattn  # noqa: F401 - registers attn_implementation="triton_attention"
    spec = MODELS[name]
    config = getattr(transformers, spec.config_class)(**spec.config)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialise on the GPU: seconds instead of a minute on the CPU
        model = getattr(transformers, spec.auto_class).from_config(
            config, attn_implementation=impl, dtype=dtype
        )
    return model.to(DEVICE)


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def random_ids(batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), device=DEVICE, generator=gen)


# ---------------------------------------------------------------------------- training
def train_step(model, inputs: dict, optimizer) -> tuple[float, float]:
    """Seconds and loss of one training step (forward, backward, AdamW), synchronised."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t, loss.item()


def timed_steps(model, inputs: dict, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds and loss of each training step (forward, backward, AdamW), warmup included."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, losses = [], []
    for _ in range(warmup + steps):
        seconds, loss = train_step(model, inputs, optimizer)
        times.append(seconds)
        losses.append(loss)
    return times, losses


def train_inputs(spec: ModelSpec, vocab: int) -> dict:
    ids = random_ids(spec.batch, spec.seq_len, vocab)
    inputs = {"input_ids": ids, "labels": ids}
    if spec.lengths:
        mask = (
            torch.arange(spec.seq_len, device=DEVICE)
            < torch.tensor(spec.lengths, device=DEVICE)[:, None]
        )
        inputs.update(attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100))
    return inputs


class _Trainee:
    """One impl's model, inputs and optimizer, its step times and losses, and its peak memory
    counted apart from whatever else is resident (the other impls' models)."""

    def __init__(self, name: str, impl: str) -> None:
        self.before = torch.cuda.memory_allocated()  # the others' bytes, until it is resident
        self.model = build(name, impl).train()
        self.inputs = train_inputs(MODELS[name], self.model.config.vocab_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.peak = 0
        self.resident = None  # its own bytes between steps, once warm

    def step(self) -> None:
        # the others' bytes: what was there before this impl was built, until its own are known
        others = self.before
        if self.resident is not None:
            others = torch.cuda.memory_allocated() - self.resident
        torch.cuda.reset_peak_memory_stats()
        seconds, loss = train_step(self.model, self.inputs, self.optimizer)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated() - others)
        self.times.append(seconds)
        self.losses.append(loss)

    def settle(self) -> None:
        self.resident = torch.cuda.memory_allocated() - self.before


def bench_train(name: str, impls: list[str], steps: int, warmup: int = 2) -> list[dict]:
    """Per impl, tokens/s from the median step (forward, loss on labels=input_ids, backward,
    AdamW). Every impl's model is built and warmed up first (the same seeded weights), then the
    timed steps take turns, one step each per round: a GPU's drift over the run (clocks, heat,
    a neighbour's load) falls on every impl alike instead of on whichever ran last. Three runs
    timing one impl after the other put LLaMA-0.5B's ratio anywhere in 0.95-1.02x and GPT-2's
    in 1.02-1.10x (benchmarks/NOTES.md, twenty-first session). Peak memory is each impl's own:
    the others' resident bytes are taken off. All impls resident at once need their models'
    and optimizers' memory together: where a GPU runs short (an impl's result says out of
    memory), ask for fewer ``--impls`` per run."""
    spec = MODELS[name]
    results = {
        i: {"model": name, "impl": i, "batch": spec.batch, "seq_len": spec.seq_len} for i in impls
    }
    trainees: dict[str, _Trainee] = {}
    for impl in impls:
        try:
            trainee = _Trainee(name, impl)
            for _ in range(warmup):
                trainee.step()
            trainee.settle()
            trainees[impl] = trainee
        except Exception as exc:
            results[impl]["error"] = error_string(exc)
            trainee = None  # its memory goes back before the next impl builds
            release()
    for _ in range(steps):
        for impl, trainee in list(trainees.items()):
            try:
                trainee.step()
            except Exception as exc:
                results[impl]["error"] = error_string(exc)
                del trainees[impl]
                trainee = None
                release()
    for impl, t in trainees.items():
        step_s = statistics.median(t.times[warmup:])
        results[impl].update(
            tokens_per_s=spec.batch * spec.seq_len / step_s,
            step_ms=step_s * 1e3,
            peak_gib=t.peak / GIB,
            params_m=sum(p.numel() for p in t.model.parameters()) / 1e6,
            attn_implementation=t.model.config._attn_implementation,  # what transformers ran
            step_times_ms=[round(x * 1e3, 2) for x in t.times],
            losses=t.losses,
            finite_loss=all(math.isfinite(x) for x in t.losses),
            interleaved_with=[i for i in trainees if i != impl],
        )
    trainees.clear()
    release()
    return [results[i] for i in impls]


# ---------------------------------------------------------------------------- decoding
def timed_generate(model, ids: torch.Tensor, new_tokens: int, cache: str = "dynamic") -> float:
    """Seconds of one greedy generate producing exactly ``new_tokens`` per sequence (min =
    max, so EOS cannot end it early). ``cache="static"``: transformers' static cache, with which
    generate compiles the decoding step itself (fullgraph, CUDA graphs: its CompileConfig)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        cache_implementation=None if cache == "dynamic" else cache,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, asked {new_tokens}")
    return seconds


def bench_decode(
    impl: str,
    configs: list[tuple[int, int]],
    new_tokens: int,
    warmup_tokens: int,
    caches: tuple[str, ...] = ("dynamic",),
) -> list[dict]:
    """tokens/s of generate with the KV cache: new tokens over the whole call (prefill
    included, and timed alone as ``prefill_s``), per cache implementation."""
    model = build(DECODE_MODEL, impl).eval()
    results = []
    for cache in caches:
        for batch, prompt in configs:
            results.append(
                _bench_generate(model, impl, cache, batch, prompt, new_tokens, warmup_tokens)
            )
            release()
    return results


def _bench_generate(model, impl, cache, batch, prompt, new_tokens, warmup_tokens) -> dict:
    result = {
        "model": DECODE_MODEL,
        "impl": impl,
        "cache": cache,
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
    }
    try:
        ids = random_ids(batch, prompt, model.config.vocab_size)
        # compiles (flex; with the static cache every implementation: its length is prompt +
        # new tokens, so the warm-up makes as many), picks plans
        timed_generate(model, ids, new_tokens if cache == "static" else warmup_tokens, cache)
        torch.cuda.reset_peak_memory_stats()
        seconds = timed_generate(model, ids, new_tokens, cache)
        result.update(
            attn_implementation=model.config._attn_implementation,
            tokens_per_s=batch * new_tokens / seconds,
            seconds=seconds,
            peak_gib=torch.cuda.max_memory_allocated() / GIB,
            # one new token: the prompt's forward alone, with the dynamic cache for every row
            # (a static cache one token long would compile again)
            prefill_s=timed_generate(model, ids, 1, "dynamic"),
        )
    except Exception as exc:  # one failing config must not end the run
        result["error"] = error_string(exc)
    return result


# ---------------------------------------------------------------------------- report
def format_table(rows: list[dict], label, columns: list[tuple[str, str, str]]) -> str:
    """One line per result, with the ``ours / impl`` throughput ratio; failures listed below."""
    ours = {label(r): r.get("tokens_per_s") for r in rows if r["impl"] == OURS}
    head = ["config", "impl", *(title for title, _, _ in columns), "ours/impl"]
    body, notes = [], []
    for r in rows:
        if "tokens_per_s" not in r:
            body.append([label(r), r["impl"], *("-" for _ in columns), ""])
            notes.append(f"  {label(r)} {r['impl']}: {r.get('error') or r.get('skipped')}")
            continue
        mine = ours.get(label(r))
        ratio = f"{mine / r['tokens_per_s']:.2f}x" if mine and r["impl"] != OURS else ""
        body.append([label(r), r["impl"], *(fmt.format(r[key]) for _, key, fmt in columns), ratio])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *body]
    ]
    return "\n".join(lines + notes)


def ratios_vs_sdpa(data: dict) -> dict:
    """{"model/<model>/train": ours tokens/s / sdpa's (= sdpa_time / our_time), and
    "decode/<model>_b<batch>_p<prompt>[_static]/generate"} (> 1: we are faster): the results
    files' "<level>/<case>/<mode>"."""
    out = {}
    for part in ("train", "decode"):
        rows = data.get(part, [])

        def label(r, part=part):
            return r["model"] if part == "train" else f"{r['model']}_{decode_case(r)}"

        sdpa = {label(r): r.get("tokens_per_s") for r in rows if r["impl"] == "sdpa"}
        for r in rows:
            if r["impl"] == OURS and r.get("tokens_per_s") and sdpa.get(label(r)):
                key = (
                    f"model/{label(r)}/train" if part == "train" else f"decode/{label(r)}/generate"
                )
                out[key] = r["tokens_per_s"] / sdpa[label(r)]
    return out


def decode_case(r: dict) -> str:
    """b<batch>_p<prompt>, and _<cache> for any cache but the dynamic one (older files: none)."""
    cache = r.get("cache", "dynamic")
    return f"b{r['batch']}_p{r['prompt']}" + ("" if cache == "dynamic" else f"_{cache}")


def report(data: dict) -> str:
    train = format_table(
        data["train"],
        lambda r: f"{r['model']} {r['batch']}x{r['seq_len']}",
        [
            ("tokens/s", "tokens_per_s", "{:,.0f}"),
            ("step ms", "step_ms", "{:.1f}"),
            ("peak GiB", "peak_gib", "{:.1f}"),
        ],
    )
    decode = format_table(
        data["decode"],
        lambda r: f"{r['model']} {decode_case(r)} +{r['new_tokens']}",
        [
            ("tokens/s", "tokens_per_s", "{:,.1f}"),
            ("s", "seconds", "{:.2f}"),
            ("prefill s", "prefill_s", "{:.3f}"),
            ("peak GiB", "peak_gib", "{:.1f}"),
        ],
    )
    return f"\ntrain step\n{train}\n\ndecode (generate, greedy, KV cache)\n{decode}"


# ---------------------------------------------------------------------------- main
def parse_decode(text: str) -> tuple[int, int]:
    batch, prompt = text.lower().split("x")
    return int(batch), int(prompt)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="models for the train step (decoding always uses llama)",
    )
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--parts", nargs="+", choices=("train", "decode"), default=["train", "decode"])
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed train steps per impl after 2 warm-up steps, the impls taking turns",
    )
    p.add_argument(
        "--decode",
        nargs="+",
        type=parse_decode,
        default=[(1, 4096), (16, 2048)],
        metavar="BATCHxPROMPT",
        help="decode configs (default: 1x4096 16x2048)",
    )
    p.add_argument(
        "--caches",
        nargs="+",
        choices=("dynamic", "static"),
        default=["dynamic"],
        help="KV caches for decoding; static: generate compiles the step (CUDA graphs)",
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--warmup-tokens",
        type=int,
        default=16,
        help="new tokens of the untimed generate call before each timed one",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path; default benchmarks/results/models_<device>_<date>.json",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=480,
        help="seconds; no new configuration starts after this (default 480)",
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or default_out("models")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    if not torch.cuda.is_available():
        print("bench_models needs a CUDA GPU", file=sys.stderr)
        return 2
    raise_recompile_limit()  # transformers' flex_attention is torch.compile'd
    env = environment()
    data = {
        "kind": "models",
        "environment": env,
        "runs": [{"environment": env, "args": jsonable(vars(args))}],
        "specs": {n: vars(s) for n, s in MODELS.items()},
        "train": [],
        "decode": [],
    }

    def over_budget() -> bool:
        return time.monotonic() - start > args.time_budget

    if "train" in args.parts:
        for name in args.models:
            if over_budget():
                spec = MODELS[name]
                header = {"model": name, "batch": spec.batch, "seq_len": spec.seq_len}
                results = [dict(header, impl=i, skipped="time budget") for i in args.impls]
            else:
                results = bench_train(name, args.impls, args.steps)
            data["train"] += results
            data["ratios_vs_sdpa"] = ratios_vs_sdpa(data)
            write_json(args.out, data)
            for result in results:
                print(
                    f"[{time.monotonic() - start:4.0f}s] train {name} {result['impl']}: "
                    f"{result.get('tokens_per_s', 0):,.0f} tokens/s "
                    f"{result.get('error') or result.get('skipped') or ''}",
                    flush=True,
                )
    if "decode" in args.parts:
        for impl in args.impls:
            if over_budget():
                results = [
                    {
                        "model": DECODE_MODEL,
                        "impl": impl,
                        "cache": cache,
                        "batch": b,
                        "prompt": p,
                        "new_tokens": args.new_tokens,
                        "skipped": "time budget",
                    }
                    for cache in args.caches
                    for b, p in args.decode
                ]
            else:
                try:
                    results = bench_decode(
                        impl, args.decode, args.new_tokens, args.warmup_tokens, args.caches
                    )
                except Exception as exc:  # the model itself failed to build
                    results = [
                        {
                            "model": DECODE_MODEL,
                            "impl": impl,
                            "cache": cache,
                            "batch": b,
                            "prompt": p,
                            "new_tokens": args.new_tokens,
                            "error": error_string(exc),
                        }
                        for cache in args.caches
                        for b, p in args.decode
                    ]
            release()
            data["decode"] += results
            data["ratios_vs_sdpa"] = ratios_vs_sdpa(data)
            write_json(args.out, data)
            print(
                f"[{time.monotonic() - start:4.0f}s] decode {impl}: "
                + ", ".join(
                    f"{decode_case(r)} {r.get('tokens_per_s', 0):,.1f} tokens/s" for r in results
                ),
                flush=True,
            )

    print(report(data))
    print(f"\nwrote {args.out}")
    if not args.no_plot and (data["train"] or data["decode"]):
        from plot import plot_files

        try:
            print(f"wrote {plot_files([args.out])}")
        except Exception as exc:  # the JSON is written; a chart can be redrawn with plot.py
            print(f"plot failed: {error_string(exc)}", file=sys.stderr)
    bad = [r for r in data["train"] if r.get("finite_loss") is False]
    if bad:
        print(
            f"\n!!! non-finite loss: {[(r['model'], r['impl']) for r in bad]} !!!", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
