"""tslm generate: samplers, KV-cache equivalence, stop conditions, batches, context overflow, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from tinystories_cli.generate import (
    draw_noise,
    logits_to_probs,
    make_generators,
    sample,
    top_k_filter,
    top_p_filter,
)

# tiny models: one intra-op thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    # (torch.testing.assert_close costs a 3 s import on first use)
    assert a.shape == b.shape and (a - b).abs().max() <= atol, (a, b)


def kept(filtered: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(filtered[0].tolist()) if v != float("-inf")}


def logp(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float32).log()


@pytest.mark.parametrize(
    "probs, p, nucleus",
    [
        ([0.5, 0.3, 0.2], 0.8, {0, 1}),  # mass reaches p exactly at the 2nd token
        ([0.5, 0.3, 0.2], 0.81, {0, 1, 2}),  # just past it needs the 3rd
        ([0.5, 0.3, 0.2], 0.5, {0}),
        ([0.5, 0.3, 0.2], 0.49, {0}),
        ([0.5, 0.3, 0.2], 1e-9, {0}),  # always at least one token
        ([0.2, 0.5, 0.3], 0.6, {1, 2}),  # order in the vocab does not matter
        ([0.4, 0.2, 0.2, 0.2], 0.5, {0, 1, 2, 3}),  # ties with the last member are all kept
        ([0.4, 0.2, 0.2, 0.2], 0.4, {0}),
        ([0.25, 0.25, 0.25, 0.25], 0.1, {0, 1, 2, 3}),  # a uniform row keeps everything
        ([0.1, 0.6, 0.1, 0.2], 0.75, {1, 3}),
        ([0.1, 0.6, 0.1, 0.2], 0.9, {0, 1, 2, 3}),
        ([0.7, 0.1, 0.1, 0.1], 1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_exactly_the_nucleus(probs, p, nucleus):
    assert kept(top_p_filter(logp(probs), p)) == nucleus


def test_top_p_renormalizes_and_handles_rows_independently():
    logits = torch.cat([logp([0.5, 0.3, 0.2]), logp([0.1, 0.1, 0.8])])
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.7)
    assert_close(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0], [0.0, 0.0, 1.0]]))


def test_top_p_brute_force_random_rows():
    """Against a direct definition: the smallest prefix of the sorted probs with mass >= p."""
    g = torch.Generator().manual_seed(0)
    for trial in range(240):
        # small vocabularies, and 300-token ones where the nucleus fits in the top-128 fast path
        # (peaked rows) or does not (flat rows, full sort)
        v = int(torch.randint(2, 12, (1,), generator=g)) if trial < 200 else 300
        scale = 3.0 if trial < 200 else (0.3 if trial % 2 else 8.0)
        logits = torch.randn(1, v, generator=g) * scale
        p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        probs = torch.softmax(logits, -1)[0].double().tolist()
        order = sorted(range(v), key=lambda i: -probs[i])
        mass, expect = 0.0, set()
        for i in order:
            expect.add(i)
            mass += probs[i]
            if mass >= p:
                break
        assert kept(top_p_filter(logits, p)) == expect


def test_top_k():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5]])
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 1)) == {3}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3, 4}  # 0 disables
    assert kept(top_k_filter(logits, 99)) == {0, 1, 2, 3, 4}
    assert kept(top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2)) == {1, 2}
    assert kept(top_k_filter(torch.tensor([[1.0, 2.0, 1.0, 0.0]]), 2)) == {0, 1, 2}  # tie at the k-th kept


def test_top_k_then_top_p_order():
    # top-k (k=2) leaves {0.5, 0.3} -> renormalized {0.625, 0.375}; top-p 0.6 then keeps only the first
    probs = logits_to_probs(logp([0.5, 0.3, 0.2]), top_k=2, top_p=0.6)
    assert_close(probs, torch.tensor([[1.0, 0.0, 0.0]]))


def test_temperature_scaling():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    for t in (0.5, 1.0, 2.0):
        assert_close(logits_to_probs(logits, temperature=t), torch.softmax(logits / t, -1))
    # lower temperature sharpens, higher flattens
    assert logits_to_probs(logits, 0.5)[0, 2] > logits_to_probs(logits, 1.0)[0, 2] > logits_to_probs(logits, 2.0)[0, 2]


def test_greedy_at_temperature_zero_ignores_noise():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    noise = draw_noise(make_generators(0, 2), 3)
    assert sample(logits, noise, temperature=0).tolist() == [1, 0]
    assert sample(logits, None, temperature=0, top_k=1, top_p=0.1).tolist() == [1, 0]


def test_fixed_seed_is_reproducible_and_rows_are_independent_streams():
    logits = torch.zeros(3, 50)

    def draw(seed: int, rows: int) -> list[list[int]]:
        gens = make_generators(seed, rows)
        return [sample(logits[:rows], draw_noise(gens, 50)).tolist() for _ in range(20)]

    a, b = draw(7, 3), draw(7, 3)
    assert a == b
    # row r of a batch seeded S is the single-row stream seeded S + r
    assert [step[1] for step in a] == [step[0] for step in draw(8, 1)]
    assert [step[0] for step in a] != [step[1] for step in a]
    assert draw(9, 1) != draw(7, 1)


def test_sampled_distribution_matches_probabilities():
    """Chi-square goodness of fit on a 6-token vocab after temperature + top-k + top-p."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    expected = logits_to_probs(logits, temperature=1.3, top_k=5, top_p=0.95)[0]
    assert expected[5] == 0  # removed by top-k
    n = 20_000
    gens = make_generators(123, 1)
    # sample n independent draws at once: repeat the row n times, one noise row per draw
    noise = torch.empty(n, 6).exponential_(1.0, generator=gens[0])
    ids = sample(logits.expand(n, 6), noise, temperature=1.3, top_k=5, top_p=0.95)
    counts = torch.bincount(ids, minlength=6).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered-out token was sampled"
    exp_counts = expected[support].double() * n
    chi2 = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    df = int(support.sum()) - 1
    # critical value of chi-square at p = 1e-4: df=3 -> 21.1, df=4 -> 23.5
    assert chi2 < {3: 21.1, 4: 23.5}[df], (chi2, counts.tolist(), exp_counts.tolist())
    # and each frequency within 5 sigma of its probability
    for c, p in zip(counts[support].tolist(), expected[support].tolist()):
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------
# KV cache == full forward, for every positional encoding
# ---------------------------------------------------------------------------------------------

