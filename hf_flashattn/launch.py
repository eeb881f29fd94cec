"""Launching a Triton kernel cheaply, call after call.

``kernel[grid](*args)`` re-derives the kernel's specialisation from every argument on every
call (Triton 3.6: ~40-80 µs of host time for our ~40 arguments, more than the GPU needs for a
GPT-2-sized attention call), and its launcher asks the driver about every tensor pointer. A
``_Launcher`` pays that once per *binary key*: the int arguments' values (for ints the kernel
marks ``do_not_specialize``, only their width), the tensors' element types and the device,
with every tensor 16-byte aligned (what Triton specialises on). Element types belong in the
key even where the caller's launcher key holds the inputs' dtype: an output or a mask may
differ. On a hit it calls the compiled kernel's own launcher directly, with
raw device pointers, as PyTorch's inductor does for its Triton kernels. Keying on the int
values themselves, rather than re-implementing Triton's rules (==1, divisible by 16, fits in
32 bits), cannot pick a wrong binary: equal keys are equal specialisations whatever the rules
are. A new sequence length is one slow launch, then cached; misaligned tensors (views at odd
offsets) always take the slow launch.

The direct call leans on the launcher's calling convention
``run(grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter_hook,
exit_hook, *args)`` (Triton 3.3 to 3.9 at least), with pointers as ints. When that convention
does not hold (a TypeError before anything launches), or under the interpreter, or while a
launch hook is set (profilers such as proton need it called), every launch takes
``kernel[grid]``.
"""

from __future__ import annotations

import warnings
from functools import reduce
from operator import attrgetter, or_

import torch
from triton.runtime import driver
from triton.runtime.errors import OutOfResources

from .kernels.configs import KernelConfig, resident_programs

try:  # where Triton keeps its launch hooks (3.4+)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: hooks unknown, always launch safely
    _knobs = None

# How many binaries one launcher remembers: each distinct shape is one entry. Past this the
# cache starts over (a run cycling through more shapes than this pays one slow launch each).
_MAX_BINARIES = 512
# Set off for good once the direct call's convention is found not to hold.
_direct_launch = {"enabled": True}
# launch_metadata, enter hook, exit hook: none (launches with hooks set take kernel[grid])
_NO_HOOKS = (None, None, None)
# map() with these loops in C: ~20% less host time than comprehensions, on every launch
_data_ptr = torch.Tensor.data_ptr
_dtype = attrgetter("dtype")


def _hooks_set() -> bool:
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    return _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)


def _active(hook) -> bool:
    # a plain callable (Triton 3.4-3.6) or a HookChain that may be empty (newer)
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _stream_getter():
    # Triton's own: the current stream of a device index, as kernel[grid] launches on
    return driver.active.get_current_stream


def _resident_programs(compiled, device_index: int) -> int | None:
    """Programs of a compiled binary that one SM of the device holds at once
    (``configs.resident_programs``). None where the binary does not say its registers."""
    n_regs = getattr(compiled, "n_regs", None)
    if not n_regs:
        return None
    props = torch.cuda.get_device_properties(device_index)
    return resident_programs(
        n_regs,
        compiled.metadata.shared,
        compiled.metadata.num_warps,
        props.regs_per_multiprocessor,
        props.shared_memory_per_multiprocessor,
        props.max_threads_per_multi_processor,
    )


