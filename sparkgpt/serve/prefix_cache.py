"""Keys and values of token prefixes, kept after the sequences that computed them end: a radix tree of token blocks
with least-recently-used eviction under a byte budget.

A chat's second turn resends the first turn and its reply; a shared system prompt starts every request. The tree
keeps what finished sequences computed, so such a prompt copies its cached prefix into its slot and prefills only
what is new. The keys/values of position i depend only on tokens 0..i, so any prefix of a cached sequence is valid
for a prompt that starts the same way, whatever followed it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


class _Node:
    """One block of tokens (1..block of them; fewer only at a leaf) and their keys/values [layers, kv_heads, n, d]."""

    __slots__ = ("children", "keys", "parent", "tokens", "used", "values")

    def __init__(self, tokens: tuple[int, ...], keys: torch.Tensor | None, values: torch.Tensor | None,
                 parent: _Node | None) -> None:
        self.tokens, self.keys, self.values, self.parent = tokens, keys, values, parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.used = 0


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Cached keys/values of token sequences, shared by common prefix, evicted least recently used first.

    block_tokens: tokens per tree node (a sequence's last block may be shorter); budget_bytes: the most its
    copies may hold (0: keep nothing). `longest` finds the longest cached prefix of a prompt, `copy_into` writes it
    into a slot's columns, `insert` stores what a slot holds."""

    def __init__(self, block_tokens: int = 16, budget_bytes: int = 0) -> None:
        if block_tokens < 1 or budget_bytes < 0:
            raise ValueError("block_tokens must be >= 1 and budget_bytes >= 0")
        self.block, self.budget = block_tokens, budget_bytes
        self.root = _Node((), None, None, None)
        self.bytes = 0
        self._clock = itertools.count(1)
        self._nodes: set[_Node] = set()

    def __len__(self) -> int:
        """Tokens held."""
        return sum(len(node.tokens) for node in self._nodes)

    def longest(self, tokens: Sequence[int], limit: int | None = None) -> tuple[int, list[tuple[_Node, int]]]:
        """The longest cached prefix of tokens[:limit]: its length and its path, (node, tokens taken from it) from
        the root. The path's nodes count as used now."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        node, at, path = self.root, 0, []
        while at < limit:
            chunk = tuple(tokens[at:min(at + self.block, limit)])
            child = node.children.get(chunk) if len(chunk) == self.block else None
            if child is not None:
                path.append((child, len(chunk)))
                node, at = child, at + len(chunk)
                continue
            # No whole block matches: the child sharing the most of this chunk gives the path's last, partial step.
            best, count = None, 0
            for key, other in node.children.items():
                shared = _common(key, chunk)
                if shared > count:
                    best, count = other, shared
            if best is not None:
                path.append((best, count))
                at += count
            break
        now = next(self._clock)
        for step, _ in path:
            step.used = now
        return at, path

    @staticmethod
    def copy_into(path: list[tuple[_Node, int]], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a `longest` path's keys/values into columns 0.. of one slot's keys/values [layers, kv_heads,
        columns, d]."""
        at = 0
        for node, count in path:
            keys[:, :, at:at + count] = node.keys[:, :, :count]
            values[:, :, at:at + count] = node.values[:, :, :count]
            at += count

    def insert(self, tokens: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the keys/values of `tokens`, held in columns 0..len(tokens)-1 of one slot's keys/values [layers,
        kv_heads, columns, d]: the blocks not cached yet are copied; then the least recently used leaves go until
        the cache is within its budget."""
        if not self.budget:
            return
        node, at, now = self.root, 0, next(self._clock)
        while at < len(tokens):
            chunk = tuple(tokens[at:at + self.block])
            child = node.children.get(chunk)
            if child is None:
                covered = None
                for key, other in list(node.children.items()):
                    if len(key) > len(chunk) and key[:len(chunk)] == chunk:
                        covered = other  # a longer block already holds this shorter last one
                    elif len(key) < len(chunk) and chunk[:len(key)] == key:
                        self._drop(other)  # a shorter last block that this one extends: replaced by it
                if covered is not None:
                    covered.used = now
                    break
                span = slice(at, at + len(chunk))
                child = _Node(chunk, keys[:, :, span].clone(), values[:, :, span].clone(), node)
                node.children[chunk] = child
                self._nodes.add(child)
                self.bytes += 2 * child.keys.numel() * child.keys.element_size()
            child.used = now
            node, at = child, at + len(chunk)
        self._evict()

    def clear(self) -> None:
        for child in list(self.root.children.values()):
            self._drop(child)

    def _drop(self, node: _Node) -> None:
        """Remove `node` and everything below it."""
        stack = [node]
        while stack:
            current = stack.pop()
            stack.extend(current.children.values())
            self._nodes.discard(current)
            self.bytes -= 2 * current.keys.numel() * current.keys.element_size()
        del node.parent.children[node.tokens]

    def _evict(self) -> None:
        # Every walk touches a node's whole path from the root, so a parent is never older than its children: leaves
        # dropped oldest first, a parent that becomes a leaf waits for the next round.
        while self.bytes > self.budget:
            for leaf in sorted((node for node in self._nodes if not node.children), key=lambda node: node.used):
                if self.bytes <= self.budget:
                    break
                self._drop(leaf)
