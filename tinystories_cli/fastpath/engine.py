"""The fast decode engine: a `TransformerLM` driven one token at a time through the C kernel (decode.c).

    fast = FastLM(model, precision="fp32")     # the matrices packed once into huge-page memory
    model.setup_caches(B, ctx)                 # the KV cache: torch's buffers, shared with the kernel
    fast.bind_caches(model)
    logits = fast.step(tokens, col, pad)       # (B, V) view of a buffer the next step overwrites

Only Llama-style models qualify (`unsupported_reason` says why one does not): pre-norm RMSNorm,
RoPE, SwiGLU, no biases, fp32 parameters on the CPU. Every matrix is copied once, in the engine's
precision, into one 2 MiB-aligned mapping advised for transparent huge pages (`HugeArena`): a decode
step streams every weight once, and with 4 KiB pages the TLB misses of that stream, not the memory,
set its speed (measured on the development VM: 14 GB/s from malloc'd memory against 28 GB/s from huge
pages, one thread, a 70 MB matrix). Precisions, all with fp32 activations and an fp32 KV cache:
"fp32" copies the parameters as they are; "bf16" packs a bf16 copy (rounded to
nearest even) and rounds each input vector to bf16 before the dot products (native vdpbf16ps,
so it needs a CPU with avx512_bf16, see `native_bf16`); "int8" packs each matrix as int8 with one
fp32 scale per group of 64 inputs of a row (`int8_group()`) (symmetric, scale = max|w| / 127) and
multiplies the fp32 input by the dequantized weights. The token embedding stays fp32 (one row is
read per token); a tied LM head gets its own packed copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import weakref
from ctypes import POINTER, c_float, c_int, c_void_p

import torch
from torch import Tensor

from tinystories_cli.fastpath import build

PRECISIONS = ("fp32", "bf16", "int8")
ENGINES = ("auto", "fast", "torch")
_PREC_CODE = {"fp32": 0, "bf16": 1, "int8": 2}


class _Mat(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("scale", c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("dim", c_int), ("n_layers", c_int), ("n_heads", c_int), ("head_dim", c_int), ("d_ff", c_int),
                ("vocab", c_int), ("cache_batch", c_int), ("cache_len", c_int), ("prec", c_int), ("eps", c_float),
                ("emb", c_void_p), ("rope_cos", c_void_p), ("rope_sin", c_void_p), ("rope_len", c_int),
                ("final_norm", c_void_p), ("head", _Mat), ("attn_norm", POINTER(c_void_p)),
                ("ffn_norm", POINTER(c_void_p)), ("wq", POINTER(_Mat)), ("wk", POINTER(_Mat)), ("wv", POINTER(_Mat)),
                ("wo", POINTER(_Mat)), ("w1", POINTER(_Mat)), ("w3", POINTER(_Mat)), ("w2", POINTER(_Mat)),
                ("k_cache", POINTER(c_void_p)), ("v_cache", POINTER(c_void_p))]


class _Work(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("xn", c_void_p), ("q", c_void_p), ("att_out", c_void_p), ("hb", c_void_p),
                ("scores", c_void_p), ("xh", c_void_p)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.tslm_forward.argtypes = [POINTER(_Model), POINTER(_Work), c_int, c_void_p, c_int, c_void_p, c_void_p, c_int]
    lib.tslm_forward.restype = c_int
    lib.tslm_greedy.argtypes = [POINTER(_Model), POINTER(_Work), c_int, c_int, c_void_p, c_void_p, c_int, c_int,
                                c_int, c_int, c_void_p]
    lib.tslm_greedy.restype = c_int
    lib.tslm_matvec.argtypes = [POINTER(_Mat), c_int, c_int, c_int, c_void_p, c_void_p, c_int]
    lib.tslm_matvec.restype = c_int
    lib.tslm_quantize_int8.argtypes = [c_void_p, ctypes.c_long, c_int, c_void_p, c_void_p]
    lib.tslm_quantize_int8.restype = None


def kernel() -> ctypes.CDLL:
    """The loaded C library (built on first use; raises build.KernelUnavailable)."""
    lib = build.load()
    if not getattr(lib, "_tslm_declared", False):
        _declare(lib)
        lib._tslm_declared = True
    return lib


def native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (avx512_bf16, or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & build.cpu_flags())


def int8_group() -> int:
    return int(kernel().tslm_int8_group())


def unsupported_reason(model) -> str | None:
    """Why the C kernel cannot run this model (None when it can): it runs Llama-style TransformerLMs only."""
    from tinystories_cli.model import TransformerLM

    if not isinstance(model, TransformerLM):
        return f"{type(model).__name__} is not a TransformerLM"
    cfg = model.config
    wrong = []
    if cfg.norm != "rmsnorm":
        wrong.append(f"norm {cfg.norm}")
    if cfg.norm_position != "pre":
        wrong.append(f"{cfg.norm_position}-norm")
    if cfg.pos_emb != "rope":
        wrong.append(f"{cfg.pos_emb} positions")
    if cfg.ffn != "swiglu":
        wrong.append(f"{cfg.ffn} FFN")
    if cfg.bias:
        wrong.append("biases")
    if wrong:
        return "the fast decode kernel runs Llama-style models only (RMSNorm pre-norm, RoPE, SwiGLU, no biases), " \
               f"not {', '.join(wrong)}"
    p = model.lm_head.weight
    if p.device.type != "cpu":
        return f"the fast decode kernel runs on the CPU, the model is on {p.device}"
    if any(t.dtype != torch.float32 for t in model.parameters()):
        return "the fast decode kernel needs fp32 parameters"
    return None


class HugeArena:
    """One anonymous mapping, 2 MiB-aligned and advised for transparent huge pages (where the kernel
    offers them), that tensors are copied into back to back, each 64-byte aligned.

    >>> arena = HugeArena(1000)
    >>> t = arena.take(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    >>> t.tolist(), t.data_ptr() % 64
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 0)
    """

    ALIGN = 2 << 20

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + self.ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # before the first touch, or it is too late
            self._map.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        start = (-raw.data_ptr()) % self.ALIGN
        self._buf = raw[start:start + nbytes]
        self.used = 0

    @staticmethod
    def size_of(t: Tensor) -> int:
        """Bytes `take(t)` may use (the tensor and its alignment)."""
        return t.numel() * t.element_size() + 64

    def take(self, t: Tensor) -> Tensor:
        """A copy of `t` in the arena (same dtype and shape, contiguous)."""
        n = t.numel() * t.element_size()
        start = -(-self.used // 64) * 64
        if start + n > self._buf.numel():
            raise ValueError(f"the arena holds {self._buf.numel()} bytes; {start + n} needed")
        out = self._buf[start:start + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.used = start + n
        return out


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class FastLM:
    """A TransformerLM bound to the C kernel in one precision (see the module docstring)."""

    def __init__(self, model, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.lib = kernel()
        self.precision = precision  # (no reference to the model: engines are cached per model, weakly)
        self.weight_bytes = 0  # bytes of the packed matrices (what one token streams)
        cfg = model.config
        self.vocab_size, self.dim, self.num_layers = cfg.vocab_size, cfg.d_model, cfg.num_layers
        self._keep: list = []  # every buffer the kernel points into
        self.version = param_version(model)
        layers = model.layers
        L = len(layers)
        m = _Model()
        m.dim, m.n_layers, m.n_heads, m.head_dim = cfg.d_model, L, cfg.num_heads, cfg.head_dim
        m.d_ff, m.vocab, m.prec, m.eps = cfg.d_ff, cfg.vocab_size, _PREC_CODE[precision], cfg.norm_eps
        m.emb = self._hold(model.token_embeddings.weight.detach().contiguous())
        rope = layers[0].attn.rope
        m.rope_cos, m.rope_sin = self._hold(rope.cos.contiguous()), self._hold(rope.sin.contiguous())
        m.rope_len = rope.cos.shape[0]
        m.final_norm = self._hold(model.ln_final.weight.detach().contiguous())
        group = int(self.lib.tslm_int8_group())
        packed_bytes = {"fp32": 4, "bf16": 2, "int8": 1}[precision]
        matrices = [model.lm_head.weight] + [lin.weight for b in layers for lin in
                                             (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.output_proj,
                                              b.ffn.w1, b.ffn.w3, b.ffn.w2)]
        self._arena = HugeArena(sum(w.numel() * packed_bytes + 64 + (4 * w.shape[0] * -(-w.shape[1] // group) + 64
                                                                     if precision == "int8" else 0)
                                    for w in matrices))
        m.head = self.pack(model.lm_head.weight)
        self._norms_a = (c_void_p * L)(*[self._hold(b.ln1.weight.detach().contiguous()) for b in layers])
        self._norms_f = (c_void_p * L)(*[self._hold(b.ln2.weight.detach().contiguous()) for b in layers])
        m.attn_norm, m.ffn_norm = self._norms_a, self._norms_f
        self._mats = {}
        for name, get in (("wq", lambda b: b.attn.q_proj), ("wk", lambda b: b.attn.k_proj),
                          ("wv", lambda b: b.attn.v_proj), ("wo", lambda b: b.attn.output_proj),
                          ("w1", lambda b: b.ffn.w1), ("w3", lambda b: b.ffn.w3), ("w2", lambda b: b.ffn.w2)):
            arr = (_Mat * L)(*[self.pack(get(b).weight) for b in layers])
            self._mats[name] = arr
            setattr(m, name, arr)
        self.m = m
        w = _Work()
        d, f = cfg.d_model, cfg.d_ff
        self._work = [torch.zeros(n) for n in (d, d, d, d, f)]
        w.x, w.xn, w.q, w.att_out, w.hb = [t.data_ptr() for t in self._work]
        self._xh = torch.zeros(max(d, f), dtype=torch.int16)
        w.xh = self._xh.data_ptr()
        self.w = w
        self.batch = 0
        self.logits: Tensor | None = None

    def _hold(self, t: Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def pack(self, weight: Tensor) -> _Mat:
        """The matrix in this engine's precision, copied into the huge-page arena."""
        w = weight.detach()
        self.weight_bytes += w.numel() * {"fp32": 4, "bf16": 2, "int8": 1}[self.precision] \
            + (4 * w.shape[0] * -(-w.shape[1] // int(self.lib.tslm_int8_group())) if self.precision == "int8" else 0)
        if self.precision == "fp32":
            return _Mat(self._hold(self._arena.take(w.contiguous())), None)
        if self.precision == "bf16":
            return _Mat(self._hold(self._arena.take(w.to(torch.bfloat16).contiguous())), None)
        q, s = quantize_int8(w, self.lib)
        return _Mat(self._hold(self._arena.take(q)), self._hold(self._arena.take(s)))

    def bind_caches(self, model) -> None:
        """Point the kernel at the model's KV cache (set up with `model.setup_caches`)."""
        caches = [b.attn.kv_cache for b in model.layers]
        if any(c is None for c in caches):
            raise ValueError("set up the model's KV cache first (model.setup_caches)")
        k0 = caches[0].k
        B, nh, S, hs = k0.shape
        if k0.dtype != torch.float32 or k0.device.type != "cpu":
            raise ValueError("the fast decode kernel needs an fp32 KV cache on the CPU")
        self._caches = [(c.k, c.v) for c in caches]
        self._kc = (c_void_p * len(caches))(*[c.k.data_ptr() for c in caches])
        self._vc = (c_void_p * len(caches))(*[c.v.data_ptr() for c in caches])
        self.m.k_cache, self.m.v_cache = self._kc, self._vc
        self.m.cache_batch, self.m.cache_len = B, S
        self.batch = B
        self._scores = torch.zeros(nh * S)
        self.w.scores = self._scores.data_ptr()
        self.logits = torch.zeros(B, self.vocab_size)
        self._m_ref, self._w_ref = ctypes.byref(self.m), ctypes.byref(self.w)

    def step(self, tokens: Tensor, col: int, pad: Tensor | None = None, threads: int | None = None) -> Tensor:
        """Run tokens (B,) int64 at cache column `col` (row b at position col - pad[b]); the logits (B, V)."""
        B = tokens.shape[0]
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        if pad is not None and (pad.dtype != torch.int64 or not pad.is_contiguous()):
            pad = pad.to(torch.int64).contiguous()
        nt = torch.get_num_threads() if threads is None else threads
        rc = self.lib.tslm_forward(self._m_ref, self._w_ref, B, tokens.data_ptr(), col,
                                   None if pad is None else pad.data_ptr(), self.logits.data_ptr(), nt)
        if rc:
            raise ValueError(f"decode step out of range: batch {B} (cache {self.batch}), column {col}")
        return self.logits[:B]

    def greedy(self, logits: Tensor, col: int, pad: Tensor | None, n_ids: int, n_feeds: int,
               vocab_limit: int | None = None, threads: int | None = None) -> Tensor:
        """Greedy decoding inside the kernel: ids (n_ids, B), where ids[s] is the argmax of the logits
        (over ids < vocab_limit) before step s, and ids[s] for s < n_feeds is run at column col + s.
        `logits` (B, V) are the current ones; afterwards `self.logits[:B]` holds the next ones."""
        B = logits.shape[0]
        if logits.data_ptr() != self.logits.data_ptr():
            self.logits[:B].copy_(logits)
        if pad is not None and (pad.dtype != torch.int64 or not pad.is_contiguous()):
            pad = pad.to(torch.int64).contiguous()
        ids = torch.empty(n_ids, B, dtype=torch.int64)
        nt = torch.get_num_threads() if threads is None else threads
        rc = self.lib.tslm_greedy(self._m_ref, self._w_ref, B, col, None if pad is None else pad.data_ptr(),
                                  self.logits.data_ptr(), nt, n_ids, n_feeds, vocab_limit or self.vocab_size,
                                  ids.data_ptr())
        if rc:
            raise ValueError(f"greedy decode out of range: batch {B} (cache {self.batch}), columns {col}.."
                             f"{col + n_feeds - 1}")
        return ids

    def prefill(self, ids: Tensor, pad: Tensor | None = None, start: int = 0) -> Tensor:
        """Run the columns start.. of ids (B, T) one at a time (a padding column sees only itself, as in
        TransformerLM.forward); the last column's logits (B, V)."""
        B, T = ids.shape
        ids = ids.to(torch.int64)
        logits = None
        for c in range(start, T):
            col_pad = None if pad is None else torch.minimum(pad, torch.tensor(c)).to(torch.int64).contiguous()
            logits = self.step(ids[:, c].contiguous(), c, col_pad)
        assert logits is not None
        return logits

    def matvec(self, mat: _Mat, rows: int, cols: int, x: Tensor, threads: int = 1) -> Tensor:
        """One packed matrix times a vector through the kernel's dot products (for tests)."""
        x = x.float().contiguous()
        out = torch.empty(rows)
        rc = self.lib.tslm_matvec(ctypes.byref(mat), _PREC_CODE[self.precision], rows, cols, x.data_ptr(),
                                  out.data_ptr(), threads)
        if rc:
            raise ValueError("matvec arguments out of range")
        return out


def quantize_int8(w: Tensor, lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor]:
    """(q int8 (rows, cols), scale fp32 (rows, ceil(cols / group))): w ~= q * scale per group of a row."""
    lib = lib or kernel()
    w = w.detach().float().contiguous()
    rows, cols = w.shape
    g = int(lib.tslm_int8_group())
    q = torch.empty(rows, cols, dtype=torch.int8)
    s = torch.empty(rows, (cols + g - 1) // g)
    lib.tslm_quantize_int8(w.data_ptr(), rows, cols, q.data_ptr(), s.data_ptr())
    return q, s


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    """The fp32 matrix an int8 packing stands for (the reference the kernel is tested against)."""
    g = int8_group()
    if s.shape != (q.shape[0], -(-q.shape[1] // g)):
        raise ValueError(f"int8 scales {tuple(s.shape)} do not fit weights {tuple(q.shape)} in groups of {g}")
    return q.float() * s.repeat_interleave(g, dim=1)[:, : q.shape[1]]


def param_version(model) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (so packed copies go stale).
    (Parameters created under torch.inference_mode have no version counter: only replacement counts.)"""
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in model.parameters())


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_model(model, precision: str) -> FastLM:
    """The model's FastLM in `precision`, packed once and reused while its parameters are unchanged."""
    per_model = _ENGINES.setdefault(model, {})
    fm = per_model.get(precision)
    if fm is None or fm.version != param_version(model):
        fm = per_model[precision] = FastLM(model, precision)
    return fm
