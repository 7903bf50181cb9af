"""Fuzzing the loading paths with mutated and truncated checkpoints, YAML configs and CLI arguments (issue 16).

Every case must end in a clear error (a ``ValueError``/``FileNotFoundError`` with a one-line message, or for the CLI
an exit status with one line) or a correct load. Never a traceback (any other exception), a hang (each call runs
under a time limit) or executed code (the corpus holds pickles whose ``__reduce__`` would create a marker file; it
must never appear). Files acmix writes carry checksums, so a load of a changed acmix file that "succeeds" with
other numbers is a failure too; official pickles and version-1 state files have no checksum, and a changed number
inside them is counted (``undetectable``) but cannot be refused.

Seeded and bounded: the default suite tries the ``*_CASES`` counts below; ``@slow`` variants try ``SLOW_FACTOR``
times more (``make test-slow``). Each test prints its tally.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _official_models import save_with_fake_yacs, swin_training_state
from acmix.cli.main import main
from acmix.models import extract_state_dict, load_official_checkpoint, read_checkpoint
from acmix.train import checkpoint as ckpt
from acmix.train.config import TrainConfig
from acmix.train.inference import load_model
from acmix.train.trainer import run_training

FILE_CASES = 24  # mutants per seed file (x 9 seed files)
YAML_CASES = 120
ARGV_CASES = 120
SLOW_FACTOR = 25
TIME_LIMIT_S = 60.0  # per call; generous for a loaded 2-core machine (a hang is forever)

CLEAN = (ValueError, FileNotFoundError)  # ckpt.CheckpointError is a ValueError


# ------------------------------------------------------------------------------------------ harness


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer") or signal.getsignal(signal.SIGALRM) is None:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclasses.dataclass
class Tally:
    """Outcomes of one fuzz run; ``failures`` are (case, call, what went wrong)."""

    cases: int = 0
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def call(self, case: str, name: str, fn: Callable[[], Any], check: Callable[[Any], str] | None = None) -> Any:
        """Run ``fn``; a clean error or a result ``check`` accepts ("" or a label) is fine, anything else fails."""
        try:
            with time_limit(TIME_LIMIT_S):
                result = fn()
        except CLEAN as exc:
            msg = str(exc)
            if "\n" in msg.strip() or not msg.strip():
                self.failures.append((case, name, f"error not one line: {type(exc).__name__}: {msg[:300]!r}"))
            else:
                self.outcomes[f"{name}: clean error"] += 1
            return None
        except Hang as exc:
            self.failures.append((case, name, f"hang: {exc}"))
            return None
        except Exception as exc:  # would be a traceback for a user
            self.failures.append((case, name, f"{type(exc).__name__}: {str(exc)[:300]}"))
            return None
        label = check(result) if check is not None else "loaded"
        if label.startswith("FAIL"):
            self.failures.append((case, name, label))
        else:
            self.outcomes[f"{name}: {label or 'loaded'}"] += 1
        return result

    def report(self, title: str) -> str:
        lines = [f"{title}: {self.cases} cases"] + [f"  {k}: {v}" for k, v in sorted(self.outcomes.items())]
        return "\n".join(lines)

    def assert_clean(self, title: str) -> None:
        print(self.report(title))
        shown = "\n".join(f"{c} | {n} | {w}" for c, n, w in self.failures[:15])
        assert not self.failures, f"{len(self.failures)} bad outcomes of {self.cases} cases:\n{shown}"


# ------------------------------------------------------------------------------------------ mutations


def _truncate(rng: random.Random, data: bytes) -> bytes:
    n = len(data)
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(n), n - 1, n - rng.randrange(1, 64)])
    return data[: max(0, min(n - 1, cut))]


def _flip_bits(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _overwrite(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    i = rng.randrange(len(b))
    span = rng.choice([1, 4, 16, 256])
    b[i : i + span] = rng.randbytes(min(span, len(b) - i))
    return bytes(b)


def _insert(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.choice([1, 8, 100])) + data[i:]


def _delete(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.choice([1, 8, 1000]) :]


BYTE_MUTATORS = [_truncate, _flip_bits, _overwrite, _insert, _delete]


def _mutate_zip_member(rng: random.Random, data: bytes) -> bytes:
    """Change one member of a torch zip (usually the pickle) and rebuild the archive with valid CRCs, so the
    mutation reaches the unpickler instead of the zip reader."""
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    target = pkl[0] if pkl and rng.random() < 0.7 else rng.choice(names)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in names:
            content = src.read(name)
            if name == target and content:
                content = rng.choice(BYTE_MUTATORS)(rng, content)
            dst.writestr(name, content)
    return out.getvalue()


def _mutate_safetensors_header(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the JSON header (dtype, shape, offsets, entries, metadata) with a correct length prefix."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    what = rng.randrange(7)
    if what == 0:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9", ""])
    elif what == 1:
        entry["shape"] = [rng.choice([0, 1, 3, -1, 2**40]) for _ in range(rng.randrange(4))]
    elif what == 2:
        lo = rng.choice([0, entry["data_offsets"][0], 2**62])
        entry["data_offsets"] = [lo, lo + rng.choice([0, 4, 2**20, -4])]
    elif what == 3:
        del header[key]
    elif what == 4:
        header[key + "_copy"] = dict(entry)
    elif what == 5:
        header.setdefault("__metadata__", {})["acmix_sha256"] = "0" * 64
    else:
        header[key] = rng.choice([None, 5, "x", [], {"dtype": "F32"}])
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + data[8 + n :]


_GLOBALS = [b"os\nsystem", b"posix\nsystem", b"builtins\neval", b"builtins\nexec", b"subprocess\ncall"]


def _mutate_pickle_opcodes(rng: random.Random, data: bytes) -> bytes:
    """Inject a GLOBAL + REDUCE of a dangerous callable into a pickle stream, or change one opcode."""
    b = bytearray(data)
    if rng.random() < 0.5:
        i = rng.randrange(2, max(3, len(b) - 1))
        inject = b"c" + rng.choice(_GLOBALS) + b"\n(Vtouch /nonexistent/acmix-fuzz\ntR"
        b[i:i] = inject
    else:
        b[rng.randrange(len(b))] = rng.choice(b"cRbio}]()tqhjgGpPsueEa.NKJMXBUVT")
    return bytes(b)


def mutate(rng: random.Random, data: bytes, kind: str) -> tuple[str, bytes]:
    structured = []
    if data[:2] == b"PK":
        structured.append(_mutate_zip_member)
    if kind == "weights":
        structured.append(_mutate_safetensors_header)
    if kind in ("legacy", "evil_pickle"):
        structured.append(_mutate_pickle_opcodes)
    fn = rng.choice(structured) if structured and rng.random() < 0.5 else rng.choice(BYTE_MUTATORS)
    return fn.__name__.strip("_"), fn(rng, data)


# ------------------------------------------------------------------------------------------ corpus


class Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path, how: int = 0) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        cmd = f"touch {self.marker}"
        return [
            (os.system, (cmd,)),
            (eval, (f"__import__('os').system({cmd!r})",)),
            (subprocess.call, (["touch", str(self.marker)],)),
        ][self.how % 3]


@dataclasses.dataclass
class Seed:
    kind: str  # weights, state, state_v1, official, legacy, evil_pickle, evil_zip
    name: str  # file name (suffix chooses the loading path)
    data: bytes
    expect: Any  # what a correct load gives (tensors / dict), or None: nothing may load


def _tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and (a.dtype == b.dtype and bool(torch.equal(a, b)))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b) if not isinstance(a, np.ndarray) else bool(np.array_equal(a, b))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Seed], Path]:
    """A real run folder (one update of acmix_micro) and the seed files: its weights and state (v2), a version-1
    state, official-style training states (yacs CfgNode, argparse.Namespace + numpy scalars, legacy non-zip
    format with ``module.`` prefixes) and pickles carrying code."""
    root = tmp_path_factory.mktemp("fuzz")
    marker = root / "EXECUTED"
    run = root / "run"
    run_training(TrainConfig(output=str(run), max_steps=1, progress=False, plots=False, threads=1))
    st = ckpt.load_state(run / "last.state.pt")
    tag = str(st["weights"]).split(".")[0]
    weights = ckpt.read_weights(run / "checkpoints" / f"{tag}.safetensors")
    seeds = [
        Seed("weights", f"{tag}.safetensors", (run / "checkpoints" / f"{tag}.safetensors").read_bytes(), weights),
        Seed("state", f"{tag}.state.pt", (run / "checkpoints" / f"{tag}.state.pt").read_bytes(), st),
    ]
    buf = io.BytesIO()
    torch.save(st, buf)  # version 1: the state dict itself, no checksum
    seeds.append(Seed("state_v1", f"{tag}.state.pt", buf.getvalue(), st))
    official = {"model": dict(weights), "args": argparse.Namespace(lr=5e-4, model="acmix_micro"), "epoch": 3}
    official["max_accuracy"] = np.float64(81.5)
    buf = io.BytesIO()
    torch.save(official, buf)
    seeds.append(Seed("official", "official.pth", buf.getvalue(), official))
    swin = root / "swin.pth"
    save_with_fake_yacs(lambda cfg: swin_training_state(dict(weights), cfg, {"DATA": cfg({"IMG": 8})}), swin)
    seeds.append(Seed("official", "swin.pth", swin.read_bytes(), read_checkpoint(swin)))
    legacy = {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 100}
    buf = io.BytesIO()
    torch.save(legacy, buf, _use_new_zipfile_serialization=False)
    seeds.append(Seed("legacy", "legacy.pth", buf.getvalue(), legacy))
    for how in range(2):
        seeds.append(Seed("evil_pickle", f"evil{how}.pth", pickle.dumps({"model": Evil(marker, how)}, 2), None))
    buf = io.BytesIO()
    torch.save({"model": dict(weights), "extra": Evil(marker, 2)}, buf)
    seeds.append(Seed("evil_zip", "evil_zip.pth", buf.getvalue(), None))
    return run, seeds, marker


# ------------------------------------------------------------------------------------------ file fuzzing


def _expect_check(seed: Seed, changed: bool) -> Callable[[Any], str]:
    """A load must give the seed's content; another content is a failure for formats with checksums."""

    def check(obj: Any) -> str:
        if seed.expect is None:  # the mutation damaged the code away (the marker check proves nothing ran)
            return "loaded, code-carrying part gone"
        if seed.kind.startswith("state"):  # read as a foreign file: the outer object, checked by load_state
            return "loaded (a state file, not weights)"
        if _tensors_equal(obj, seed.expect):
            return "loaded, same content"
        if seed.kind in ("weights", "state"):
            return "FAIL: a changed acmix file loaded with other content"
        return "loaded, changed content (no checksum in this format: undetectable)" if changed else "loaded"

    return check


