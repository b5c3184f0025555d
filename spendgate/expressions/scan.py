"""Limits checked on an expression's text before it is compiled.

CEL is not Turing complete: without loops or recursion an expression's running time grows with
its length times the size of its input, except where comprehension macros nest, which
multiplies input sizes, and where a macro builds a list: cel-cpp evaluates ``map`` and
``filter`` by appending to an immutable list, quadratic in the list's length (measured: 1.3 s
for 4,000 items). So ``map`` and ``filter`` are refused, the boolean macros (``all``,
``exists``, ``exists_one``) may not nest, and expressions are short; every evaluation is then
linear in the request and response it reads, which the sidecar bounds in size.

The integer division operator ``/`` truncates (rounds down); prices round up, so expressions
divide with ``ceil_div(a, b)`` instead and ``/`` is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_EXPRESSION_CHARS = 2_000
COMPREHENSIONS = ("all", "exists", "exists_one")
LIST_BUILDERS = ("map", "filter")
_MACRO_CALL = re.compile(r"\.\s*(" + "|".join(COMPREHENSIONS + LIST_BUILDERS) + r")\s*\(")


@dataclass(frozen=True)
class TextProblem:
    message: str
    offset: int  # 0-based character offset into the expression


def _code_only(source: str) -> str:
    """The expression with string and bytes literals blanked out (same length, same offsets)."""
    out = list(source)
    index = 0
    while index < len(source):
        char = source[index]
        if char not in "'\"":
            index += 1
            continue
        quote = source[index : index + 3] if source[index : index + 3] in ("'''", '"""') else char
        raw = "r" in source[max(0, index - 2) : index].lower()  # r"..", rb"..", br".."
        end = index + len(quote)
        while end < len(source) and not source.startswith(quote, end):
            if source[end] == "\\" and not raw:
                end += 1
            if source[end] == "\n" and len(quote) == 1:
                break
            end += 1
        stop = min(end + len(quote), len(source))
        for position in range(index, stop):
            if out[position] != "\n":
                out[position] = " "
        index = stop
    return "".join(out)


def check_text(source: str) -> TextProblem | None:
    """The first limit the expression breaks, or None."""
    if not source.strip():
        return TextProblem("is empty", 0)
    if len(source) > MAX_EXPRESSION_CHARS:
        return TextProblem(f"is longer than {MAX_EXPRESSION_CHARS} characters", 0)
    code = _code_only(source)
    slash = code.find("/")
    if slash >= 0:
        return TextProblem(
            "uses '/', which rounds down; prices round up: divide with ceil_div(a, b)", slash
        )
    depth = 0
    open_macros: list[int] = []  # paren depth at which each open comprehension started
    for index, char in enumerate(code):
        if char == "(":
            depth += 1
        elif char == ")":
            if open_macros and open_macros[-1] == depth:
                open_macros.pop()
            depth -= 1
        match = _MACRO_CALL.match(code, index) if char == "." else None
        if match is not None:
            if match[1] in LIST_BUILDERS:
                return TextProblem(
                    f"uses {match[1]}(), which takes time quadratic in the list's length;"
                    " count with size(), test items with all(), exists() or exists_one()",
                    match.start(1),
                )
            if open_macros:
                return TextProblem(
                    f"nests the comprehension {match[1]}() inside another one; an expression may"
                    " iterate over its input, not over pairs of it",
                    match.start(1),
                )
            open_macros.append(depth + 1)
    return None


def fields_read(source: str, variable: str) -> frozenset[str] | None:
    """The top-level fields of ``variable`` the expression reads as ``variable.FIELD``: the
    caller passes only those. None when it uses the variable any other way (``variable[k]``,
    ``size(variable)``), so it needs all of it; empty when it does not use it at all."""
    code = _code_only(source)
    fields = set()
    for match in re.finditer(rf"(?<![\w.]){re.escape(variable)}\b(\s*\.\s*(\w+))?", code):
        if match[2] is None or match[2] in COMPREHENSIONS:
            return None
        fields.add(match[2])
    return frozenset(fields)


__all__ = [
    "COMPREHENSIONS",
    "LIST_BUILDERS",
    "MAX_EXPRESSION_CHARS",
    "TextProblem",
    "check_text",
    "fields_read",
]
