"""The expression evaluators against upstream's vectors and meval 0.2 / num-complex behaviour."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.protocol import codec
from node.protocol import messages as m
from workers import expr
from workers.expr import (
    MAX_EXPRESSION_BYTES,
    MAX_NESTING_DEPTH,
    ExpressionError,
    evaluate_complex,
    evaluate_compute,
    format_complex,
    format_rust_f64,
)
from workers.tasks import TaskRunner, WorkerSettings

VECTORS = Path(__file__).parent / "data" / "compute_vectors.jsonl"
INF = math.inf
NAN = math.nan


def load_vectors() -> list[Any]:
    cases = []
    for number, line in enumerate(VECTORS.read_text().splitlines(), start=1):
        vector = json.loads(line)
        ((kind, task),) = vector["task"].items()
        ((result_kind, result),) = vector["result"].items()
        cases.append(
            pytest.param(kind, task["expression"], result_kind, result, id=f"{number}:{kind}")
        )
    return cases


def assert_same_float(actual: float, expected: float) -> None:
    """Equal including the sign of zero, and nan equal to nan."""
    assert type(actual) is float
    assert repr(actual) == repr(expected)


def error_text(evaluate: Any, expression: str) -> str:
    with pytest.raises(ExpressionError) as caught:
        evaluate(expression)
    return str(caught.value)


# --- Upstream's vectors -------------------------------------------------------------------------


def test_vectors_file_has_every_case() -> None:
    assert len(load_vectors()) == 80


@pytest.mark.parametrize(("kind", "expression", "result_kind", "result"), load_vectors())
def test_upstream_vector(kind: str, expression: str, result_kind: str, result: Any) -> None:
    evaluate = evaluate_compute if kind == "Compute" else evaluate_complex
    if result_kind == "Number":
        assert_same_float(evaluate_compute(expression), float(result))
    elif result_kind == "Response":
        assert evaluate_complex(expression) == result
    elif result is not None:
        assert error_text(evaluate, expression) == result
    elif kind == "Compute":
        # Upstream answers these with a JSON null the master rejects; the task layer turns our
        # non-finite value into an Error.
        assert not math.isfinite(evaluate_compute(expression))
    else:
        error_text(evaluate, expression)


# --- Compute: values ------------------------------------------------------------------------------

COMPUTE_VALUES = [
    # numbers and whitespace
    ("42", 42.0),
    ("  7.  ", 7.0),
    ("007", 7.0),
    ("2.5", 2.5),
    ("1e3", 1000.0),
    ("1.5E3", 1500.0),
    ("1.e3", 1000.0),
    ("1e+2", 100.0),
    ("25e-1", 2.5),
    ("1e999", INF),
    ("1\t+\r\n2", 3.0),
    # every operator
    ("7+2", 9.0),
    ("7-2", 5.0),
    ("7*2", 14.0),
    ("7/2", 3.5),
    ("7%2", 1.0),
    ("7^2", 49.0),
    ("-7%4", -3.0),
    ("7%-4", 3.0),
    ("-0%5", -0.0),
    ("5.5%-2", 1.5),
    ("5%0", NAN),
    ("1e300*1e300", INF),
    ("1/0", INF),
    ("-1/0", -INF),
    ("1/(0*-1)", -INF),
    ("0/0", NAN),
    # precedence and associativity traps
    ("-2^2", -4.0),
    ("2^-1", 0.5),
    ("2^-2*3", 0.75),
    ("-2*3", -6.0),
    ("2*-3^2", -18.0),
    ("2^3^2", 512.0),
    ("2^-3^2", 2.0**-9),
    ("(2^3)^2", 64.0),
    ("-(-2)^2", -4.0),
    ("8/4/2", 1.0),
    ("8-4-2", 2.0),
    ("7%4%2", 1.0),
    ("2+3*4^2", 50.0),
    ("-+-2", 2.0),
    ("--2", 2.0),
    ("1 - -1", 2.0),
    ("-2+3", 1.0),
    ("-" * 9999 + "1", -1.0),
    # constants
    ("pi", math.pi),
    ("e", math.e),
    ("-e", -math.e),
    # every function (Rust's f64 methods: libm, or Rust's own formula where std has one)
    ("sqrt(2)", math.sqrt(2.0)),
    ("sqrt(-4)", NAN),
    ("sqrt(-0)", -0.0),
    ("exp(1)", math.exp(1.0)),
    ("exp(1000)", INF),
    ("exp(-1000)", 0.0),
    ("ln(e)", 1.0),
    ("ln(0)", -INF),
    ("ln(-1)", NAN),
    ("abs(-2.5)", 2.5),
    ("abs(-0)", 0.0),
    ("sin(1)", math.sin(1.0)),
    ("sin(1e300*1e300)", NAN),
    ("cos(1)", math.cos(1.0)),
    ("tan(1)", math.tan(1.0)),
    ("tan(pi/2)", 16331239353195370.0),
    ("asin(1)", math.pi / 2),
    ("asin(2)", NAN),
    ("acos(-1)", math.pi),
    ("acos(2)", NAN),
    ("atan(1e300*1e300)", math.pi / 2),
    ("sinh(1)", math.sinh(1.0)),
    ("sinh(-1000)", -INF),
    ("cosh(1)", math.cosh(1.0)),
    ("cosh(-1000)", INF),
    ("tanh(-1000)", -1.0),
    ("asinh(1)", math.log1p(1.0 + 1.0 / (math.sqrt(2.0) + 1.0))),
    ("asinh(-0)", -0.0),
    ("asinh(-1e300)", -691.4686750787737),
    ("acosh(2)", math.log(2.0 + math.sqrt(3.0))),
    ("acosh(0.5)", NAN),
    ("atanh(0.5)", 0.5 * math.log1p(2.0)),
    ("atanh(1)", INF),
    ("atanh(-1)", -INF),
    ("atanh(2)", NAN),
    ("floor(-0.5)", -1.0),
    ("floor(-0)", -0.0),
    ("floor(1e300)", 1e300),
    ("ceil(-0.5)", -0.0),
    ("ceil(0.2)", 1.0),
    ("round(2.5)", 3.0),
    ("round(-2.5)", -3.0),
    ("round(0.49999999999999994)", 0.0),
    ("round(-0.4)", -0.0),
    ("round(4503599627370497)", 4503599627370497.0),
    ("signum(0)", 1.0),
    ("signum(-0)", -1.0),
    ("signum(-7)", -1.0),
    ("signum(0/0)", NAN),
    ("atan2(1, 1)", math.pi / 4),
    ("atan2(0, -0)", math.pi),
    ("atan2(-0, -1)", -math.pi),
    ("max(1)", 1.0),
    ("max(1, 5, 3)", 5.0),
    ("min(4, -2, 8)", -2.0),
    ("max(0, -0)", 0.0),
    ("max(-0, 0)", -0.0),
    ("max(sqrt(-1))", -INF),
    ("max(sqrt(-1), 3)", 3.0),
    ("min(sqrt(-1))", INF),
    ("sin (pi/2)", 1.0),
    ("abs\n(-3)", 3.0),
    ("max(1, min(2, max(3, 4)))", 2.0),
    # Rust's powf is C pow: poles, signs and nan where Python's ** would raise or go complex
    ("0^0", 1.0),
    ("(0/0)^0", 1.0),
    ("1^(0/0)", 1.0),
    ("0^-1", INF),
    ("(-0)^-1", -INF),
    ("(-0)^-2", INF),
    ("(-0)^3", -0.0),
    ("(-8)^(1/3)", NAN),
    ("(-2)^1025", -INF),
    ("(-2)^1024", INF),
    ("10^400", INF),
    ("10^-400", 0.0),
    ("(-1)^(1e300*1e300)", 1.0),
]


@pytest.mark.parametrize(("expression", "expected"), COMPUTE_VALUES)
def test_compute_value(expression: str, expected: float) -> None:
    assert_same_float(evaluate_compute(expression), expected)


# --- Compute: errors ------------------------------------------------------------------------------

COMPUTE_ERRORS = [
    # parse errors: the tokenizer rejects before anything is evaluated
    ("", "Parse error: Missing argument at the end of expression."),
    ("   ", "Parse error: Missing argument at the end of expression."),
    ("2^", "Parse error: Missing argument at the end of expression."),
    ("(", "Parse error: Missing argument at the end of expression."),
    ("sin(", "Parse error: Missing argument at the end of expression."),
    ("y+", "Parse error: Missing argument at the end of expression."),
    ("sin(1", "Parse error: Missing 1 right parenthesis."),
    ("((1", "Parse error: Missing 2 right parentheses."),
    ("(((2)", "Parse error: Missing 2 right parentheses."),
    ("()", "Parse error: Unexpected token at byte 1."),
    ("2)", "Parse error: Unexpected token at byte 1."),
    ("f(,2)", "Parse error: Unexpected token at byte 2."),
    ("f(2,)", "Parse error: Unexpected token at byte 4."),
    ("(1,2)", "Parse error: Unexpected token at byte 2."),
    ("max((1,2))", "Parse error: Unexpected token at byte 6."),
    (".5", "Parse error: Unexpected token at byte 0."),
    ("1e", "Parse error: Unexpected token at byte 0."),
    ("3*1e+", "Parse error: Unexpected token at byte 2."),
    ("2exp(1)", "Parse error: Unexpected token at byte 0."),
    ("1e5e", "Parse error: Unexpected token at byte 3."),
    ("1.5.2", "Parse error: Unexpected token at byte 3."),
    ("2pi", "Parse error: Unexpected token at byte 1."),
    ("2 (3)", "Parse error: Unexpected token at byte 2."),
    ("*2", "Parse error: Unexpected token at byte 0."),
    ("2**3", "Parse error: Unexpected token at byte 2."),
    ("1\x0b+2", "Parse error: Unexpected token at byte 1."),
    ("3 = 3", "Parse error: Unexpected token at byte 2."),
    ("é+1", "Parse error: Unexpected token at byte 0."),
    ("1+é", "Parse error: Unexpected token at byte 2."),
    ("(é)", "Parse error: Unexpected token at byte 1."),
    ("1+2 €", "Parse error: Unexpected token at byte 4."),
    ("€ + y", "Parse error: Unexpected token at byte 0."),
    ("y + (", "Parse error: Missing argument at the end of expression."),
    # evaluation errors, in RPN order: a call's arguments come before the call
    ("x", "Evaluation error: unknown variable `x`."),
    ("abs", "Evaluation error: unknown variable `abs`."),
    ("PI", "Evaluation error: unknown variable `PI`."),
    ("_x1", "Evaluation error: unknown variable `_x1`."),
    ("i", "Evaluation error: unknown variable `i`."),
    ("foo(1)", "Evaluation error: function `foo`: Unknown function"),
    ("Sin(1)", "Evaluation error: function `Sin`: Unknown function"),
    ("foo(1, 2, 3)", "Evaluation error: function `foo`: Unknown function"),
    ("foo(y)", "Evaluation error: unknown variable `y`."),
    ("y + foo(1)", "Evaluation error: unknown variable `y`."),
    ("foo(1) + y", "Evaluation error: function `foo`: Unknown function"),
    ("sin(1, 2)", "Evaluation error: function `sin`: Expected 1 arguments"),
    ("atan2(1)", "Evaluation error: function `atan2`: Expected 2 arguments"),
    ("atan2(1, 2, 3)", "Evaluation error: function `atan2`: Expected 2 arguments"),
    ("sqrt(1, 2) + y", "Evaluation error: function `sqrt`: Expected 1 arguments"),
]


@pytest.mark.parametrize(("expression", "message"), COMPUTE_ERRORS)
def test_compute_error(expression: str, message: str) -> None:
    assert error_text(evaluate_compute, expression) == message


def test_error_is_a_value_error_raised_fresh_each_time() -> None:
    errors = []
    for _ in range(2):
        with pytest.raises(ValueError) as caught:
            evaluate_compute("nope")
        errors.append(caught.value)
    assert errors[0] is not errors[1]
    assert isinstance(errors[0], ExpressionError)


# --- ComplexMath ------------------------------------------------------------------------------------

COMPLEX_VALUES = [
    ("i", "0+1i"),
    ("-i", "-0-1i"),
    ("+i", "0+1i"),
    ("-0", "-0+-0i"),
    ("--0", "0+0i"),
    ("-(0*i)", "-0+-0i"),
    ("2*i-3", "-3+2i"),
    ("i*i", "-1+0i"),
    ("(3+4*i)*(3-4*i)", "25+0i"),
    ("(3+4*i)/(1+2*i)", "2.2-0.4i"),
    ("1/3", "0.3333333333333333+0i"),
    ("1/0", "NaN+NaNi"),
    ("1e300*1e300+i", "inf+1i"),
    ("-1e300*1e300", "-inf+-0i"),
    ("5%3", "2+0i"),
    ("(5+2*i)%3", "2+2i"),
    ("(5+2*i)%(3+7*i)", "2+2i"),
    ("i^2", "-1+0.00000000000000012246467991473532i"),
    ("i^0", "1+0i"),
    ("0^0", "1+0i"),
    ("0^1", "0+0i"),
    ("0^i", "NaN+NaNi"),
    ("2^0.5", "1.414213562373095+0i"),
    ("(1+i)^2", "0.00000000000000012246467991473532+2i"),
    ("(-1)^0.5", "0.00000000000000006123233995736766-1i"),
    ("(0-1)^0.5", "0.00000000000000006123233995736766+1i"),
    ("2^3^2", "512.0000000000005+0i"),  # exp(9.000000000000002 * ln 2)
    ("1e-7*i", "0+0.0000001i"),
    ("  i  *  2  ", "0+2i"),
]


@pytest.mark.parametrize(("expression", "expected"), COMPLEX_VALUES)
def test_complex_value(expression: str, expected: str) -> None:
    assert evaluate_complex(expression) == expected


COMPLEX_ERRORS = [
    ("", "Missing argument at the end of expression."),
    ("i+", "Missing argument at the end of expression."),
    ("((i", "Missing 2 right parentheses."),
    ("3i", "Unexpected token at byte 1."),
    ("i i", "Unexpected token at byte 2."),
    ("pi", "unknown var pi"),
    ("e", "unknown var e"),
    ("I", "unknown var I"),
    ("x + y", "unknown var x"),
    ("sqrt(4)", "unsupported token"),
    ("sqrt(y)", "unknown var y"),
    ("y + sqrt(1)", "unknown var y"),
    ("sqrt(1) + y", "unsupported token"),
]


@pytest.mark.parametrize(("expression", "message"), COMPLEX_ERRORS)
def test_complex_error(expression: str, message: str) -> None:
    assert error_text(evaluate_complex, expression) == message


# --- Formatting -------------------------------------------------------------------------------------

F64_DISPLAY = [
    (3.0, "3"),
    (0.0, "0"),
    (-0.0, "-0"),
    (0.1, "0.1"),
    (-2.5, "-2.5"),
    (0.30000000000000004, "0.30000000000000004"),
    (123456789.125, "123456789.125"),
    (1e15, "1000000000000000"),
    (1e16, "10000000000000000"),
    (1e21, "1" + "0" * 21),
    (1.2345678901234567e20, "123456789012345670000"),
    (1e300, "1" + "0" * 300),
    (1.7976931348623157e308, "17976931348623157" + "0" * 292),
    (1e-4, "0.0001"),
    (1e-7, "0.0000001"),
    (1.5e-7, "0.00000015"),
    (-1.8369701987210297e-16, "-0.00000000000000018369701987210297"),
    (5e-324, "0." + "0" * 323 + "5"),
    (NAN, "NaN"),
    (INF, "inf"),
    (-INF, "-inf"),
]


@pytest.mark.parametrize(("value", "text"), F64_DISPLAY)
def test_format_rust_f64(value: float, text: str) -> None:
    assert format_rust_f64(value) == text


COMPLEX_DISPLAY = [
    (complex(5, 5), "5+5i"),
    (complex(0.5, -1), "0.5-1i"),
    (complex(-0.0, -1), "-0-1i"),
    (complex(-1, -0.0), "-1+-0i"),
    (complex(-2.5, -0.0), "-2.5+-0i"),
    (complex(0, 0), "0+0i"),
    (complex(1e300, 5e-324), "1" + "0" * 300 + "+0." + "0" * 323 + "5i"),
    (complex(-1e-7, -1e21), "-0.0000001-1" + "0" * 21 + "i"),
    (complex(NAN, NAN), "NaN+NaNi"),
    (complex(-INF, INF), "-inf+infi"),
    (complex(INF, -INF), "inf-infi"),
]


@pytest.mark.parametrize(("value", "text"), COMPLEX_DISPLAY)
def test_format_complex(value: complex, text: str) -> None:
    assert format_complex(value) == text


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_format_rust_f64_is_exact_and_plain(value: float) -> None:
    text = format_rust_f64(value)
    assert "e" not in text
    assert Decimal(text) == Decimal(repr(value))
    assert repr(float(text)) == repr(value)


# --- Limits -----------------------------------------------------------------------------------------


def test_longest_expression_is_accepted() -> None:
    expression = "1" + "+1" * 4999 + " "
    assert len(expression.encode()) == MAX_EXPRESSION_BYTES
    assert evaluate_compute(expression) == 5000.0


@pytest.mark.parametrize(
    ("expression", "size"),
    [("1" + "+1" * 5000, 10001), ("é" * 5001, 10002)],
    ids=["ascii", "counted-in-utf8-bytes"],
)
def test_too_long_expression_is_rejected(expression: str, size: int) -> None:
    assert error_text(evaluate_compute, expression) == (
        f"Parse error: Expression too long: {size} bytes (limit {MAX_EXPRESSION_BYTES})."
    )
    assert error_text(evaluate_complex, expression) == (
        f"Expression too long: {size} bytes (limit {MAX_EXPRESSION_BYTES})."
    )


@pytest.mark.parametrize("opener", ["(", "abs(", "max(1, "])
def test_deepest_nesting_is_accepted(opener: str) -> None:
    depth = MAX_NESTING_DEPTH
    assert evaluate_compute(opener * depth + "1" + ")" * depth) == 1.0


@pytest.mark.parametrize("opener", ["(", "abs("])
def test_deeper_nesting_is_rejected(opener: str) -> None:
    depth = MAX_NESTING_DEPTH + 1
    expression = opener * depth + "1" + ")" * depth
    offset = len(opener) * MAX_NESTING_DEPTH
    assert error_text(evaluate_compute, expression) == (
        f"Parse error: Parentheses nested deeper than {MAX_NESTING_DEPTH} levels at byte {offset}."
    )
    assert error_text(evaluate_complex, expression).startswith("Parentheses nested deeper")


def test_long_expression_beyond_the_cache_still_evaluates() -> None:
    expression = "2" + "*1" * 1000
    assert evaluate_compute(expression) == 2.0
    assert evaluate_complex(expression) == "2+0i"


# --- Properties -------------------------------------------------------------------------------------

GRAMMAR_ALPHABET = "0123456789.eE+-*/%^(),ipxsqrtmaxnb_ \t\n\x0bé€"


@settings(max_examples=400)
@given(st.one_of(st.text(), st.text(alphabet=GRAMMAR_ALPHABET)))
def test_any_text_fails_only_with_expression_error(text: str) -> None:
    for evaluate in (evaluate_compute, evaluate_complex):
        with contextlib.suppress(ExpressionError):
            evaluate(text)


NUMBERS = st.from_regex(r"[0-9]{1,4}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,2})?", fullmatch=True)
NAMES = st.sampled_from(["pi", "e", "i", "x"])
FUNCTIONS = st.sampled_from(["sqrt", "ln", "sin", "atan2", "max", "round", "nope"])
SPACE = st.sampled_from(["", "", " ", "\t", "\n"])


def _well_formed(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(children, SPACE, st.sampled_from("+-*/%^"), SPACE, children)
    unary = st.tuples(st.sampled_from("+-"), SPACE, children)
    call = st.tuples(FUNCTIONS, SPACE, st.lists(children, min_size=1, max_size=3))
    return st.one_of(
        binary.map("".join),
        unary.map("".join),
        children.map(lambda child: f"({child})"),
        call.map(lambda parts: f"{parts[0]}{parts[1]}({', '.join(parts[2])})"),
    )


WELL_FORMED = st.recursive(st.one_of(NUMBERS, NAMES), _well_formed, max_leaves=12)


@settings(max_examples=300)
@given(WELL_FORMED)
def test_well_formed_expressions_never_fail_to_parse(text: str) -> None:
    try:
        assert type(evaluate_compute(text)) is float
    except ExpressionError as error:
        assert str(error).startswith("Evaluation error: ")
    try:
        assert evaluate_complex(text).endswith("i")
    except ExpressionError as error:
        assert str(error) == "unsupported token" or str(error).startswith("unknown var ")


# --- The plain fast path ------------------------------------------------------------------------


def reference_outcome(expression: str) -> float | str:
    """What the full parser and stack machine give: a value, or the error text."""
    try:
        return expr._run_real(expr._parse(expression))
    except (expr._SyntaxFailure, ExpressionError) as error:
        return str(error)


PLAIN_NUMBERS = st.one_of(
    NUMBERS,
    st.sampled_from(["0", "0.", "00.0", "0e0", "5.", "1e308", "1e999", "2.5E-3", "1e+2"]),
)
PLAIN_SPACE = st.sampled_from(["", "", " ", "  ", "\t", "\r\n"])
PLAIN_EXPRESSIONS = st.builds(
    lambda first, rest, lead, trail: lead + first + "".join(rest) + trail,
    PLAIN_NUMBERS,
    st.lists(
        st.builds(
            "".join, st.tuples(PLAIN_SPACE, st.sampled_from("+-*/%"), PLAIN_SPACE, PLAIN_NUMBERS)
        ),
        max_size=7,
    ),
    PLAIN_SPACE,
    PLAIN_SPACE,
)


@settings(max_examples=2000)
@given(PLAIN_EXPRESSIONS)
def test_plain_expressions_take_the_fast_path_with_meval_s_exact_value(text: str) -> None:
    value = expr.plain_value(text.encode())
    assert value is not None
    reference = reference_outcome(text)
    assert isinstance(reference, float)
    assert_same_float(value, reference)
    if math.isfinite(reference):
        assert_same_float(evaluate_compute(text), reference)


@pytest.mark.parametrize("operators", ["", "+", "-*", "/%", "*/", "-/-", "+%*-", "/-/+*%", "-" * 9])
@pytest.mark.parametrize(
    "numbers", [("7", "3", "0", "2.5", "1e300"), ("0", "0.", "5", "1e999", "3")]
)
def test_every_operator_sequence_folds_like_meval(operators: str, numbers: tuple[str, ...]) -> None:
    # Zero divisors (Python raises, IEEE does not), signed zeros, overflow and nan.
    text = numbers[0] + "".join(
        op + numbers[(k + 1) % len(numbers)] for k, op in enumerate(operators)
    )
    value = expr.plain_value(text.encode())
    assert value is not None
    reference = reference_outcome(text)
    assert isinstance(reference, float)
    assert_same_float(value, reference)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "-1",
        "+1",
        "1+-2",
        "1+",
        "(1)",
        "2^3",
        "1e",
        "1e+",
        ".5",
        "1..2",
        "1 2",
        "pi",
        "1+2)",
        "1\x0b+2",
        "1\u00a0+2",
        "\u0661+2",
        "1_0",
        "inf",
        "nan",
        "1" * 10_001,
    ],
)
def test_anything_but_a_plain_expression_is_left_to_the_parser(text: str) -> None:
    assert expr.plain_value(text.encode()) is None


def test_the_task_runner_s_plain_path_answers_like_the_decoding_path() -> None:
    runner = TaskRunner(WorkerSettings())
    for ident, text in [
        ("t1", "12345+3*2"),
        ("id with spaces/{}[]:,", " 1e21 * 10 "),
        ("t2", "1/3"),
        ("t3", "0.1+0.2"),
        ("t4", "1e-7*1"),
        ("t5", "1/0"),  # not finite: an Error
        ("t6", "0/0"),
        ("t7", "5%0"),
        ("t8", "2^0.5"),  # not plain
        ("é", "1+1"),  # not ASCII
        ("t9", "1" * 10_001),  # too long
    ]:
        payload = codec.encode_payload(m.AssignTask(ident, m.Compute(text)))
        expected = codec.task_result_payload(ident, _compute_result(text))
        assert runner.run_payload(payload) == expected, (ident, text)
        assert runner._run_decoded(payload)[1] == expected


def _compute_result(text: str) -> m.Result:
    try:
        value = evaluate_compute(text)
    except ExpressionError as error:
        return m.Error(str(error))
    return m.Number(value) if math.isfinite(value) else codec.non_finite_error(value)


def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(expr.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.partition(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
