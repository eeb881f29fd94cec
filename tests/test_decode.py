"""The split-KV forward (kernels/decode.py): few query rows per K/V head against many keys."""

import pytest
import torch
from test_op import _check, _inputs

from hf_flashattn import flash_attn, op
from hf_flashattn.kernels import INTERPRETING
from hf_flashattn.kernels.configs import decode_config


@pytest.fixture
def splits(monkeypatch):
    """Set how many programs the split choice aims for: 1 gives one slice, large gives one
    slice per key block."""

    def aim_for(programs: int) -> None:
        monkeypatch.setattr(op, "_target_programs", lambda device, n, per_sm: programs)

    return aim_for


@pytest.fixture
def split_calls(monkeypatch) -> list[int]:
    """The number of key slices of every split-KV forward."""
    calls = []
    decode_splits = op._decode_splits

    def spy(*args):
        n_splits, split_len = decode_splits(*args)
        calls.append(n_splits)
        return n_splits, split_len

    monkeypatch.setattr(op, "_decode_splits", spy)
    return calls


@pytest.fixture
def merges(monkeypatch) -> list[int]:
    """The slice count of every merge (combine kernel) launched."""
    calls = []
    combine_launcher = op._combine_launcher

    def spy(head_dim, n_splits):
        calls.append(n_splits)
        return combine_launcher(head_dim, n_splits)

    monkeypatch.setattr(op, "_combine_launcher", spy)
    return calls


