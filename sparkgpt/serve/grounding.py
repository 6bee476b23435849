"""Chat grounded in a search index (`sparkgpt serve REF --index DIR`).

The last user message is the query; its `k` best chunks go into that message the way `tasks.answer` writes them
(the "answer_sources" prompt of `tasks.prompted.TEMPLATES`: the instruction, the numbered `sources_block`, the
question), so a one-question chat gets the very prompt `sparkgpt ask --index` uses. The reply comes back with the
sources (`Hit.to_json()`); a whole reply has its [n] citations checked and, when missing, added (`cite`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkgpt.lm import LM
from sparkgpt.rag.index import Hit, Index
from sparkgpt.tasks.grounded import sources_block
from sparkgpt.tasks.prompted import build_prompt


@dataclass
class Grounding:
    """An index to ground chat replies in, and how many chunks each reply gets."""

    index: Index
    k: int = 4

    @staticmethod
    def query(messages: list[dict[str, str]]) -> str | None:
        """The last user message, which retrieval searches for; None when there is none or it is blank."""
        for message in reversed(messages):
            if message["role"] == "user":
                return message["content"] if message["content"].strip() else None
        return None

    def search(self, query: str) -> list[Hit]:
        """The best chunks for a query (blocking: a dense search embeds the query)."""
        return self.index.search(query, k=self.k)

    @staticmethod
    def messages(lm: LM, messages: list[dict[str, str]], hits: list[Hit]) -> list[dict[str, str]]:
        """The conversation with its last user message asking its question of the numbered sources."""
        if not hits:
            return messages
        last = max(i for i, message in enumerate(messages) if message["role"] == "user")
        fields = {"question": messages[last]["content"], "sources": sources_block(hits)}
        content = build_prompt(lm, "answer_sources", fields, chat=False)  # the text alone; the template wraps it
        return [*messages[:last], {"role": "user", "content": content}, *messages[last + 1:]]

    def prompt(self, lm: LM, messages: list[dict[str, str]], hits: list[Hit], room: int,
               context: int) -> tuple[list[int], list[Hit]]:
        """The grounded conversation's prompt ids and the sources it shows: the worst sources are left out while
        the prompt and `room` new tokens would not fit `context` (with none left, the conversation as it came)."""
        for count in range(len(hits), 0, -1):
            ids = lm.chat_prompt(self.messages(lm, messages, hits[:count]))
            if len(ids) + room <= context:
                return ids, hits[:count]
        return lm.chat_prompt(messages), []
