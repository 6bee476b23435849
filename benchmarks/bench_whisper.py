"""Speech-to-text speed: sparkgpt's Whisper-base beside CTranslate2's (faster-whisper's engine, float32 and int8
compute types) on the same weights and the same espeak-ng speech, with each one's word error rate.

espeak-ng speaks SENTENCES (about 45 s in all), one file per pair of sentences (each within one 30 s window). Every
implementation transcribes every file, one at a time, with the same prompt (English, transcribe, no timestamps)
and the same beam size, rounds interleaved; the best round counts. sparkgpt's time runs from the file
(`sparkgpt.tasks.transcribe`: read, log-mel, decode); CTranslate2's from the same log-mel features read the same way
plus its `generate`. Real-time factor: seconds of processing per second of audio (lower is faster).

    python benchmarks/bench_whisper.py [--threads 2] [--rounds 3] [--beam-size 5] [--sentences 12]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jiwer
import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.data.audio import SAMPLE_RATE, log_mel_spectrogram, pad_or_trim, read_audio
from sparkgpt.tasks.transcribe import transcribe, whisper_prompt

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech recognition turns spoken words into written text.",
    "The harbour was quiet in the early morning light.",
    "She opened the window and listened to the rain on the roof.",
    "A small boat drifted slowly toward the northern shore.",
    "Every student in the class finished the test before noon.",
    "The old library keeps its rarest books in a locked room.",
    "He poured a cup of tea and sat down by the fire.",
    "Bright lanterns floated along the river during the festival.",
    "The engineer checked the pump before the long journey began.",
    "Fresh bread from the bakery filled the street with a warm smell.",
    "They walked across the bridge as the sun went down behind the hills.",
]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER of the words alone (lower case, letters and apostrophes: espeak reads punctuation as nothing)."""
    ref, hyp = (" ".join(re.findall(r"[a-z']+", text.lower())) for text in (reference, hypothesis))
    return jiwer.wer(ref, hyp)


def ctranslate2_folder(whisper_base: Path, folder: Path, vocab_size: int) -> Path:
    """The package's files with the vocabulary.json CTranslate2 needs: tokenizer.json's tokens by id, then the
    timestamp tokens <|0.00|> ... up to the model's vocabulary size."""
    folder.mkdir()
    (folder / "model.bin").symlink_to(whisper_base / "model.bin")
    shutil.copy(whisper_base / "config.json", folder / "config.json")
    spec = json.loads((whisper_base / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    by_id.update({added["id"]: added["content"] for added in spec["added_tokens"]})
    tokens = [by_id[i] for i in range(len(by_id))]
    tokens += [f"<|{i * 0.02:.2f}|>" for i in range(vocab_size - len(tokens))]
    (folder / "vocabulary.json").write_text(json.dumps(tokens), encoding="utf-8")
    return folder


def speak(texts: list[str], folder: Path) -> list[Path]:
    files = []
    for i, text in enumerate(texts):
        files.append(folder / f"speech{i}.wav")
        subprocess.run(["espeak-ng", "-w", str(files[-1]), text], check=True, capture_output=True)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and CTranslate2 threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--beam-size", type=int, default=5, help="beams per window, for all (5: faster-whisper's)")
    parser.add_argument("--sentences", type=int, default=len(SENTENCES), help=f"sentences spoken ({len(SENTENCES)})")
    args = parser.parse_args()
    import ctranslate2

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    spoken = [" ".join(SENTENCES[i:i + 2]) for i in range(0, args.sentences, 2)]
    whisper_base = resolve("whisper-base")
    lm = sparkgpt.load("whisper-base", device="cpu")
    prompt = whisper_prompt(lm, "en")
    with tempfile.TemporaryDirectory() as work:
        files = speak(spoken, Path(work))
        seconds = sum(len(read_audio(f)) for f in files) / SAMPLE_RATE
        folder = ctranslate2_folder(whisper_base, Path(work) / "ct2", lm.config.vocab_size)

        def reference(compute_type: str) -> Callable[[], list[str]]:
            model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type=compute_type,
                                               intra_threads=threads)

            def run() -> list[str]:
                texts = []
                for path in files:
                    features = log_mel_spectrogram(pad_or_trim(read_audio(path)))
                    result = model.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt],
                                            beam_size=args.beam_size)
                    texts.append(lm.tokenizer.decode(result[0].sequences_ids[0]).strip())
                return texts
            return run

        implementations = {"sparkgpt float32": lambda: transcribe(lm, files, beam_size=args.beam_size),
                           "ctranslate2 float32": reference("float32"), "ctranslate2 int8": reference("int8")}
        best = dict.fromkeys(implementations, float("inf"))
        transcripts: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for name, run in implementations.items():
                start = time.perf_counter()
                transcripts[name] = run()
                best[name] = min(best[name], time.perf_counter() - start)

    print(f"CPU: {hardware.cpu().describe()}; threads {threads}")
    print(f"whisper-base, beam size {args.beam_size}; {len(files)} files, {seconds:.1f} s of espeak-ng speech; "
          f"torch {torch.__version__}, ctranslate2 {ctranslate2.__version__}; best of {args.rounds} rounds")
    print(f"{'':<22}{'seconds':>9}{'RTF':>8}{'vs ct2 f32':>12}{'WER':>7}")
    reference_time = best["ctranslate2 float32"]
    for name, elapsed in best.items():
        errors = sum(word_error_rate(text, heard) * len(text.split()) for text, heard in
                     zip(spoken, transcripts[name], strict=True)) / sum(len(text.split()) for text in spoken)
        print(f"{name:<22}{elapsed:>9.2f}{elapsed / seconds:>8.3f}{reference_time / elapsed:>11.2f}x{errors:>7.3f}")
    agree = sum(a == b for a, b in zip(transcripts["sparkgpt float32"], transcripts["ctranslate2 float32"],
                                       strict=True))
    print(f"sparkgpt and ctranslate2 float32 transcripts equal on {agree} of {len(files)} files")


if __name__ == "__main__":
    main()
