"""The fast CPU decode path of `tslm generate`: a C kernel (decode.c) for Llama-style models.

`select(model, engine, precision)` decides which path decodes: engine "fast" (the C kernel; an error
when it cannot run), "torch" (the from-scratch TransformerLM with its KV cache, the reference) or
"auto" (fast where it can run, else torch with a one-line note). `precision` ("fp32", "bf16",
"int8") applies to the fast engine's weights; fp32 is the default and the only one torch runs.
See engine.py for the layouts and build.py for how the kernel is compiled and cached.
"""

from __future__ import annotations

from tinystories_cli.fastpath import build
from tinystories_cli.fastpath.engine import (
    ENGINES,
    PRECISIONS,
    FastLM,
    dequantize_int8,
    fast_model,
    native_bf16,
    quantize_int8,
    unsupported_reason,
)

__all__ = ["ENGINES", "PRECISIONS", "FastLM", "select", "check_precision", "native_bf16", "unsupported_reason",
           "quantize_int8", "dequantize_int8", "fast_model", "build"]


def check_precision(precision: str) -> None:
    """Raise ValueError for an unknown precision, or bf16 on a CPU without native bf16 dot products."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and not native_bf16():
        raise ValueError("bf16 needs a CPU with native bf16 dot products (avx512_bf16 or amx_bf16), and this one "
                         "has none; use fp32 or int8")


def select(model, engine: str = "auto", precision: str = "fp32", *, use_cache: bool = True
           ) -> tuple[FastLM | None, str | None]:
    """(the FastLM that decodes, or None for the torch path; a one-line note when "auto" fell back).

    Raises ValueError where the request cannot be met: an unknown engine or precision, bf16 on a
    CPU without it, engine "fast" (or a precision other than fp32) where the kernel cannot run.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    check_precision(precision)
    if engine == "torch":
        if precision != "fp32":
            raise ValueError(f"precision {precision} runs on the fast engine only; the torch engine is fp32")
        return None, None
    reason = unsupported_reason(model)
    if reason is None and not use_cache:
        reason = "the fast decode kernel needs the KV cache"
    if reason is None:
        try:
            return fast_model(model, precision), None
        except build.KernelUnavailable as e:
            reason = str(e)
    if engine == "fast" or precision != "fp32":
        raise ValueError(f"{reason} (needed for {'the fast engine' if engine == 'fast' else precision})")
    return None, f"decoding with the torch path: {reason}"
