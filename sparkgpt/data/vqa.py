"""Visual question answering data: images with questions and answers, for training an image-to-text model with the
same trainer (`sparkgpt train --config easy-vqa`).

A data folder holds train.jsonl and val.jsonl (test.jsonl for the evaluation task), one record per question:
{"image": "images/train/0.png", "question": "what color is the shape?", "answer": "blue"}, the image's path
relative to the folder, and the tokenizer.json every text goes through (without one, a character-level tokenizer
is built from the texts, as for seq2seq pairs). `prepare_easy_vqa` writes such a folder from the `easy-vqa`
package (4,000 train and 1,000 test images of shapes, 48,248 questions).

The decoder reads each question as the prompt `PROMPT` renders it and learns the answer after it:

    decoder input   <s> Q: what color is the shape?\\nA: blue
    labels          -100 ... -100                       blue </s>     (the loss on the answer and its end only)

A batch is whole images with every question about them (each image encoded once, its memory shared by its
questions); the images of optimizer step s are a pure function of (seed, s), as token windows are drawn.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.data.batch import pad_rows
from sparkgpt.data.images import ImagePreprocessing, preprocess_image
from sparkgpt.data.seq2seq import BOS, EOS, IGNORE, PAD
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, atomic_write_text, read_jsonl
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer

SPLITS = ("train", "val", "test")
# The user's turn as the decoder reads it: the last user message's text between "Q: " and "\nA:".
CHAT_TEMPLATE = ("{% set user = messages | selectattr('role', 'equalto', 'user') | list %}"
                 "Q: {{ user[-1]['content'] if user else '' }}\nA:")
_EVAL_STREAM = 0x5EED_E7A1


def prompt_text(question: str) -> str:
    """The decoder's prompt for a question (what CHAT_TEMPLATE renders for one user turn)."""
    return f"Q: {question}\nA:"


@dataclass
class ImageQABatch:
    """Model inputs of one batch: the batch's distinct images [U, C, H, W], decoder inputs [B, T] and each row's
    image among them [B]."""

    pixel_values: torch.Tensor
    target_ids: torch.Tensor
    image_rows: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> ImageQABatch:
        return ImageQABatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.pixel_values, self.target_ids, self.image_rows)))

    def model_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positional arguments of ImageText.forward(pixel_values, target_ids, image_rows)."""
        return self.pixel_values, self.target_ids, self.image_rows

    def tokens(self) -> int:
        return self.target_ids.numel()


@dataclass
class QARecord:
    image: Path
    question: str
    answer: str


def read_records(path: Path) -> list[QARecord]:
    """The {"image", "question", "answer"} records of a JSONL file, image paths resolved against its folder."""
    records = []
    for number, record in read_jsonl(path):
        fields = [record.get(name) for name in ("image", "question", "answer")]
        if not all(isinstance(value, str) and value for value in fields):
            raise SparkGPTError(f"{path}:{number}: expected an object with non-empty string fields 'image', "
                                "'question' and 'answer'")
        image = Path(fields[0])
        if image.is_absolute() or ".." in image.parts:
            raise SparkGPTError(f"{path}:{number}: field 'image' must be a path inside the data folder, not "
                                f"{fields[0]!r}")
        records.append(QARecord(path.parent / image, fields[1], fields[2]))
    if not records:
        raise SparkGPTError(f"{path}: no records")
    return records


class ImageQAData:
    """The images (preprocessed once, as the model reads them) and the tokenised prompts and answers of each split,
    grouped by image; `train` and `val` are lists of images, each a list of (prompt ids, answer ids)."""

    def __init__(self, path: str | Path, preprocessing: ImagePreprocessing) -> None:
        self.directory = Path(path)
        if not self.directory.is_dir():
            raise SparkGPTError(f"{path}: no such folder of image questions (make one with `sparkgpt prepare "
                                "easy-vqa --out DIR`, or write train.jsonl and val.jsonl)")
        splits = {}
        for split in ("train", "val"):
            file = self.directory / f"{split}.jsonl"
            if not file.is_file():
                raise SparkGPTError(f"{file}: missing (an image question folder holds train.jsonl and val.jsonl)")
            splits[split] = read_records(file)
        if (self.directory / TOKENIZER_FILE).is_file():
            self.tokenizer = Tokenizer.from_dir(self.directory)
        else:
            texts = [text for records in splits.values() for r in records
                     for text in (prompt_text(r.question), " " + r.answer)]
            self.tokenizer = Tokenizer.char_level(texts, special_tokens=[EOS, BOS, PAD])
            self.tokenizer.bos_token = BOS
        self.tokenizer.chat_template = self.tokenizer.chat_template or CHAT_TEMPLATE
        ids = {name: self.tokenizer.token_to_id(token) for name, token in
               (("eos", self.tokenizer.eos_token), ("bos", self.tokenizer.bos_token), ("pad", PAD))}
        if ids["eos"] is None or ids["bos"] is None:
            raise SparkGPTError(f"{self.directory / TOKENIZER_FILE}: needs bos and eos tokens")
        self.eos_id, self.bos_id = ids["eos"], ids["bos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.vocab_size = self.tokenizer.vocab_size
        self.preprocessing = preprocessing
        self.pixels, self.train, self.val = {}, [], []
        cache: dict[Path, int] = {}
        for split, grouped in (("train", self.train), ("val", self.val)):
            by_image: dict[int, list[tuple[list[int], list[int]]]] = {}
            for record in splits[split]:
                index = cache.setdefault(record.image, len(cache))
                by_image.setdefault(index, []).append(self._encode(record))
            grouped.extend((index, questions) for index, questions in by_image.items())
        images = sorted(cache, key=cache.get)
        self.images = torch.stack([preprocess_image(image, preprocessing) for image in images])
        self.train_tokens = sum(len(p) + len(a) + 1 for _, qs in self.train for p, a in qs)

    @property
    def model_fields(self) -> dict[str, Any]:
        """ModelConfig fields the data decides: its special token ids."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def _encode(self, record: QARecord) -> tuple[list[int], list[int]]:
        encode = self.tokenizer.encode
        return encode(prompt_text(record.question), add_special_tokens=False), \
            encode(" " + record.answer, add_special_tokens=False)

    def check_block_size(self, block_size: int) -> None:
        """Every decoder input (<s>, prompt, answer) must fit in block_size."""
        longest = max(1 + len(p) + len(a) for _, qs in self.train + self.val for p, a in qs)
        if longest > block_size:
            raise SparkGPTError(f"{self.directory}: a question and its answer need {longest} tokens; raise "
                                f"block_size (now {block_size}) to at least that")

    def summary(self) -> str:
        questions = sum(len(qs) for _, qs in self.train)
        return f"{len(self.train):,} training images, {questions:,} questions; {len(self.val):,} validation images"

    def step_rows(self, seed: int, step: int, count: int) -> np.ndarray:
        """The training images of optimizer step `step`: random, and a function of (seed, step)."""
        return np.random.default_rng([seed, step]).integers(0, len(self.train), size=count)

    def eval_rows(self, seed: int, count: int) -> np.ndarray:
        """The fixed validation images every evaluation scores."""
        return np.random.default_rng([seed, _EVAL_STREAM]).integers(0, len(self.val), size=count)

    def batch(self, images: list[tuple[int, list[tuple[list[int], list[int]]]]], rows: np.ndarray
              ) -> tuple[ImageQABatch, torch.Tensor]:
        """(model inputs, labels [B, T]) for images[rows] with all their questions: <s> prompt answer -> the answer
        and </s>, the prompt's positions ignored."""
        chosen = [images[int(row)] for row in rows]
        inputs, labels, image_rows = [], [], []
        for position, (_, questions) in enumerate(chosen):
            for prompt, answer in questions:
                sequence = [self.bos_id, *prompt, *answer, self.eos_id]
                inputs.append(sequence[:-1])
                labels.append([IGNORE] * len(prompt) + sequence[1 + len(prompt):])
                image_rows.append(position)
        decoder_in, _ = pad_rows(inputs, self.pad_id)
        targets, _ = pad_rows(labels, IGNORE)
        pixels = self.images[[index for index, _ in chosen]]
        return ImageQABatch(pixels, decoder_in, torch.tensor(image_rows)), targets


