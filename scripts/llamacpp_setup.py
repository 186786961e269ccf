#!/usr/bin/env python3
"""Build llama.cpp's ``llama-server`` and generate a tiny local model for the integration tests.

No machine here reaches a model hub, so the model is written locally with ``gguf``: a llama-architecture
network with random weights and a byte-level BPE vocabulary, its output layer biased toward printable
ASCII and away from the end token so that it produces full-length, valid UTF-8 text.

The server comes from the llama.cpp tree vendored in the ``llama-cpp-python`` source distribution
(downloaded with pip). Every step is skipped when its output exists and its version stamp matches.

    python scripts/llamacpp_setup.py              # build what is missing, print the paths
    python scripts/llamacpp_setup.py --model-only # only (re)generate the model
    python scripts/llamacpp_setup.py --check      # exit 1 unless both are there and current

Prints ``LLAMA_SERVER=<path>`` and ``LLAMA_MODEL=<path>``. Exits non-zero with one line on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Bump when the model recipe below changes, so that old models are regenerated.
MODEL_VERSION = "2"
MODEL_NAME = "tiny-llama.gguf"
BIAS = 3.0  # output-layer bias toward printable ASCII (see write_model)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = ROOT / "third_party" / "llamacpp"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=ON",
]


class SetupError(Exception):
    """A step failed; the message is the one line printed."""


def log(msg: str) -> None:
    print(f"llamacpp_setup: {msg}", file=sys.stderr, flush=True)


def _stamp_ok(stamp: Path, expected: dict[str, str]) -> bool:
    try:
        return bool(json.loads(stamp.read_text()) == expected)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, value: dict[str, str]) -> None:
    stamp.write_text(json.dumps(value, sort_keys=True) + "\n")


def server_paths(work: Path) -> tuple[Path, Path]:
    binary = work / "build" / "bin" / "llama-server"
    return binary, work / "build" / ".scer-stamp.json"


def model_paths(work: Path) -> tuple[Path, Path]:
    model = work / MODEL_NAME
    return model, work / (MODEL_NAME + ".stamp.json")


def _cpu_id() -> str:
    """The machine and its CPU features: a GGML_NATIVE build from another CPU may not run here."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def server_stamp() -> dict[str, str]:
    return {"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "cmake": " ".join(CMAKE_FLAGS), "cpu": _cpu_id()}


def model_stamp() -> dict[str, str]:
    return {"model": MODEL_VERSION}


def _run(cmd: list[str], what: str, log_file: Path) -> None:
    log(f"{what}: {' '.join(cmd)} (log: {log_file})")
    with log_file.open("ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise SetupError(f"{what} failed (exit {proc.returncode}); see {log_file}: {tail[0][:200]}")


def fetch_source(work: Path) -> Path:
    """Download and extract the sdist; returns the llama.cpp source tree."""
    src_root = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    tree = src_root / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file() and (tree / "tools" / "server").is_dir():
        return tree
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        if shutil.which("cmake") is None:  # fail before the download when the build cannot run anyway
            raise SetupError("cmake not found on PATH (needed to build llama-server)")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                str(work),
            ],
            "download llama-cpp-python sdist",
            work / "setup.log",
        )
        if not sdist.is_file():
            raise SetupError(f"pip download did not produce {sdist.name}")
    log(f"extracting {sdist.name}")
    # Into a scratch folder first, so that an interrupted extraction is never taken for a complete one.
    scratch = work / "extract.tmp"
    for stale in (scratch, src_root):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths out of the folder
                tar.extractall(scratch, filter="data")
            else:
                tar.extractall(scratch)  # a pinned sdist from the package registry
    except (OSError, tarfile.TarError) as exc:
        raise SetupError(f"cannot extract {sdist.name}: {exc}") from None
    os.replace(scratch / src_root.name, src_root)
    shutil.rmtree(scratch)
    if not (tree / "CMakeLists.txt").is_file():
        raise SetupError(f"{sdist.name} has no vendor/llama.cpp tree")
    return tree


def build_server(work: Path, jobs: int) -> Path:
    binary, stamp = server_paths(work)
    if binary.is_file() and _stamp_ok(stamp, server_stamp()):
        log(f"llama-server already built: {binary}")
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} not found on PATH (needed to build llama-server)")
    tree = fetch_source(work)
    build = work / "build"
    build.mkdir(parents=True, exist_ok=True)
    log_file = work / "build.log"
    started = time.monotonic()
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "Makefile").exists() else []
    _run(["cmake", "-S", str(tree), "-B", str(build), *gen, *CMAKE_FLAGS], "cmake configure", log_file)
    _run(
        ["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server"],
        "cmake build llama-server",
        log_file,
    )
    if not binary.is_file():
        raise SetupError(f"build finished but {binary} is missing; see {log_file}")
    _write_stamp(stamp, server_stamp())
    log(f"built llama-server in {time.monotonic() - started:.0f} s")
    return binary


