"""Tasks an LM does by prompting, zero- or few-shot (`prompted.py`): classify, answer, translate, summarize,
keywords, correct, continue and write;
answers grounded in an index or a knowledge graph (`grounded.py`)."""

from sparkgpt.tasks.grounded import GroundedAnswer
from sparkgpt.tasks.prompted import (
    TEMPLATES,
    Template,
    answer,
    answer_many,
    build_prompt,
    classify,
    continue_text,
    correct,
    keywords,
    summarize,
    translate,
    write_story,
)

__all__ = ["TEMPLATES", "GroundedAnswer", "Template", "answer", "answer_many", "build_prompt", "classify",
           "continue_text",
           "correct", "keywords", "summarize", "translate", "write_story"]