def _state_check(seed: Seed) -> Callable[[Any], str]:
    def check(obj: Any) -> str:
        if seed.kind == "state" and not _tensors_equal(obj, seed.expect):
            return "FAIL: a changed acmix state file loaded with other content"
        return "loaded"

    return check


def _model_check(seed: Seed) -> Callable[[Any], str]:
    """load_model: weights must be the seed's (acmix formats) when it loads."""

    def check(loaded: Any) -> str:
        sd = loaded.model.state_dict()
        if seed.kind == "weights" and not all(torch.equal(sd[k], v) for k, v in seed.expect.items()):
            return "FAIL: load_model gave other weights from a changed acmix file"
        return "loaded"

    return check


def _feed(tally: Tally, case: str, seed: Seed, path: Path, run: Path, micro: torch.nn.Module) -> None:
    """Every loading path that takes such a file."""
    tally.call(case, "read_weights", lambda: ckpt.read_weights(path), _expect_check(seed, True))
    tally.call(case, "load_state", lambda: ckpt.load_state(path), _state_check(seed))
    obj = tally.call(case, "read_checkpoint", lambda: read_checkpoint(path), _expect_check(seed, True))
    if obj is not None:
        sd = tally.call(case, "extract_state_dict", lambda: extract_state_dict(obj, str(path)))
        if sd is not None:
            tally.call(case, "load_official_checkpoint", lambda: load_official_checkpoint(micro, obj, strict=False))
    if seed.kind in ("weights", "state", "state_v1"):  # inside a copy of the run folder: the run-folder paths
        tally.call(case, "load_model(run)", lambda: load_model(run), _model_check(seed))
        tally.call(case, "load_model(file)", lambda: load_model(path), _model_check(seed))
    else:
        tally.call(case, "load_model(--model)", lambda: load_model(path, model_name="acmix_micro"))


