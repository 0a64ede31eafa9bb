"""Reading YAML that other people wrote: bounded in size, nesting and alias expansion.

Recipes are shared and copied, so reading one must be safe. The safe loader already refuses Python
objects, but YAML aliases let 300 bytes expand to billions of values ("billion laughs"), and deep
nesting exhausts the recursive composer. The event stream is scanned first, in linear time and
without recursion: the size of the value after expanding every alias is counted before anything is
built, and the document is refused when that count, its nesting or its byte size is beyond what
any recipe needs. Aliases within those bounds (`lr: &lr 1e-4` ... `head_lr: *lr`) still work.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from gmixout_cli.errors import UserError

MAX_BYTES = 256 * 1024  # the largest built-in recipe is under 2 KiB
MAX_DEPTH = 16  # recipes nest two levels (section, field) and a list
MAX_VALUES = 10_000  # scalars, lists and mappings after alias expansion


def load_bounded(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, refused with a one-line UserError naming `source` if it is too large, too
    deep or expands too far. YAML syntax errors are raised as `yaml.YAMLError` for the caller to place."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_BYTES:
        raise UserError(f"{source} is {size:,} bytes, more than a recipe can be ({MAX_BYTES // 1024} KiB): "
                        "give the recipe file itself")
    _check_events(text, source)
    try:
        data = yaml.safe_load(text)
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise UserError(f"{source} holds a value that cannot be read ({exc}): fix that value") from None
    return copy.deepcopy(data)  # aliased parts become independent values (bounded by MAX_VALUES)


def _check_events(text: str, source: str) -> None:
    """Count values with aliases expanded, and nesting, from the parser's events (no tree is built)."""
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node
    open_nodes: list[tuple[int, str | None]] = []  # collections being read: (count at their start, anchor)
    count = 0  # values so far, every alias expanded

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for _, anchor in open_nodes):
                raise UserError(f"{source} has a YAML alias '*{event.anchor}' inside its own anchor (a recursive "
                                "value): remove it")
            count += sizes.get(event.anchor or "", 0)
        elif isinstance(event, yaml.ScalarEvent):
            count += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            count += 1
            open_nodes.append((count - 1, event.anchor))
            if len(open_nodes) > MAX_DEPTH:
                raise UserError(f"{source} nests values more than {MAX_DEPTH} levels deep: a recipe has sections "
                                "of fields; flatten it")
        elif isinstance(event, yaml.CollectionEndEvent):
            start, anchor = open_nodes.pop()
            if anchor:
                sizes[anchor] = count - start
        if count > MAX_VALUES:
            raise UserError(f"{source} expands to more than {MAX_VALUES:,} values (YAML aliases, '*name'): a "
                            "recipe needs a few dozen; write the values out instead of nesting aliases")
