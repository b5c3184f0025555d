"""The CEL environment price expressions run in: variables, functions, compile and evaluate.

Expressions are compiled and type-checked by ``cel-expr-python`` (the CEL project's Python
runtime over cel-cpp). Every variable is declared, so a misspelt name fails at compile time;
the result must be an integer number of micro-units (1e-6 of the PriceBook's currency).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_math, ext_strings

from .scan import check_text

MAX_RESULT_MICROS = 2**53 - 1  # the ledger's exact-integer range (spendgate.money.MAX_MICROS)

_MAP_DYN = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
_MAP_STRING = cel.Type.Map(cel.Type.STRING, cel.Type.STRING)
_MAP_INT = cel.Type.Map(cel.Type.STRING, cel.Type.INT)


class Phase(StrEnum):
    """``bound``: held before the model runs; ``cost``: charged after it answered."""

    bound = "bound"
    cost = "cost"


# name -> (type, what it holds). The bound sees only what is known before the model runs.
BOUND_VARIABLES: dict[str, tuple[cel.Type, str]] = {
    "request": (_MAP_DYN, "the JSON (or form) body, over the rule's defaults"),
    "method": (cel.Type.STRING, "the HTTP method, upper-case"),
    "path": (cel.Type.STRING, "the request path, without the query"),
    "headers": (_MAP_STRING, "the request headers the rule names, by lower-case name"),
    "prices": (_MAP_INT, "the rule's named prices, in micro-units"),
    "tokens": (_MAP_INT, "input: the prompt's token bound; output: max_tokens or the estimate"),
    "body_bytes": (cel.Type.INT, "the size of the request body"),
    "timeout_ms": (cel.Type.INT, "the rule's timeout: the longest the model may take"),
    "held_ms": (
        cel.Type.INT,
        "upstream time the hold pays for: the timeout, or one window (estimate.seconds) more"
        " at each extension",
    ),
}
COST_VARIABLES: dict[str, tuple[cel.Type, str]] = {
    **BOUND_VARIABLES,
    "response": (_MAP_DYN, "the JSON body, or the last JSON event of a stream; {} if none"),
    "response_headers": (_MAP_STRING, "the response headers the rule names, by lower-case name"),
    "status": (cel.Type.INT, "the model's HTTP status"),
    "upstream_ms": (cel.Type.INT, "measured time from forwarding the request to its last byte"),
    "tokens": (_MAP_INT, "input and output tokens used (usage header, usage body, or counted)"),
    "bound": (cel.Type.INT, "the amount held for this request, in micro-units"),
}
VARIABLES = {Phase.bound: BOUND_VARIABLES, Phase.cost: COST_VARIABLES}


def _ceil_div(numerator: int, denominator: int) -> int:
    if denominator <= 0:
        raise ValueError("ceil_div: the divisor must be greater than zero")
    return -((-numerator) // denominator)


_FUNCTIONS = [
    cel.FunctionDecl(
        "ceil_div",
        [
            cel.Overload(
                "ceil_div_int_int",
                return_type=cel.Type.INT,
                parameters=[cel.Type.INT, cel.Type.INT],
                impl=_ceil_div,
            )
        ],
    )
]


def _environment(phase: Phase) -> Any:
    return cel.NewEnv(
        variables={name: kind for name, (kind, _) in VARIABLES[phase].items()},
        extensions=[ext_bindings.ExtBindings(), ext_math.ExtMath(), ext_strings.ExtStrings()],
        functions=_FUNCTIONS,
    )


_ENVIRONMENTS = {phase: _environment(phase) for phase in Phase}
_ERROR_LINE = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_UNDECLARED = re.compile(r"undeclared reference to '([^']+)'")
_NUMBER_TYPES = {"int", "uint", "dyn"}


class ExpressionError(ValueError):
    """An expression that cannot be used; ``line``/``column`` are 1-based, when known."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None) -> None:
        self.problem = problem
        self.line = line
        self.column = column
        where = f" at line {line}, column {column}" if line is not None else ""
        super().__init__(f"{problem}{where}")


class EvaluationError(ValueError):
    """An expression that failed for this request (missing field, wrong type, overflow...)."""


def _position(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    column = offset - (source.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _explain(problem: str, phase: Phase) -> str:
    undeclared = _UNDECLARED.search(problem)
    if undeclared is None:
        return problem.split(" expecting ", 1)[0]
    name = undeclared[1]
    if phase is Phase.bound and name in COST_VARIABLES:
        return (
            f"{name!r} is only known after the model answered; the bound is held before, so it"
            " may not use it"
        )
    known = ", ".join(sorted(VARIABLES[phase]))
    return f"unknown variable {name!r} (known: {known})"


def _compile_error(error: RuntimeError, source: str, phase: Phase) -> ExpressionError:
    match = _ERROR_LINE.search(str(error))
    if match is None:
        return ExpressionError(f"does not compile: {error}")
    line, column, problem = int(match[1]), int(match[2]), match[3].strip()
    # The caret line "| ....^" sits under the offending character (1-based column = dots + 1).
    caret = re.search(r"\n \| (\.*)\^", str(error)[match.end() :])
    if caret is not None:
        column = len(caret[1]) + 1
    undeclared = _UNDECLARED.search(problem)
    if undeclared is not None:  # "a.b.c" is reported at its last dot: point at "a"
        first = undeclared[1].split(".", 1)[0]
        lines = source.split("\n")
        if line <= len(lines):
            start = lines[line - 1].rfind(first, 0, column)
            column = start + 1 if start >= 0 else column
        problem = problem.replace(undeclared[1], first)
    explained = _explain(problem, phase)
    prefix = "" if explained.startswith(("unknown variable", "'")) else "does not compile: "
    return ExpressionError(prefix + explained, line, column)


@dataclass(frozen=True, eq=False)
class Expression:
    """A compiled, type-checked price expression; evaluates to micro-units."""

    source: str
    phase: Phase
    program: Any

    def evaluate(self, variables: Mapping[str, Any]) -> int:
        try:
            value = self.program.eval(data=variables)
        except (RuntimeError, ValueError, TypeError, OverflowError) as error:
            raise EvaluationError(str(error)) from None
        kind = value.type().name()
        if kind not in ("INT", "UINT"):
            if kind == "ERROR":
                raise EvaluationError(str(value.value()))
            raise EvaluationError(f"returned a {kind.lower()}, not an integer of micro-units")
        result = int(value.value())
        if result < 0:
            raise EvaluationError(f"returned {result}: a price cannot be negative")
        if result > MAX_RESULT_MICROS:
            raise EvaluationError(f"returned {result}: larger than any balance")
        return result


def compile_expression(source: str, phase: Phase) -> Expression:
    """Compile and type-check; raise ExpressionError naming the problem and its position."""
    problem = check_text(source)
    if problem is not None:
        line, column = _position(source, problem.offset) if problem.offset else (None, None)
        raise ExpressionError(problem.message, line, column)
    try:
        program = _ENVIRONMENTS[phase].compile(source)
    except RuntimeError as error:
        raise _compile_error(error, source, phase) from None
    kind = program.return_type().name().lower()
    if kind == "double":
        raise ExpressionError(
            "returns a double; money is an integer of micro-units: convert with int() or"
            " int(math.ceil(x))"
        )
    if kind not in _NUMBER_TYPES:
        raise ExpressionError(f"returns a {kind}, not a number of micro-units")
    return Expression(source, phase, program)


__all__ = [
    "BOUND_VARIABLES",
    "COST_VARIABLES",
    "MAX_RESULT_MICROS",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Phase",
    "compile_expression",
]