# --- the model --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by llama.cpp's byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_model(path: Path, seed: int = 0) -> None:
    """A tiny llama model: 2 layers, 64 wide, a byte-level BPE vocabulary of 256 bytes + merges."""
    try:
        import gguf
        import numpy as np
    except ImportError as exc:
        raise SetupError(f"the model needs the 'gguf' and 'numpy' packages ({exc.name} is missing)") from None

    rng = np.random.default_rng(seed)
    byte_map = _bytes_to_unicode()
    # Vocabulary: special tokens, the 256 single bytes, then a few merges of common English pairs.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tokens: list[str] = list(specials)
    toktypes: list[int] = [gguf.TokenType.CONTROL] * len(specials)
    for byte in range(256):
        tokens.append(byte_map[byte])
        toktypes.append(gguf.TokenType.NORMAL)
    merge_pairs: list[tuple[str, str]] = []
    for word in (
        "th",
        "he",
        "in",
        "er",
        "an",
        " t",
        " a",
        "re",
        "on",
        " s",
        "at",
        "en",
        "nd",
        "es",
        "or",
        "ed",
        "is",
        "it",
        "ar",
        " w",
    ):
        a, b = (byte_map[ord(ch)] for ch in word)
        merge_pairs.append((a, b))
        tokens.append(a + b)
        toktypes.append(gguf.TokenType.NORMAL)
    n_vocab = len(tokens)
    bos, eos = 0, 1

    # Big enough that a token takes about a millisecond on two cores (so that a stream can be cancelled
    # while it runs), small enough to write in a fraction of a second: about 4M parameters, 17 MB.
    n_embd, n_ff, n_layer, n_head, n_ctx = 256, 1024, 4, 4, 8192
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama (random weights, scer-proxy tests)")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges([f"{a} {b}" for a, b in merge_pairs])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    # ChatML, which llama.cpp recognises with and without its Jinja engine.
    writer.add_chat_template(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Output bias: every embedding carries a large constant in its last coordinate, which the small
    # attention and feed-forward residuals (weights of scale 0.02) leave dominant, so after the final RMS
    # norm every hidden state has a large positive last coordinate whatever the context. The output rows
    # of printable-ASCII tokens get +BIAS there and all other rows (control tokens, the end token, the
    # other bytes) -BIAS: sampling then picks printable text and never ends early, while the random part
    # of the weights still varies the text.
    bias_dim = n_embd - 1
    embd = w(n_vocab, n_embd, scale=0.5)
    embd[:, bias_dim] = 10.0
    writer.add_tensor("token_embd.weight", embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "attn_k.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "attn_v.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    unmap = {c: b for b, c in byte_map.items()}
    printable = np.array(
        [i >= len(specials) and all(0x20 <= unmap[ch] < 0x7F for ch in tok) for i, tok in enumerate(tokens)]
    )
    out = w(n_vocab, n_embd, scale=0.3)
    out[:, bias_dim] = np.where(printable, BIAS, -BIAS).astype(np.float32)
    writer.add_tensor("output.weight", out)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ensure_model(work: Path, force: bool = False) -> Path:
    model, stamp = model_paths(work)
    if not force and model.is_file() and _stamp_ok(stamp, model_stamp()):
        log(f"model already generated: {model}")
        return model
    tmp = model.with_suffix(".tmp")
    started = time.monotonic()
    write_model(tmp)
    os.replace(tmp, model)
    _write_stamp(stamp, model_stamp())
    log(f"wrote {model} in {time.monotonic() - started:.2f} s")
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--work-dir", type=Path, default=Path(os.environ.get("SCER_LLAMACPP_DIR", DEFAULT_WORK_DIR))
    )
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--model-only", action="store_true", help="only generate the model")
    ap.add_argument("--force-model", action="store_true", help="regenerate the model even if current")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the binary and model are current")
    args = ap.parse_args(argv)
    work: Path = args.work_dir.resolve()
    try:
        work.mkdir(parents=True, exist_ok=True)
        if args.check:
            binary, bstamp = server_paths(work)
            model, mstamp = model_paths(work)
            missing = [
                str(p)
                for p, s, exp in ((binary, bstamp, server_stamp()), (model, mstamp, model_stamp()))
                if not (p.is_file() and _stamp_ok(s, exp))
            ]
            if missing:
                print(f"llamacpp_setup: missing or stale: {', '.join(missing)}", file=sys.stderr)
                return 1
            print(f"LLAMA_SERVER={binary}\nLLAMA_MODEL={model}")
            return 0
        model = ensure_model(work, force=args.force_model)
        if args.model_only:
            print(f"LLAMA_MODEL={model}")
            return 0
        binary = build_server(work, args.jobs)
    except SetupError as exc:
        print(f"llamacpp_setup: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llamacpp_setup: interrupted", file=sys.stderr)
        return 130
    print(f"LLAMA_SERVER={binary}\nLLAMA_MODEL={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
