"""Tasks an LM does by prompting, zero- or few-shot (`prompted.py`): classify, answer, translate, summarize,
keywords, correct, continue and write."""

from sparkgpt.tasks.prompted import (
    TEMPLATES,
    Template,
    answer,
    build_prompt,
    classify,
    continue_text,
    correct,
    keywords,
    summarize,
    translate,
    write_story,
)

__all__ = ["TEMPLATES", "Template", "answer", "build_prompt", "classify", "continue_text", "correct", "keywords",
           "summarize", "translate", "write_story"]