def _cli_feed(tally: Tally, case: str, seed: Seed, path: Path, run: Path, tmp: Path) -> None:
    """The commands a user would point at such a file (a subset of cases: they are slower)."""
    argvs = {
        "weights": [["inspect", str(path), "--json", "--no-plot"], ["eval", str(run), "--json", "--batch-size", "512"]],
        "state": [["train", "--resume", str(run), "--max-steps", "1", "--no-progress", "--no-plots"]],
        "state_v1": [["inspect", str(run), "--json", "--no-plot"]],
    }.get(seed.kind, [["convert", str(path), str(tmp / "out.safetensors"), "--model", "acmix_micro"]])
    for argv in argvs:
        _run_cli(tally, case, argv)


def _fuzz_files(tmp_path: Path, corpus, per_seed: int, seed: int, cli_every: int) -> Tally:
    import timm

    run0, seeds, marker = corpus
    micro = timm.create_model("acmix_micro")
    rng = random.Random(seed)
    tally = Tally()
    for s in seeds:
        for j in range(per_seed):
            how, data = mutate(rng, s.data, s.kind)
            case = f"{s.name}#{j}:{how}"
            work = tmp_path / f"c{tally.cases}"
            run = work / "run"
            shutil.copytree(run0, run, ignore=shutil.ignore_patterns(".lock"))
            if s.kind in ("weights", "state", "state_v1"):
                path = run / "checkpoints" / s.name
                path.write_bytes(data)
                pointer = "last.safetensors" if s.kind == "weights" else "last.state.pt"
                (run / pointer).unlink()
                (run / pointer).write_bytes(data)  # the pointer too (a copy: no shared inode)
            else:
                path = work / s.name
                path.write_bytes(data)
            _feed(tally, case, s, path, run, micro)
            if j % cli_every == 0:
                _cli_feed(tally, case, s, path, run, work)
            assert not marker.exists(), f"code from a checkpoint ran ({case})"
            tally.cases += 1
            shutil.rmtree(work, ignore_errors=True)
    assert not marker.exists()
    return tally