@pytest.mark.parametrize(
    "heads_q,heads_kv,seqlen_q",
    # MHA, GQA 4, MQA 8, GQA 8 x 4 queries, GQA 8 x 16 queries (128 rows: the largest tile)
    [(4, 4, 1), (8, 2, 1), (8, 1, 3), (16, 2, 4), (16, 2, 16)],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("programs", [1, 1000])
def test_split_kv_matches_reference(
    device, heads_q, heads_kv, seqlen_q, causal, programs, splits, split_calls, merges
):
    """Output, LSE and gradients (the backward is the main one, on the split forward's LSE),
    with one slice and with one slice per key block; 333 keys end in a ragged block."""
    splits(programs)
    q, k, v = _inputs(device, torch.float16, 2, heads_q, heads_kv, seqlen_q, 333, 64)
    _check(device, torch.float16, q, k, v, causal=causal)
    rows = heads_q // heads_kv * seqlen_q
    deep = op._deep_decode(q.device, 64, rows, 333, 2 * heads_kv)  # the op's choice here
    blocks = -(-333 // decode_config(64, rows, INTERPRETING, deep).block_n)
    assert split_calls == [1 if programs == 1 else blocks]
    # one merge per forward of several slices; one slice writes the output itself
    assert merges == [n for n in split_calls if n > 1]


def test_split_kv_padding(device, splits, split_calls):
    """Left padding (generation's) over whole slices, a row that keeps one key, a row that keeps
    none (zeros, lse -inf): slices with nothing to attend merge to what the others give."""
    splits(1000)
    q, k, v = _inputs(device, torch.bfloat16, 3, 8, 2, 2, 300, 64)
    keys = torch.arange(300)
    mask = torch.stack([keys >= 250, keys == 7, torch.zeros(300, dtype=torch.bool)])
    _check(device, torch.bfloat16, q, k, v, causal=True, key_padding_mask=mask.to(device))
    out = flash_attn(q, k, v, causal=True, key_padding_mask=mask.to(device))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert split_calls[0] > 1


@pytest.mark.parametrize("programs", [1, 1000])
@pytest.mark.parametrize("padded", [False, True])
def test_split_kv_sliding_window(device, programs, padded, splits, split_calls):
    """Decoding with a sliding window shorter than the cache (a model whose cache keeps every
    key): only the cache's tail is read, and the rows of a chunk each see their own window;
    with generation's left padding too."""
    splits(programs)
    q, k, v = _inputs(device, torch.float16, 2, 8, 2, 3, 333, 64)
    mask = None
    if padded:
        mask = (torch.arange(333) >= torch.tensor([[0], [290]])).to(device)
    _check(device, torch.float16, q, k, v, causal=True, key_padding_mask=mask, sliding_window=50)
    assert len(split_calls) == 1
    # the slices cover the 52 keys some query sees, not the 333
    block_n = decode_config(64, 4 * 3, INTERPRETING).block_n
    assert split_calls[0] <= (1 if programs == 1 else -(-52 // block_n))


def test_split_kv_serves_few_rows_and_the_main_forward_the_rest(device, split_calls):
    """Decoding (GQA group x queries <= 128 rows per K/V head; 64 past head_dim 128) takes the
    split-KV kernels; chunked prefill and dropout take the main forward."""
    q, k, v = (t.detach() for t in _inputs(device, torch.float16, 1, 8, 2, 32, 200, 64))
    flash_attn(q, k, v, causal=True)  # 4 x 32 = 128 rows
    assert len(split_calls) == 1
    q33 = torch.randn(1, 8, 33, 64, device=device, dtype=torch.float16)
    flash_attn(q33, k, v, causal=True)  # 132 rows
    flash_attn(q[:, :, :1], k, v, dropout_p=0.1)
    assert len(split_calls) == 1
    q, k, v = (t.detach() for t in _inputs(device, torch.float16, 1, 8, 2, 17, 200, 256))
    flash_attn(q, k, v, causal=True)  # 68 rows at head_dim 256
    assert len(split_calls) == 1


def test_split_kv_equals_the_main_forward(device, monkeypatch):
    """The same numbers through either forward (up to float rounding)."""
    q, k, v = (t.detach() for t in _inputs(device, torch.float32, 2, 8, 2, 3, 257, 80))
    mask = (torch.arange(257) >= 30).expand(2, 257).to(device)
    split_out, split_lse = flash_attn(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
    monkeypatch.setattr(op, "max_decode_rows", lambda head_dim: 0)
    main_out, main_lse = flash_attn(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
    torch.testing.assert_close(split_out, main_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_lse, main_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_dim, deep", [(64, False), (128, False), (256, False), (128, True)])
def test_split_kv_gpu_key_steps(device, max_dim, deep, splits):
    """The key steps the GPU table gives the split-KV kernel (``deep``: its deep-pipeline
    entry), forced through whichever backend is here (on the CPU: the interpreter)."""
    splits(1000)
    with op.forced_configs(decode=decode_config(max_dim, 16, False, deep)):
        q, k, v = _inputs(device, torch.float16, 1, 8, 2, 2, 150, min(max_dim, 96))
        _check(device, torch.float16, q, k, v, causal=True)


def test_split_kv_cache_strides_not_divisible_by_16(device, splits):
    """head_dim 40 x 333 keys: the cache's head and batch strides are not multiples of 16 (the
    kernel then takes them as they are, not divided by 16)."""
    splits(1000)
    q, k, v = _inputs(device, torch.float16, 2, 8, 2, 1, 333, 40)
    assert k.stride(1) % 16 != 0
    _check(device, torch.float16, q, k, v, causal=False)


def test_split_kv_float16_then_bfloat16_on_the_same_shapes(device):
    """The same shapes in float16, then bfloat16: on the GPU each dtype must get its own
    compiled kernels (the direct launch once reused the float16 merge for a bfloat16 output,
    writing float16 bits there)."""
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _inputs(device, dtype, 1, 8, 2, 1, 40, 64)
        _check(device, dtype, q, k, v, causal=True)


def test_one_slice_binary_is_held_to_the_partials_registers(device, splits, monkeypatch):
    """The split count is sized by the partials binary's residency; the one-slice binary, left
    to ptxas, took more registers (143 against 128 on the H200) and so fewer programs an SM: it
    is compiled with the partials binary's count as its cap, and still gives the same answer."""
    monkeypatch.setattr(op, "_LAUNCHERS", {})
    probe = op._Launcher.programs_per_sm

    def read_registers(self, *args):  # the count a compiled binary reports (none interpreted)
        self.registers = 128
        return probe(self, *args)

    monkeypatch.setattr(op._Launcher, "programs_per_sm", read_registers)
    splits(1)
    q, k, v = _inputs(device, torch.float16, 2, 8, 2, 1, 200, 64)
    _check(device, torch.float16, q, k, v, causal=False)
    # the decode launchers' keys end in ONE_SLICE; on a GPU the partials binary's registers
    # are its compiled count, not the stub's
    launchers = {key[1][-1]: got for key, got in op._LAUNCHERS.items() if key[0] == "decode"}
    assert launchers.keys() == {False, True}
    assert launchers[False].cfg.max_registers is None
    assert launchers[True].cfg.max_registers == launchers[False].registers
    assert launchers[False].registers == 128 or device == "cuda"


def test_split_count_fills_one_wave(monkeypatch):
    """Decoding is bound by memory bandwidth: the keys split into as many slices as keep the
    grid within the programs the GPU holds at once (a second, part-filled wave reads at a
    fraction of the bandwidth), never an empty slice, at least one."""
    monkeypatch.setattr(op, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert op._target_programs(cuda, 64, 4) == 528
    assert op._target_programs(cuda, 64, None) == 264  # residency unknown: two per SM
    # (programs per slice, keys, key step, target) -> (slices, keys per slice)
    assert op._decode_splits(64, 8192, 64, 528) == (8, 1024)  # 512 programs
    assert op._decode_splits(128, 8192, 64, 528) == (4, 2048)
    assert op._decode_splits(64, 8192, 64, 320) == (5, 1664)  # 26 blocks a slice, 5 slices
    assert op._decode_splits(4, 4096, 64, 528) == (64, 64)  # a slice per key block at most
    assert op._decode_splits(600, 8192, 64, 528) == (1, 8192)  # past one wave: one slice
    assert op._decode_splits(32, 100, 64, 528) == (2, 64)  # the last slice ragged


def test_deep_decode_rule():
    """The deep-pipeline entry is taken only where all its conditions hold (configs.py says
    what each was measured at)."""
    from hf_flashattn.kernels.configs import deep_decode

    assert deep_decode(128, 16, 16384, 264, 132)
    assert not deep_decode(128, 16, 16385, 264, 132)  # a long cache
    assert not deep_decode(128, 16, 4096, 265, 132)  # more than two programs an SM
    assert not deep_decode(128, 32, 4096, 8, 132)  # past one 16-row tile
    assert not deep_decode(256, 1, 4096, 8, 132)  # a head dim the entry does not cover
    assert decode_config(128, 4, False, deep=True).block_n == 128