class _Launcher:
    """One kernel at one set of constexprs, with everything its launch needs built once: the
    config (stepped down the first time a GPU lacks the shared memory for it), the keyword
    arguments (constexprs and launch options) and the compiled binaries seen so far.

    The grid is one axis, ``cdiv(rows, block) * heads`` programs (the kernels unfold it),
    or ``rows * heads`` where the rows are programs already:
    grid axis 1 would cap batch * heads at 65,535. Paired (causal) kernels give each program
    two blocks, so half as many.
    """

    __slots__ = (
        "kernel", "grid_block", "paired", "cfg", "block", "constexprs", "kwargs", "tail",
        "binaries", "free_ints", "per_sm", "registers",
    )  # fmt: skip

    def __init__(
        self,
        kernel,
        cfg: KernelConfig,
        grid_block: str | None,
        constexprs: dict,
        direct: bool = True,
        paired: bool = False,
    ) -> None:
        self.kernel = kernel
        # the block that tiles the rows: "block_m" (queries), "block_n" (keys, dK/dV), or None
        # (the rows are the programs: one per split, one per query)
        self.grid_block = grid_block
        self.paired = paired  # True: one program per pair of blocks (causal load balance)
        self.constexprs = constexprs
        # binary key -> (run, function, metadata) of the compiled kernel; None: never direct
        self.binaries: dict | None = {} if direct else None
        self.free_ints: tuple | None = None  # see _int_key
        self._use(cfg)

    def _use(self, cfg: KernelConfig) -> None:
        self.cfg = cfg
        self.block = getattr(cfg, self.grid_block) if self.grid_block else 1
        # the block sizes the kernel takes (all of them where it does not say)
        params = getattr(self.kernel, "arg_names", None) or ("BLOCK_M", "BLOCK_N")
        blocks = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
        self.kwargs = dict(
            self.constexprs,
            **{name: size for name, size in blocks.items() if name in params},
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if cfg.max_registers:
            self.kwargs["maxnreg"] = cfg.max_registers
        if self.binaries is not None:
            self.binaries.clear()
        self.tail = self._constexpr_tail()
        # programs_per_sm's answer: None until asked, 0 where there is none to read; and the
        # registers per thread of the binary it read (None where not known)
        self.per_sm: int | None = None
        self.registers: int | None = None

    def _constexpr_tail(self) -> tuple | None:
        """The constexpr values in signature order, which the compiled launcher takes after the
        runtime arguments; None unless the signature is ``runtime args..., constexprs...`` with
        every constexpr given."""
        params = getattr(self.kernel, "params", None) or ()
        constexprs = [p for p in params if p.is_constexpr]
        if params[len(params) - len(constexprs) :] != constexprs:
            return None  # a runtime argument after a constexpr
        if any(p.name not in self.kwargs for p in constexprs):
            return None
        return tuple(self.kwargs[p.name] for p in constexprs)

    def _step_down(self, err: OutOfResources) -> None:
        """The next config down after ``err``, kept for later calls: the GPU lacks the shared
        memory for this one. Raises ``err`` when none is smaller."""
        smaller = self.cfg.smaller()
        if smaller is None:
            raise err
        self._use(smaller)

    def programs_per_sm(self, tensors: tuple, floats: tuple, ints: tuple) -> int | None:
        """How many programs of the binary these arguments launch one SM holds at once, as its
        registers, shared memory and threads allow: a grid of that many per SM runs in one
        wave. The binary is compiled (not launched) on the first ask, and the answer kept, none
        included. None under the interpreter, or where the binary does not say its registers."""
        if self.per_sm is None and self.binaries is None:  # the interpreter: no binary
            self.per_sm = 0
        if self.per_sm is None:
            while True:
                try:
                    compiled = self.kernel.warmup(
                        *tensors, *floats, *ints, grid=(1,), **self.kwargs
                    )
                    compiled.run  # noqa: B018 - loads the binary: registers known, fit checked
                    break
                except OutOfResources as err:
                    self._step_down(err)
            self.per_sm = _resident_programs(compiled, tensors[0].get_device()) or 0
            self.registers = getattr(compiled, "n_regs", None) or None
        return self.per_sm or None

    def __call__(self, rows: int, heads: int, tensors: tuple, floats: tuple, ints: tuple):
        """Launch over ``rows`` (queries or keys) x ``heads`` with the kernel's arguments in
        signature order: pointer tensors, then floats, then ints (constexprs come from the
        constructor)."""
        key = ptrs = None
        if self.binaries is not None and _direct_launch["enabled"] and not _hooks_set():
            ptrs = list(map(_data_ptr, tensors))
            if tensors and not reduce(or_, ptrs) & 15:
                # each pointer's element type is part of the binary (a float16 and a bfloat16
                # output are two kernels), as are the device and the ints
                dtypes = tuple(map(_dtype, tensors))
                ints_key = self._int_key(len(tensors) + len(floats), ints)
                key = (tensors[0].get_device(), dtypes, ints_key)
        while True:
            blocks = (rows + self.block - 1) // self.block
            grid_x = ((blocks + 1) // 2 if self.paired else blocks) * heads
            if key is not None:
                hit = self.binaries.get(key)
                if hit is not None and self._run_direct(hit, grid_x, ptrs, floats, ints):
                    return
            try:
                compiled = self.kernel[(grid_x,)](*tensors, *floats, *ints, **self.kwargs)
            except OutOfResources as err:  # raised before anything runs
                self._step_down(err)
                continue
            if key is not None:
                self._remember(key, compiled, len(tensors) + len(floats) + len(ints))
            return

    def _int_key(self, first_int: int, ints: tuple) -> tuple:
        """The ints' part of the binary key. An int the kernel marks ``do_not_specialize`` (a
        length or stride that changes every decoding step) changes the binary only by its
        type (32 or 64 bits), so only that enters."""
        free = self.free_ints
        if free is None:
            params = getattr(self.kernel, "params", None) or ()
            free = self.free_ints = tuple(
                i
                for i in range(len(ints))
                if first_int + i < len(params)
                and getattr(params[first_int + i], "do_not_specialize", False)
            )
        if not free:
            return ints
        key = list(ints)
        for i in free:  # Triton's types for unspecialised ints
            v = key[i]
            key[i] = "i32" if -(2**31) <= v < 2**31 else "i64" if v < 2**63 else "u64"
        return tuple(key)

    def _run_direct(self, hit: tuple, grid_x: int, ptrs: list, floats: tuple, ints: tuple):
        run, function, metadata, stream, device_index = hit
        try:
            run(
                grid_x,
                1,
                1,
                stream(device_index),
                function,
                metadata,
                *_NO_HOOKS,
                *ptrs,
                *floats,
                *ints,
                *self.tail,
            )
        except TypeError as err:  # parsed before anything launches: the convention changed
            _direct_launch["enabled"] = False
            warnings.warn(
                f"hf_flashattn: direct kernel launch unavailable on this Triton ({err}); "
                "launching through kernel[grid] (more host time per call)",
                stacklevel=3,
            )
            return False
        return True

    def _remember(self, key: tuple, compiled, n_args: int) -> None:
        function = getattr(compiled, "function", None)
        if function is None:  # the interpreter, or a stand-in kernel: nothing to call directly
            return
        if self.tail is None or n_args + len(self.tail) != len(self.kernel.params):
            self.binaries = None  # the call does not match the signature: never direct
            return
        if len(self.binaries) >= _MAX_BINARIES:
            self.binaries.clear()
        self.binaries[key] = (
            compiled.run,
            function,
            compiled.packed_metadata,
            _stream_getter(),
            key[0],
        )