from tinystories_cli.config import ModelConfig  # noqa: E402
from tinystories_cli.generate import (  # noqa: E402
    EOT,
    MAX_TOKENS,
    STOP_STRING,
    BatchDecoder,
    TextStream,
    decode_one_token,
    full_forward,
    generate,
    generate_samples,
    generate_tokens,
    prefill,
)
from tinystories_cli.model import TransformerLM  # noqa: E402

VOCAB = 257  # 256 bytes + <|endoftext|>


def tiny_model(pos_emb: str = "rope", ctx: int = 32, seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, context_length=ctx, d_model=32, num_layers=2, num_heads=4, pos_emb=pos_emb, **kw
    )
    return TransformerLM(cfg).eval()


VARIANTS = [
    dict(pos_emb="rope"),
    dict(pos_emb="nope"),
    dict(pos_emb="sinusoidal"),
    dict(pos_emb="learned"),
    dict(pos_emb="rope", attention_backend="reference"),
    dict(pos_emb="learned", norm="layernorm", norm_position="post", ffn="gelu", tie_embeddings=True),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@torch.inference_mode()
def test_cached_step_logits_equal_full_forward(variant):
    model = tiny_model(**variant)
    seq = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])  # (1, 7)
    model.setup_caches(1, model.config.context_length)
    try:
        logits = prefill(model, seq)
        steps = 0
        while seq.shape[1] < model.config.context_length:
            ref = full_forward(model_without_cache(model), seq)
            assert (logits - ref).abs().max() <= 1e-4
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1) greedy
            seq = torch.cat([seq, nxt], dim=1)
            logits = decode_one_token(model, nxt, seq.shape[1] - 1)
            steps += 1
        assert steps == model.config.context_length - 7
    finally:
        model.clear_caches()