def test_unmutated_seeds_load_and_code_is_refused(corpus, tmp_path):
    """The oracle's baseline: each seed file loads to its expected content, and the code-carrying ones are refused."""
    run, seeds, marker = corpus
    for s in seeds:
        path = tmp_path / s.name
        path.write_bytes(s.data)
        if s.expect is None:
            with pytest.raises(ValueError, match="refusing to read"):
                read_checkpoint(path)
        elif s.kind == "weights":
            assert _tensors_equal(ckpt.read_weights(path), s.expect)
        elif s.kind.startswith("state"):
            assert _tensors_equal(ckpt.load_state(path), s.expect)
        else:
            assert _tensors_equal(read_checkpoint(path), s.expect)
    assert not marker.exists()


def test_fuzz_checkpoint_files(corpus, tmp_path):
    tally = _fuzz_files(tmp_path, corpus, FILE_CASES, seed=16, cli_every=6)
    assert tally.cases == FILE_CASES * len(corpus[1])
    tally.assert_clean("checkpoint files")


@pytest.mark.slow
def test_fuzz_checkpoint_files_slow(corpus, tmp_path):
    tally = _fuzz_files(tmp_path, corpus, FILE_CASES * SLOW_FACTOR, seed=1600, cli_every=10)
    tally.assert_clean("checkpoint files (slow)")


# ------------------------------------------------------------------------------------------ YAML configs

_YAML_SEEDS = [
    "epochs: 2\nbatch-size: 16\nlr: 0.001\nopt: adamw\nsched: cosine\n",
    "recipe: swin\nmodel: acmix_micro\nweight_decay: 0.05\nmixup: 0.8\ncutmix: 1.0\nbatch-size: 8\n",
    "model-kwargs:\n  embed_dims: [16, 32]\n  norm_layer: groupnorm\ndrop-path: 0.1\nmodel-ema: true\n",
    "amp: false\nchannels-last: true\nclip-grad: 5.0\nclip-mode: norm\nworkers: 0\nnan-policy: skip\n",
]
_YAML_VALUES = [
    "0", "-1", "1e400", "-.inf", ".nan", "99999999999999999999999", "1.5", "true", "null", "~", "''", "abc",
    "[1, 2]", "{a: 1}", "!!binary aGVsbG8=", "!!python/object/apply:os.system ['touch /nonexistent/x']",
    "&a [*a]", "!!set {a, b}", "2001-12-14", "0x1f", "'\\u0000'", "[[[[[[[[[[]]]]]]]]]]", "*undefined",
]  # fmt: skip


