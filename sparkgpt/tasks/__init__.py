"""Tasks an LM does by prompting, zero- or few-shot (`prompted.py`): classify (choosing its prompt format on
labelled examples), answer, translate, summarize, keywords, correct, continue and write; answers grounded in an
index or a knowledge graph (`grounded.py`); speech to text with a Whisper model (`transcribe.py`)."""

from sparkgpt.tasks.grounded import GroundedAnswer
from sparkgpt.tasks.prompted import (
    TEMPLATES,
    Classification,
    ClassifierChoice,
    Template,
    answer,
    answer_many,
    build_prompt,
    choose_format,
    classify,
    classify_many,
    continue_text,
    correct,
    keywords,
    summarize,
    translate,
    write_story,
)
from sparkgpt.tasks.transcribe import transcribe

__all__ = ["TEMPLATES", "Classification", "ClassifierChoice", "GroundedAnswer", "Template", "answer", "answer_many",
           "build_prompt", "choose_format", "classify", "classify_many", "continue_text", "correct", "keywords",
           "summarize", "transcribe", "translate", "write_story"]