class model_without_cache:
    """A view of a model with its caches detached for one call (so the reference really recomputes)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, start_pos=0):
        saved = [layer.attn.kv_cache for layer in self.model.layers]
        self.model.clear_caches()
        try:
            return self.model(ids, start_pos=start_pos)
        finally:
            for layer, c in zip(self.model.layers, saved):
                layer.attn.kv_cache = c


@pytest.mark.parametrize("pos_emb", ["rope", "nope", "sinusoidal", "learned"])
def test_cached_and_uncached_decoding_give_identical_tokens(pos_emb):
    """Greedy and seeded sampling, through two context slides (ctx 16, 40 new tokens)."""
    model = tiny_model(pos_emb, ctx=16)
    for temperature, seeds in ((0.0, None), (1.0, [3])):
        runs = []
        for use_cache in (True, False):
            dec = BatchDecoder(model, [[1, 2, 3, 4, 5]], seeds=seeds, max_new_tokens=40, temperature=temperature,
                               use_cache=use_cache)
            runs.append([step[0] for step in dec])
            assert dec.context_shifts == 4  # token 12 finds 5 + 11 = 16 full; then tokens 21, 29, 37
        assert runs[0] == runs[1] and len(runs[0]) == 40
    assert all(layer.attn.kv_cache is None for layer in model.layers)  # the cache lives inside the call


# ---------------------------------------------------------------------------------------------
# A scripted stand-in model: the next token is a function of the last one; it checks that the
# driver only ever feeds positions the cache already holds.
# ---------------------------------------------------------------------------------------------


class ScriptedLM(torch.nn.Module):
    def __init__(self, table: dict[int, int], ctx: int = 16, vocab: int = VOCAB, default: int = ord("x")):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, context_length=ctx, d_model=8, num_layers=1, num_heads=1)
        self.table, self.default = table, default
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.cache_len: int | None = None
        self.prefills = 0

    def setup_caches(self, batch_size, max_seq_len=None):
        self.cache_len = 0

    def clear_caches(self):
        self.cache_len = None

    def forward(self, ids, start_pos=0):
        B, T = ids.shape
        assert start_pos + T <= self.config.context_length
        if self.cache_len is not None:
            assert start_pos == (0 if T > 1 else self.cache_len), "fed a position the cache does not follow"
            self.cache_len = start_pos + T
        if T > 1 or start_pos == 0:
            self.prefills += 1
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.table.get(int(ids[b, t]), self.default)] = 10.0
        return logits


def byte_tokenizer():
    from tinystories_cli.tokenizer.tokenizer import Tokenizer

    return Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])


def test_stops_at_end_of_text_and_not_before():
    tok = byte_tokenizer()
    assert tok.eot_id == 256
    model = ScriptedLM({ord("h"): ord("i"), ord("i"): ord("!"), ord("!"): 256})
    assert list(generate_tokens(model, [ord("h")], max_new_tokens=10, temperature=0, stop_ids=[256])) == [
        ord("i"), ord("!")]
    assert generate(model, tok, "h", max_new_tokens=10, temperature=0) == "i!"
    # without stop ids it runs to max_new_tokens, end-of-text included
    ids = list(generate_tokens(model, [ord("h")], max_new_tokens=5, temperature=0))
    assert ids == [ord("i"), ord("!"), 256, ord("x"), ord("x")]
    (s,) = generate_samples(model, tok, ["h"], max_new_tokens=10, temperature=0)
    assert (s.text, s.new_tokens, s.stop_reason, s.prompt_tokens) == ("i!", 2, EOT, 1)
    (s,) = generate_samples(model, tok, ["h"], max_new_tokens=2, temperature=0)
    assert (s.text, s.stop_reason) == ("i!", MAX_TOKENS)


def test_empty_prompt_starts_from_end_of_text():
    tok = byte_tokenizer()
    model = ScriptedLM({256: ord("O"), ord("O"): ord("k")})
    assert generate(model, tok, "", max_new_tokens=2, temperature=0) == "Ok"
    assert list(generate_tokens(model, [], max_new_tokens=2, temperature=0, stop_ids=[256])) == [ord("O"), ord("k")]
    with pytest.raises(ValueError, match="empty prompt"):
        list(generate_tokens(model, [], max_new_tokens=2, temperature=0))


def test_prompt_longer_than_context_keeps_its_end_and_window_slides():
    tok = byte_tokenizer()
    model = ScriptedLM({}, ctx=16)  # always "x"
    prompt = "abcdefghijklmnopqrstuvwxyz"  # 26 tokens > 16
    (s,) = generate_samples(model, tok, [prompt], max_new_tokens=30, temperature=0)
    assert s.prompt_dropped == 10 and s.prompt_tokens == 16
    assert s.text == "x" * 30 and s.stop_reason == MAX_TOKENS
    # full at once: slide after the 1st token, then every ctx/2 = 8 tokens: 1 + 9 + 17 + 25 -> 4 slides
    assert s.context_shifts == 4
    # the real model too: never crashes, positions stay inside the context
    real = tiny_model("learned", ctx=16)
    out = list(generate_tokens(real, list(range(40)), max_new_tokens=25, seed=0))
    assert len(out) == 25


def test_stop_strings_and_utf8_streaming():
    tok = byte_tokenizer()
    text = "hé!\n#bye"  # every byte distinct, so "next = f(last)" can script it
    raw = text.encode()
    table = {raw[i]: raw[i + 1] for i in range(len(raw) - 1)}
    table[ord("<")] = raw[0]
    model = ScriptedLM(table, ctx=64)
    chunks: list[str] = []
    (s,) = generate_samples(model, tok, ["<"], max_new_tokens=20, temperature=0, stop_strings=["\n#"],
                            on_text=lambda k, c: chunks.append(c))
    assert s.text == "hé!" and s.stop_reason == STOP_STRING
    assert "".join(chunks) == "hé!" and "\ufffd" not in "".join(chunks)
    assert all(chunks)  # the lone first byte of é released nothing
    # the stream never releases a partial stop string, and the decoder without a byte map agrees
    for token_bytes in (lambda i: bytes([i]), None):
        st = TextStream(tok.decode, token_bytes, ["\n#"])
        out = [st.push(b) for b in raw] + [st.close()]
        assert out[:5] == ["h", "", "é", "!", ""]  # é's first byte, then a \n that may start the stop
        assert "".join(out) == "hé!" and st.stopped


def test_batch_equals_single_runs_with_the_same_streams():
    model = tiny_model("rope", ctx=32)
    prompt = [10, 20, 30]
    dec = BatchDecoder(model, [prompt] * 3, seeds=[100, 101, 102], max_new_tokens=20, temperature=1.0, top_k=50)
    rows = list(zip(*dec))
    for r in range(3):
        single = list(generate_tokens(model, prompt, max_new_tokens=20, seed=100 + r, top_k=50))
        assert list(rows[r]) == single
    assert rows[0] != rows[1]  # different streams
    assert list(generate_tokens(model, prompt, max_new_tokens=20, seed=5)) == list(
        generate_tokens(model, prompt, max_new_tokens=20, seed=5))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@torch.inference_mode()
def test_left_padded_batch_equals_each_row_alone(variant):
    """Rows of different lengths, left-padded: every real column's logits equal the row run alone,
    in a full forward and through the KV cache (prefill, then decode steps)."""
    model = tiny_model(**variant)
    rows = [[5, 17, 99, 3, 250, 42, 7], [8, 1], [60, 61, 62, 63]]
    n = max(map(len, rows))
    pad = torch.tensor([n - len(r) for r in rows])
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    batch = model(ids, pad=pad)  # (3, n, V)
    for b, r in enumerate(rows):
        alone = model(torch.tensor([r]))[0]
        assert (batch[b, n - len(r):] - alone).abs().max() <= 1e-4
    assert torch.isfinite(batch).all()  # padding queries see themselves: no NaN anywhere
    # through the cache: prefill the padded prompts, then one token at a time
    model.setup_caches(3, model.config.context_length)
    try:
        logits = prefill(model, ids, pad=pad)
        seqs = [list(r) for r in rows]
        for step in range(5):
            for b, r in enumerate(seqs):
                ref = full_forward(model_without_cache(model), torch.tensor([r]))[0]
                assert (logits[b] - ref).abs().max() <= 1e-4
            nxt = logits.argmax(-1)  # (3,)
            for b in range(3):
                seqs[b].append(int(nxt[b]))
            logits = decode_one_token(model, nxt[:, None], n + step, pad)
    finally:
        model.clear_caches()


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_length_prompts_decodes_each_as_alone(use_cache):
    model = tiny_model("rope", ctx=32)
    prompts = [[10, 20, 30, 40, 50, 60], [7], [1, 2, 3]]
    for temperature, seeds in ((0.0, None), (1.0, [4, 5, 6])):
        dec = BatchDecoder(model, prompts, seeds=seeds, max_new_tokens=12, temperature=temperature,
                           use_cache=use_cache)
        rows = list(zip(*dec))
        for r, p in enumerate(prompts):
            alone = list(generate_tokens(model, p, max_new_tokens=12, temperature=temperature,
                                         seed=seeds[r] if seeds else None))
            assert list(rows[r]) == alone


def test_padded_batch_slides_together_and_keeps_going():
    # ctx 16: the longest row fills the window first; every row slides with it, none crashes
    model = tiny_model("learned", ctx=16)
    dec = BatchDecoder(model, [[1] * 12, [2, 3]], seeds=None, max_new_tokens=30, temperature=0.0)
    steps = list(dec)
    assert len(steps) == 30 and all(None not in s for s in steps)
    assert dec.context_shifts >= 2 and dec.new_tokens == [30, 30]


def test_prompt_file_batches_prompts_of_any_length_and_keeps_order():
    tok = byte_tokenizer()
    model = tiny_model("sinusoidal", ctx=32)
    prompts = ["ab", "abcd", "xy", "", "pqrs"]
    samples = generate_samples(model, tok, prompts, num_samples=2, max_new_tokens=6, seed=9, stop_at_eot=False)
    assert [s.prompt for s in samples] == [p for p in prompts for _ in range(2)]
    assert [s.seed for s in samples] == [9, 10] * 5
    for s in samples:
        single = generate(model, tok, s.prompt, max_new_tokens=6, seed=s.seed, stop_ids=[])
        assert s.text == single and s.new_tokens == 6


# ---------------------------------------------------------------------------------------------
# CLI end to end, on a tiny run directory written in the format `tslm train` leaves
# ---------------------------------------------------------------------------------------------

import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402


def write_run(run_dir, model: TransformerLM, vocab: dict[int, bytes]) -> None:
    from tinystories_cli.checkpoint import save_checkpoint
    from tinystories_cli.tokenizer.files import write_vocab_merges

    cfg = model.config
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint(model, None, 10, run_dir / "checkpoints" / "step_0000010.safetensors",
                    metadata={"model_config": cfg.model_dump()})
    (run_dir / "config.json").write_text(json.dumps({"model": cfg.model_dump()}))
    write_vocab_merges(run_dir / "tokenizer", vocab, [])


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    from tinystories_cli import paths, runs

    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(paths, "RUNS_ROOT", root)
    model = tiny_model("rope", ctx=32)
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"<|endoftext|>"}
    write_run(root / "tiny", model, vocab)
    runs.update_latest_link(root / "tiny")
    return root, model


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_cli_json_matches_the_library(run_cli, runs_root):
    _, model = runs_root
    code, out, err = run_cli("generate", "Hi there", "--temp", "0", "--max-tokens", "12", "--json", "--device", "cpu")
    assert code == 0, err
    (obj,) = json_lines(out)
    assert {"text", "new_tokens", "tokens_per_s", "stop_reason", "prompt", "seed"} <= set(obj)
    assert obj["prompt"] == "Hi there" and obj["prompt_tokens"] == 8 and obj["seed"] is None
    expect = generate(model, byte_tokenizer(), "Hi there", max_new_tokens=12, temperature=0)
    ids = list(generate_tokens(model, list(b"Hi there"), max_new_tokens=12, temperature=0, stop_ids=[256]))
    assert obj["text"] == expect and obj["new_tokens"] == len(ids)
    assert obj["stop_reason"] == (MAX_TOKENS if len(ids) == 12 else EOT)
    assert obj["ids"] == list(b"Hi there") + ids  # the prompt's ids, then the generated ones


def test_cli_streams_text_then_a_summary_line(run_cli, runs_root):
    code, out, err = run_cli("generate", "--run", "tiny", "--max-tokens", "40", "--seed", "3", "--no-stop")
    assert code == 0, err
    assert out.startswith("Once upon a time")  # the default prompt, then the completion
    summary = err.strip().splitlines()[-1]
    for part in ("16 prompt tokens", "40 new tokens", "tokens/s", "stopped: max tokens", "seed 3", "slid"):
        assert part in summary


def test_cli_samples_prompt_file_and_stdin(run_cli, runs_root, tmp_path, monkeypatch):
    pf = tmp_path / "prompts.txt"
    pf.write_text("The cat\n\nA dog ran\n", encoding="utf-8")
    code, out, err = run_cli("generate", "--prompt-file", str(pf), "-n", "2", "--seed", "5", "--max-tokens", "4",
                             "--json", "--top-k", "20", "--top-p", "0.9", "--temp", "0.8")
    assert code == 0, err
    objs = json_lines(out)
    assert [(o["prompt"], o["seed"]) for o in objs] == [("The cat", 5), ("The cat", 6), ("A dog ran", 5),
                                                        ("A dog ran", 6)]
    assert all(o["new_tokens"] <= 4 for o in objs)
    # sample i of a batch is reproduced alone by --seed 5 + i
    code, out, _ = run_cli("generate", "A dog ran", "--seed", "6", "--max-tokens", "4", "--json", "--top-k", "20",
                           "--top-p", "0.9", "--temp", "0.8")
    assert json_lines(out)[0]["text"] == objs[3]["text"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("From stdin\n"))
    code, out, err = run_cli("generate", "-", "--max-tokens", "3", "--json")
    assert code == 0, err
    assert json_lines(out)[0]["prompt"] == "From stdin"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "-0.5"], "--temp"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--run", "nope"], "tslm train"),
        (["--checkpoint", "missing.safetensors"], "tslm train"),
        (["--stop", "x", "--no-stop"], "--no-stop"),
    ],
)
def test_cli_errors_are_one_line_exit_2(run_cli, runs_root, args, message):
    code, _, err = run_cli("generate", "hi", *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_no_runs_and_tokenizer_mismatch(run_cli, runs_root):
    root, model = runs_root
    (root / "latest").unlink()
    code, _, err = run_cli("generate", "hi")
    assert code == 2 and "tslm train" in err
    # a tokenizer with ids the model has no rows for
    big = {i: bytes([i]) for i in range(256)} | {256 + i: b"t%d" % i for i in range(40)}
    write_run(root / "bad", model, big)
    code, _, err = run_cli("generate", "hi", "--run", "bad")
    assert code == 2 and "mismatch" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# CLI: --precision and --engine (the fast decode path itself is tested in tests/test_fastpath.py)
# ---------------------------------------------------------------------------------------------


def test_cli_precision_and_engine(run_cli, runs_root):
    base = ("generate", "Hi there", "--temp", "0", "--max-tokens", "12", "--json", "--no-stop")
    texts = {}
    for args in ((), ("--engine", "torch"), ("--engine", "fast"), ("--precision", "int8"), ("--precision", "bf16")):
        code, out, err = run_cli(*base, *args)
        assert code == 0, err
        texts[args] = json_lines(out)[0]["text"]
    assert texts[()] == texts[("--engine", "torch")] == texts[("--engine", "fast")]


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "--precision"),
    (["--engine", "gpu"], "--engine"),
    (["--engine", "torch", "--precision", "int8"], "fast engine only"),
    (["--engine", "fast", "--no-cache"], "KV cache"),
])
def test_cli_precision_and_engine_errors_are_one_line(run_cli, runs_root, args, message):
    code, _, err = run_cli("generate", "hi", "--max-tokens", "2", *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_refuses_bf16_without_native_bf16(run_cli, runs_root, monkeypatch):
    from tinystories_cli.fastpath import build

    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx2", "fma"})
    code, _, err = run_cli("generate", "hi", "--max-tokens", "2", "--precision", "bf16")
    assert code == 2 and "bf16" in err and "avx512_bf16" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_notes_the_torch_fallback_in_one_line(run_cli, runs_root):
    root, _ = runs_root
    model = tiny_model("learned", ctx=32)
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"<|endoftext|>"}
    write_run(root / "gpt", model, vocab)
    code, _, err = run_cli("generate", "hi", "--run", "gpt", "--max-tokens", "3", "--seed", "1")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "torch path" in line]
    assert len(notes) == 1 and "learned positions" in notes[0]
    code, _, err = run_cli("generate", "hi", "--run", "gpt", "--max-tokens", "3", "--precision", "int8")
    assert code == 2 and "Llama-style" in err and len(err.strip().splitlines()) == 1