def _mutate_yaml(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    what = rng.randrange(6)
    if what == 0 and lines:  # a value of another type
        i = rng.randrange(len(lines))
        key = lines[i].split(":")[0]
        lines[i] = f"{key}: {rng.choice(_YAML_VALUES)}"
    elif what == 1:  # an unknown or misspelt key
        lines.append(f"{rng.choice(['epoch', 'lr_rate', 'bach-size', 'x' * 300, '-', '?', '123'])}: 1")
    elif what == 2:
        return rng.choice(BYTE_MUTATORS)(rng, text.encode()).decode("latin-1")
    elif what == 3:  # not a mapping at all
        return rng.choice(["- 1\n- 2\n", "just a string", "", "---\n...\n", "[" * 5000, "a: b: c", "\x00\x01"])
    elif what == 4:  # deep nesting or aliases
        return f"model-kwargs: {'{a: ' * rng.choice([10, 200, 3000])}1{'}' * 0}\n"
    else:  # a tag that would construct an object
        lines.append(f"extra: !!python/object/apply:subprocess.call [['touch', '/nonexistent/{rng.random()}']]")
    return "\n".join(lines) + "\n"


class _Reached(Exception):
    """Raised instead of training: the configuration passed every check and the model and data were built."""


def _stop_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from acmix.train import trainer

    def build_only(cfg, info, device):
        trainer._build_model_and_data(cfg)
        raise _Reached

    monkeypatch.setattr(trainer, "_run", build_only)


def _cli_check(err: io.StringIO, command: str) -> Callable[[int], str]:
    def check(code: int) -> str:
        text = err.getvalue()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if "Traceback" in text or code not in (0, 1, 2):
            return f"FAIL: exit {code}: {text[-300:]}"
        if code and sum(ln.startswith(("acmix ", "acmix:")) for ln in lines) != 1:
            return f"FAIL: not one error line: {lines[-3:]}"
        return "exit 0" if code == 0 else f"exit {code}, one line"

    return check


def _run_cli(tally: Tally, case: str, argv: list[str]) -> None:
    err = io.StringIO()

    def run() -> Any:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                return main(argv)
            except _Reached:
                return "reached"

    def check(code: Any) -> str:
        if code == "reached":
            return "valid: would train"
        return _cli_check(err, argv[0] if argv else "")(code)

    tally.call(case, f"acmix {argv[0] if argv else ''}", run, check)


def _fuzz_yaml(tmp_path: Path, n: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> Tally:
    _stop_before_training(monkeypatch)
    # relative paths among the random values (``inspect --plot embed_dims=[0]``) land in the test's folder
    monkeypatch.chdir(tmp_path)
    rng = random.Random(seed)
    tally = Tally()
    for i in range(n):
        text = _mutate_yaml(rng, rng.choice(_YAML_SEEDS))
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        _run_cli(tally, f"yaml#{i}: {text[:80]!r}", ["train", "--config", str(path), "--no-progress"])
        tally.cases += 1
    return tally


def test_fuzz_yaml_configs(tmp_path, monkeypatch):
    tally = _fuzz_yaml(tmp_path, YAML_CASES, seed=17, monkeypatch=monkeypatch)
    assert tally.cases == YAML_CASES
    tally.assert_clean("YAML configs")


@pytest.mark.slow
def test_fuzz_yaml_configs_slow(tmp_path, monkeypatch):
    _fuzz_yaml(tmp_path, YAML_CASES * SLOW_FACTOR, seed=1700, monkeypatch=monkeypatch).assert_clean("YAML (slow)")


# ------------------------------------------------------------------------------------------ CLI arguments


def _values(rng: random.Random, tmp: Path, run: Path) -> str:
    return rng.choice(
        [
            "0", "-1", "1", "3", "8", "1e9", "0.5", "-0.5", "nan", "inf", "abc", "", " ", "--", "-", "true",
            "acmix_micro", "acmix_mirco", "resnet10t", "adamw", "sgd", "cosine", "cuda:7", "cpu", "auto",
            "x=1", "embed_dims=[8,16]", "embed_dims=[0]", "num_heads=0", "norm_layer=nope", "=", "a=b=c",
            str(run), str(run / "last.state.pt"), str(run / "last.safetensors"), str(tmp / "missing"),
            str(tmp), "/dev/null", "\u00e9\u4e2d", "x" * 500,
        ]
    )  # fmt: skip


_FLAGS = {
    "train": [
        "--model", "--epochs", "--batch-size", "--lr", "--opt", "--sched", "--max-steps", "--workers", "--device",
        "--model-kwargs", "--resume", "--initial-checkpoint", "--mixup", "--cutmix", "--smoothing", "--input-size",
        "--grad-accum-steps", "--clip-grad", "--clip-mode", "--amp-dtype", "--nan-policy", "--recipe", "--config",
        "--seed", "--warmup-epochs", "--drop-path", "--num-classes", "--data-dir", "--bach-size", "--overwrite",
    ],
    "eval": ["--model", "--num-classes", "--batch-size", "--workers", "--input-size", "--split", "--data-dir"],
    "predict": ["--checkpoint", "--model", "--topk", "--device"],
    "inspect": ["--model", "--plot"],
    "convert": ["--model"],
}  # fmt: skip
_SWITCHES = {
    "train": ["--amp", "--no-amp", "--channels-last", "--model-ema", "--pretrained", "--overwrite", "--sync-bn"],
    "eval": ["--ema", "--amp", "--no-strict", "--json", "--skip-bad-images"],
    "predict": ["--ema", "--json"],
    "inspect": ["--ema", "--json", "--no-plot"],
    "convert": [],
}


def _random_argv(rng: random.Random, tmp: Path, run: Path) -> list[str]:
    cmd = rng.choice(list(_FLAGS))
    argv = [cmd]
    if cmd in ("eval", "inspect"):
        argv.append(rng.choice([str(run), str(run / "last.safetensors"), str(tmp / "missing"), "/dev/null"]))
    if cmd == "convert":
        argv += [
            rng.choice([str(run / "last.safetensors"), "/dev/null"]),
            str(tmp / rng.choice(["o.safetensors", "o"])),
        ]
    if cmd == "predict":
        argv.append(rng.choice([str(tmp / "img.png"), "/dev/null", str(tmp / "missing.png")]))
    for _ in range(rng.randrange(5)):
        r = rng.random()
        if r < 0.6:
            argv += [rng.choice(_FLAGS[cmd]), _values(rng, tmp, run)]
        elif r < 0.8 and _SWITCHES[cmd]:
            argv.append(rng.choice(_SWITCHES[cmd]))
        else:
            argv.append(rng.choice(["--no-such-flag", "-x", "extra", "--model=", "--lr=1=2", "-"]))
    if cmd == "train":
        argv += ["--no-progress", "--no-plots", "--output", str(tmp / "out")]
    if cmd == "eval" and "--input-size" in argv:  # a huge input size is a legitimate (memory-bound) request
        i = argv.index("--input-size")
        if i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit() and abs(int(argv[i + 1])) > 64:
            argv[i + 1] = "32"
    return argv


def _fuzz_argv(tmp_path: Path, corpus, n: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> Tally:
    from PIL import Image

    run, _, marker = corpus
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "img.png")
    _stop_before_training(monkeypatch)
    # relative paths among the random values (``inspect --plot embed_dims=[0]``) land in the test's folder
    monkeypatch.chdir(tmp_path)
    rng = random.Random(seed)
    tally = Tally()
    for i in range(n):
        argv = _random_argv(rng, tmp_path, run)
        _run_cli(tally, f"argv#{i}: {' '.join(argv)[:160]}", argv)
        tally.cases += 1
    assert not marker.exists()
    return tally


def test_fuzz_cli_arguments(tmp_path, corpus, monkeypatch):
    tally = _fuzz_argv(tmp_path, corpus, ARGV_CASES, seed=18, monkeypatch=monkeypatch)
    assert tally.cases == ARGV_CASES
    tally.assert_clean("CLI arguments")


@pytest.mark.slow
def test_fuzz_cli_arguments_slow(tmp_path, corpus, monkeypatch):
    tally = _fuzz_argv(tmp_path, corpus, ARGV_CASES * SLOW_FACTOR, seed=1800, monkeypatch=monkeypatch)
    tally.assert_clean("CLI arguments (slow)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
