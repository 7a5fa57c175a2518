"""Issue 31: every malformed file is one line and exit 2, never an internal error.

Seeded fuzzing, one test per file format tslm reads from outside: mutations of a valid file (truncation,
byte flips, JSON values of the wrong type, hostile numbers) must end in exit 0 (the file still makes
sense) or exit 2 with one line, never "internal error" or a traceback. Each test runs in a few seconds.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tinystories_cli import export, paths
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM
from tinystories_cli.tokenizer import Tokenizer
from tinystories_cli.tokens import check_tokens, open_tokens

from train_fixtures import bpe_tokenizer

EOT = "<|endoftext|>"
TEXT = ("Once upon a time there was a little cat. The cat liked to play with a red ball in the sun.\n"
        "One day the cat saw a big dog. \"Hello!\" said the dog. They became friends." + EOT) * 4
# Values of every JSON type, and numbers a reader must bound before it allocates.
SWAPS = [None, True, False, 0, -1, 1.5, -7.25, 2**31, 2**40, 2**70, 1e308, "", "x", "12", [], [1, 2], {}, {"a": 1},
         float("nan"), float("inf")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"), TEXT, 300, (EOT,))


def _hf_dir(root: Path, tok: Tokenizer, arch: str) -> Path:
    over = {"norm": "layernorm", "ffn": "gelu_tanh", "pos_emb": "learned", "bias": True, "tie_embeddings": True} \
        if arch == "gpt2" else {}
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64,
                      **over)
    torch.manual_seed(0)
    return export.export_hf(TransformerLM(cfg), tok, cfg, root / f"hf-{arch}")


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory, tok) -> Path:
    return _hf_dir(tmp_path_factory.mktemp("llama"), tok, "llama")


@pytest.fixture(scope="module")
def gpt2_src(tmp_path_factory, tok) -> Path:
    return _hf_dir(tmp_path_factory.mktemp("gpt2"), tok, "gpt2")


class Importer:
    """`tslm import` on mutated copies of a valid directory; counts the outcomes."""

    def __init__(self, src: Path, work: Path, run_cli):
        self.src, self.work, self.run_cli = src, work, run_cli
        self.outcomes = {0: 0, 2: 0}
        self.n = 0

    def check(self, name: str, data: bytes, label: str) -> None:
        self.n += 1
        case = self.work / f"case{self.n}"
        shutil.copytree(self.src, case)
        (case / name).write_bytes(data)
        code, out, err = self.run_cli("import", str(case), "--run-name", f"r{self.n}")
        assert code in (0, 2), f"{label}: exit {code}: {err}"
        assert "internal error" not in err and "Traceback" not in err, f"{label}: {err}"
        if code == 2:
            assert len(err.strip().splitlines()) == 1, f"{label}: {err}"
        self.outcomes[code] += 1
        shutil.rmtree(case)
        shutil.rmtree(self.work / "runs" / f"r{self.n}", ignore_errors=True)


@pytest.fixture
def importer(tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(paths, "RUNS_ROOT", tmp_path / "runs")
    torch.set_num_threads(1)
    return lambda src: Importer(src, tmp_path, run_cli)


def _json_mutations(obj, rng: random.Random, n: int):
    """(label, mutated object) pairs: one value somewhere in `obj` replaced by a value of another type."""
    spots = []

    def walk(o, path):
        if isinstance(o, dict):
            for k, v in o.items():
                spots.append(path + (k,))
                if len(spots) < 5000:
                    walk(v, path + (k,))
        elif isinstance(o, list):
            for i, v in enumerate(o[:3]):
                spots.append(path + (i,))
                walk(v, path + (i,))

    walk(obj, ())
    for _ in range(n):
        where = rng.choice(spots)
        value = rng.choice(SWAPS)
        new = json.loads(json.dumps(obj))
        o = new
        for k in where[:-1]:
            o = o[k]
        o[where[-1]] = value
        yield f"{'/'.join(map(str, where))} = {value!r}", new


def _byte_mutations(data: bytes, rng: random.Random, n: int, focus: int | None = None):
    for i in range(n):
        if i % 3 == 0:
            cut = rng.randrange(0, len(data))
            yield f"truncated at {cut}", data[:cut]
        else:
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(0, focus or len(b))
                b[pos] = rng.randrange(256)
            yield "byte flips", bytes(b)


def test_fuzz_safetensors_import(llama_src, importer):
    imp = importer(llama_src)
    data = (llama_src / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]
    rng = random.Random(31)

    def pack(h: dict, tail: bytes = body) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + tail

    name = next(k for k in header if k != "__metadata__")
    fixed = [
        ("empty", b""),
        ("garbage", bytes(rng.randrange(256) for _ in range(300))),
        ("header past the end", struct.pack("<Q", 1 << 40) + data[8:]),
        ("header length past the file", struct.pack("<Q", len(data)) + data[8:]),
        ("bad JSON", struct.pack("<Q", 5) + b"{oops" + body),
        ("header not an object", pack([1, 2])),  # type: ignore[arg-type]
        ("truncated body", data[:-7]),
        ("offsets past the end", pack({**header, name: {**header[name], "data_offsets": [0, len(body) + 4096]}})),
        (
            "overlapping offsets",
            pack({**header, name: {**header[name], "data_offsets": [0, header[name]["data_offsets"][1]]}}),
        ),
        ("reversed offsets", pack({**header, name: {**header[name], "data_offsets": [8, 0]}})),
        ("1 TB shape", pack({**header, name: {**header[name], "shape": [1 << 20, 1 << 20]}})),
        ("negative shape", pack({**header, name: {**header[name], "shape": [-4, 8]}})),
        ("dtype/size mismatch", pack({**header, name: {**header[name], "dtype": "F64"}})),
        ("unknown dtype", pack({**header, name: {**header[name], "dtype": "Q7"}})),
        ("missing tensor", pack({k: v for k, v in header.items() if k != name})),
    ]
    for label, blob in fixed:
        imp.check("model.safetensors", blob, label)
    for label, h in _json_mutations(header, rng, 40):
        imp.check("model.safetensors", pack(h), f"header {label}")
    for label, blob in _byte_mutations(data, rng, 24, focus=8 + hlen):
        imp.check("model.safetensors", blob, label)
    assert imp.outcomes[2] >= len(fixed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fuzz_hf_config(arch, llama_src, gpt2_src, importer):
    src = llama_src if arch == "llama" else gpt2_src
    imp = importer(src)
    conf = json.loads((src / "config.json").read_text())
    rng = random.Random(32)
    for key in sorted(conf):  # every field, with a value of the wrong type
        for value in rng.sample(SWAPS, 3):
            imp.check("config.json", json.dumps({**conf, key: value}).encode(), f"{key} = {value!r}")
    for label, blob in _byte_mutations((src / "config.json").read_bytes(), rng, 12):
        imp.check("config.json", blob, label)
    imp.check(
        "config.json",
        json.dumps(
            {
                **conf,
                "num_hidden_layers" if arch == "llama" else "n_layer": 64,
                "max_position_embeddings" if arch == "llama" else "n_positions": 1 << 20,
            }
        ).encode(),
        "huge model",
    )


def test_fuzz_tokenizer_json(llama_src, importer):
    imp = importer(llama_src)
    raw = (llama_src / "tokenizer.json").read_bytes()
    tj = json.loads(raw)
    rng = random.Random(33)
    small = {k: v for k, v in tj.items()}
    for label, obj in _json_mutations(small, rng, 50):
        imp.check("tokenizer.json", json.dumps(obj).encode(), label)
    for tid in (2**24, 2**31, 2**40, 10**30):
        big = json.loads(raw)
        big["added_tokens"].append({**big["added_tokens"][0], "id": tid, "content": "<|big|>"})
        imp.check("tokenizer.json", json.dumps(big).encode(), f"added token id {tid}")
    for label, blob in _byte_mutations(raw, rng, 12):
        imp.check("tokenizer.json", blob, label)


def test_fuzz_token_sidecar(tmp_path, tok):
    """Token files are read by train/eval (`open_tokens` + `check_tokens`): a bad sidecar is a ValueError
    (the CLI's one line, exit 2), never another exception."""
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    npy = tmp_path / "t.npy"
    np.save(npy, ids)
    meta = {"format_version": 1, "dtype": "uint16", "num_tokens": len(ids), "max_id": int(ids.max()),
            "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint, "source_bytes": len(TEXT)}
    side = tmp_path / "t.json"
    rng = random.Random(34)
    cases = [(f"{k} = {v!r}", json.dumps({**meta, k: v})) for k in meta for v in rng.sample(SWAPS, 4)]
    cases += [(label, blob.decode("latin-1")) for label, blob in _byte_mutations(json.dumps(meta).encode(), rng, 15)]
    cases += [("not an object", "[1]"), ("empty", ""), ("deep", "[" * 100000)]
    codes = {0: 0, 2: 0}
    for label, text in cases:
        side.write_text(text, encoding="latin-1")
        try:
            open_tokens(npy, "train", "tiny", "train")
            check_tokens(npy, tok.fingerprint, tok.vocab_size)
            codes[0] += 1
        except ValueError:
            codes[2] += 1
        except Exception as e:  # noqa: BLE001 - exactly what the test is for
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
    assert codes[2] > len(cases) // 2


def _every_spot(obj, path=()):
    """Every key path of a JSON object (lists: their first two items; a BPE vocab/merges: the key only)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,)
            if k not in ("vocab", "merges"):
                yield from _every_spot(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            yield path + (i,)
            yield from _every_spot(v, path + (i,))


def _swapped(obj, where, value):
    new = json.loads(json.dumps(obj))
    o = new
    for k in where[:-1]:
        o = o[k]
    o[where[-1]] = value
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_config_field_of_every_type(arch, llama_src, gpt2_src):
    """The config reader (what import and --init-from call first) on every field x every JSON type: a
    ValueError (exit 2) or a config, never another exception."""
    from tinystories_cli.interop.hf import model_config_from_hf

    conf = json.loads(((llama_src if arch == "llama" else gpt2_src) / "config.json").read_text())
    for where in _every_spot(conf):
        for value in SWAPS:
            try:
                model_config_from_hf(_swapped(conf, where, value))
            except ValueError:
                pass
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{'/'.join(map(str, where))} = {value!r}: {type(e).__name__}: {e}")


def test_every_tokenizer_json_field_of_every_type(tmp_path, llama_src):
    from tinystories_cli.interop.hf import read_hf_tokenizer

    tj = json.loads((llama_src / "tokenizer.json").read_text())
    for where in _every_spot(tj):
        for value in SWAPS:
            (tmp_path / "tokenizer.json").write_text(json.dumps(_swapped(tj, where, value)))
            try:
                read_hf_tokenizer(tmp_path)
            except ValueError:
                pass
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{'/'.join(map(str, where))} = {value!r}: {type(e).__name__}: {e}")