# ---- easy-VQA ---------------------------------------------------------------------------------------------------

def _easy_vqa_split(split: str) -> tuple[tuple[list[str], list[str], list[int]], dict[int, str]]:
    """((questions, answers, image ids), {image id: PNG path}) of the `easy-vqa` package's train or test split."""
    try:
        import easy_vqa
    except ImportError:
        raise SparkGPTError("the easy-VQA set comes from the `easy-vqa` package: pip install easy-vqa") from None
    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()


def easy_vqa_records(split: str = "test") -> list[QARecord]:
    """The questions of easy-VQA's train or test split, images read from the installed package."""
    (questions, answers, image_ids), paths = _easy_vqa_split(split)
    return [QARecord(Path(paths[image_id]), question, answer)
            for question, answer, image_id in zip(questions, answers, image_ids, strict=True)]


def prepare_easy_vqa(out_dir: str | Path, val_images: int = 400) -> dict[str, int]:
    """Write the easy-VQA set as an image question folder: its images copied under images/, train.jsonl (the train
    images but the last `val_images`), val.jsonl (those), test.jsonl (the test images), and a byte-level BPE
    tokenizer of the questions and answers. Atomic: a crash leaves any old folder intact. Returns the counts."""
    sources = {split: _easy_vqa_split(split) for split in ("train", "test")}
    counts = {}
    with atomic_directory(out_dir, marker="train.jsonl") as staging:
        texts = []
        for split, ((questions, answers, image_ids), paths) in sources.items():
            folder = staging / "images" / split
            folder.mkdir(parents=True)
            for image_id, source in paths.items():
                shutil.copyfile(source, folder / f"{image_id}.png")
            rows: dict[str, list[str]] = {"train": [], "val": []} if split == "train" else {"test": []}
            first_val = len(paths) - val_images
            for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
                name = split if split == "test" else "val" if image_id >= first_val else "train"
                record = {"image": f"images/{split}/{image_id}.png", "question": question, "answer": answer}
                rows[name].append(json.dumps(record))
                if split == "train":
                    texts += [prompt_text(question), " " + answer]
            for name, lines in rows.items():
                atomic_write_text(staging / f"{name}.jsonl", "".join(line + "\n" for line in lines))
                counts[name] = len(lines)
        tokenizer = Tokenizer.train_bpe(texts, vocab_size=512, special_tokens=[EOS, BOS, PAD])
        tokenizer.bos_token = BOS
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save(staging)
    return counts


__all__ = ["CHAT_TEMPLATE", "ImageQABatch", "ImageQAData", "QARecord", "easy_vqa_records",
           "prepare_easy_vqa", "prompt_text", "read_records"]
