"""Expression evaluation for the `Compute` and `ComplexMath` tasks, bug-compatible with upstream.

The upstream node evaluates `Compute` with meval 0.2 (`eval_str`) and `ComplexMath` with its own
loop over meval's tokenizer and shunting-yard output, on num-complex's `Complex64`. This module
reproduces both in pure Python: the same grammar, the same byte offsets and error texts, and the
same IEEE double arithmetic (Rust's float semantics, not Python's).

Data flow::

    expression ──► _parse ──► RPN program ──► _run_real ────► float  (evaluate_compute)
        (str)     tokenizer +  (tuple of      _run_complex ─► (re, im) ─► format_complex
                  shunting-yard  items)                                    (evaluate_complex)

Both entry points cache their outcome (value or error text) per expression string: evaluation is
pure, and a cluster tends to send the same expressions again and again. A plain expression
(unsigned numbers and `+ - * / %` only, the common case) skips the parser: `plain_value` folds it
directly with the same operations in the same order; the task runner matches such a `Compute`
in the raw payload and calls `evaluate_plain` on its bytes.

Grammar (meval 0.2; whitespace is space, tab, CR and LF only, and may appear between any tokens)::

    sum     := product (("+" | "-") product)*            left-associative
    product := unary (("*" | "/" | "%") unary)*          left-associative
    unary   := ("+" | "-")* power
    power   := primary ("^" unary)?                      right-associative, binds tightest
    primary := number | name | name "(" sum ("," sum)* ")" | "(" sum ")"
    number  := digit+ ("." digit*)? (("e" | "E") ("+" | "-")? digit+)?     (`5.` yes, `.5` no)
    name    := [A-Za-z_][A-Za-z0-9_]*

So `-2^2` is -4, `2^-1` is 0.5, `-2*3` is `(-2)*3` (which matters for signed zeros), and `2^3^2`
is `2^(3^2)`. A name followed by `(` is a function call; a name alone is a variable, so `abs` alone
is an unknown variable. `f()` is a parse error: a call has at least one argument. The parser is
meval's: a tokenizer state machine feeding a shunting-yard, not recursive descent.

Errors follow meval's split. Parse errors (tokenizer) come first: an unexpected token at a UTF-8
byte offset, a missing operand at the end, or missing right parentheses. Only a well-formed
expression is evaluated; evaluation errors (an unknown variable, an unknown function, a wrong number
of arguments) are raised at the first offending item in RPN order, as meval's stack machine does.

`Compute` knows `pi`, `e` and meval's built-in functions. `ComplexMath` upstream knows only the
variable `i`: every other name is `unknown var NAME`, and every function call is `unsupported
token`, because upstream's complex loop has no case for meval's function tokens. Its error texts
carry no `Parse error:` prefix (upstream prints the tokenizer error alone).

Limits that upstream lacks: an expression longer than `MAX_EXPRESSION_BYTES` or with parentheses
nested deeper than `MAX_NESTING_DEPTH` is rejected as a parse error. Nothing here recurses, so the
Python stack is never at risk; the limits bound time and memory.

`evaluate_compute` returns non-finite results (`nan`, `inf`) as they are: upstream would send them
as JSON `null`, which the master rejects, so the task layer must turn them into an `Error`.
"""

from __future__ import annotations

import ctypes
import math
import operator
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Final, NamedTuple

__all__ = [
    "MAX_EXPRESSION_BYTES",
    "MAX_NESTING_DEPTH",
    "PLAIN_EXPRESSION",
    "PLAIN_JSON_EXPRESSION",
    "ExpressionError",
    "evaluate_complex",
    "evaluate_compute",
    "evaluate_plain",
    "format_complex",
    "format_rust_f64",
    "plain_value",
]

MAX_EXPRESSION_BYTES: Final = 10_000
MAX_NESTING_DEPTH: Final = 200

_INF: Final = math.inf
_NAN: Final = math.nan
# Every float with a magnitude of at least 2**52 is already an integer.
_INTEGRAL_FROM: Final = 4503599627370496.0


class ExpressionError(ValueError):
    """An expression that cannot be evaluated; `str()` is the text for the task's `Error` result."""


class _SyntaxFailure(Exception):
    """A tokenizer error, without the `Parse error: ` prefix that only `Compute` adds."""


class _Variable(NamedTuple):
    name: str


class _Call(NamedTuple):
    name: str
    nargs: int


# A program in reverse Polish notation: a float pushes a literal, "~" negates the top of the stack,
# an operator character applies a binary operator, a `_Variable` pushes a value, a `_Call` replaces
# its arguments with the function's result.
_Item = float | str | _Variable | _Call
_Program = tuple[_Item, ...]

_LEXEME: Final = re.compile(
    r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?)"  # 1 number (the exponent checked below)
    r"|([A-Za-z_][A-Za-z0-9_]*)([ \t\r\n]*\()?"  # 2 name, 3 the "(" that makes it a call
    r"|([-+*/%^(),])"  # 4 operator or punctuation
    r"|([ \t\r\n]+)"  # 5 whitespace
    r"|.",  # anything else: always unexpected, so all five groups are empty
    re.DOTALL,
)
# The plain subset (see `plain_value`): unsigned numbers joined by `+ - * / %`, with meval's
# whitespace around them (a regex source). A sign after `e` always belongs to an exponent in it.
# Nothing in it needs backtracking, so every quantifier is possessive (faster to match).
_NUMBER: Final = r"[0-9]++(?:\.[0-9]*+)?+(?:[eE][+-]?+[0-9]++)?+"
_WHITESPACE: Final = r"[ \t\r\n]*+"
PLAIN_EXPRESSION: Final = (
    rf"{_WHITESPACE}{_NUMBER}(?:{_WHITESPACE}[-+*/%]{_WHITESPACE}{_NUMBER})*+{_WHITESPACE}"
)
# The same as the raw text of a JSON string, where tab, CR and LF can only appear escaped.
PLAIN_JSON_EXPRESSION: Final = rf" *+{_NUMBER}(?: *+[-+*/%] *+{_NUMBER})*+ *+"
_PLAIN: Final = re.compile(PLAIN_EXPRESSION.encode())
_PLAIN_SPLIT: Final = re.compile(rf"{_WHITESPACE}(?<![eE])([-+*/%]){_WHITESPACE}".encode())
_NOT_OPERATORS: Final = b"0123456789. \t\r\n"
_OPERATORS_TO_SPACES: Final = bytes.maketrans(b"+-*/%", b"     ")

# Binary operators and unary minus ("~") by meval's precedence; "(" and function markers rank 0 so
# that popping operators stops at them.
_PRECEDENCE: Final[dict[str, int]] = {"+": 1, "-": 1, "*": 2, "/": 2, "%": 2, "~": 3, "^": 4}
_BINARY_SYMBOLS: Final = frozenset("+-*/%^")
_OPEN_GROUP: Final = "("
_OPEN_CALL: Final = "f"


def _byte_offset(expression: str, index: int) -> int:
    # meval reports positions in the UTF-8 bytes of the input; surrogatepass keeps a lone surrogate
    # from raising (Rust strings cannot hold one, but a Python string can).
    return len(expression[:index].encode("utf-8", "surrogatepass"))


def _utf8_length_exceeds(expression: str, limit: int) -> bool:
    # A code point takes at most four UTF-8 bytes, so short strings need no encoding.
    if len(expression) <= limit // 4:
        return False
    return len(expression) > limit or len(expression.encode("utf-8", "surrogatepass")) > limit


def _parse(expression: str) -> _Program:
    """Tokenize like meval's state machine and convert to RPN like its shunting-yard, in one pass.

    Raises `_SyntaxFailure` with meval's `ParseError` text. The caller bounds the length.
    """
    output: list[_Item] = []
    operators: list[str] = []
    open_parens: list[str] = []  # _OPEN_GROUP or _OPEN_CALL, innermost last
    call_names: list[str] = []
    call_nargs: list[int] = []
    expecting_operand = True
    index = 0
    for number, name, call, symbol, space in _LEXEME.findall(expression):
        start = index
        if space:
            index += len(space)
            continue
        if expecting_operand:
            if number:
                index += len(number)
                if number[-1] in "eE+-":
                    # meval's number parser fails as a whole on an exponent without digits.
                    break
                output.append(float(number))
                expecting_operand = False
                continue
            if name:
                index += len(name) + len(call)
                if call:
                    if len(open_parens) >= MAX_NESTING_DEPTH:
                        raise _too_deep(expression, start)
                    open_parens.append(_OPEN_CALL)
                    operators.append(_OPEN_CALL)
                    call_names.append(name)
                    call_nargs.append(1)
                else:
                    output.append(_Variable(name))
                    expecting_operand = False
                continue
            if symbol == "-":
                operators.append("~")
                index += 1
                continue
            if symbol == "+":
                # Unary plus is the identity and never pops operators, so it leaves no trace.
                index += 1
                continue
            if symbol == "(":
                if len(open_parens) >= MAX_NESTING_DEPTH:
                    raise _too_deep(expression, start)
                open_parens.append(_OPEN_GROUP)
                operators.append(_OPEN_GROUP)
                index += 1
                continue
            break
        if symbol in _BINARY_SYMBOLS:
            if symbol != "^":
                # Left-associative: first pop operators that bind at least as tightly. `^` is
                # right-associative and the tightest, so it pops nothing.
                precedence = _PRECEDENCE[symbol]
                while operators and _PRECEDENCE.get(operators[-1], 0) >= precedence:
                    output.append(operators.pop())
            operators.append(symbol)
            expecting_operand = True
            index += 1
            continue
        if symbol == ")" and open_parens:
            top = operators.pop()
            while top != _OPEN_GROUP and top != _OPEN_CALL:
                output.append(top)
                top = operators.pop()
            if open_parens.pop() == _OPEN_CALL:
                output.append(_Call(call_names.pop(), call_nargs.pop()))
            index += 1
            continue
        if symbol == "," and open_parens and open_parens[-1] == _OPEN_CALL:
            while operators[-1] != _OPEN_CALL:
                output.append(operators.pop())
            call_nargs[-1] += 1
            expecting_operand = True
            index += 1
            continue
        break
    else:
        if expecting_operand:
            # Also the answer for empty and all-whitespace input; on the latter meval 0.2's nom-1
            # tokenizer hits end of input inside a token parser and panics, so there is no text
            # to copy.
            raise _SyntaxFailure("Missing argument at the end of expression.")
        if open_parens:
            missing = len(open_parens)
            noun = "parenthesis" if missing == 1 else "parentheses"
            raise _SyntaxFailure(f"Missing {missing} right {noun}.")
        output.extend(reversed(operators))
        return tuple(output)
    raise _SyntaxFailure(f"Unexpected token at byte {_byte_offset(expression, start)}.")


def _too_deep(expression: str, index: int) -> _SyntaxFailure:
    return _SyntaxFailure(
        f"Parentheses nested deeper than {MAX_NESTING_DEPTH} levels at byte "
        f"{_byte_offset(expression, index)}."
    )


# --- The plain fast path -------------------------------------------------------------------------
# Most expressions a cluster sends are plain: unsigned numbers joined by + - * / %, no name,
# parenthesis, sign or `^`. For those, meval's program is "fold the products left to right, then
# the sums", so the value comes without tokens or a program, by the same IEEE operations in the
# same order (`_fold_plain`).


def plain_value(expression: bytes) -> float | None:
    """The value of a plain expression (`PLAIN_EXPRESSION`, as UTF-8 bytes), exactly as meval
    computes it; None for any other expression (`evaluate_compute` answers those)."""
    if len(expression) > MAX_EXPRESSION_BYTES or _PLAIN.fullmatch(expression) is None:
        return None
    return evaluate_plain(expression)


def evaluate_plain(expression: bytes) -> float:
    """The value of `expression`, which the caller matched against `PLAIN_EXPRESSION` (or
    `PLAIN_JSON_EXPRESSION`) and bounded by `MAX_EXPRESSION_BYTES`."""
    operators = expression.translate(None, _NOT_OPERATORS)
    if _LOWER_E in operators or _UPPER_E in operators:  # an exponent, whose sign is no operator
        parts = _PLAIN_SPLIT.split(expression)
        operators = b"".join(parts[1::2])
        numbers = parts[::2]
    else:
        numbers = expression.translate(_OPERATORS_TO_SPACES).split()
    values = list(map(float, numbers))  # float() takes meval's whitespace around a number
    if not operators:
        return values[0]
    return _fold_plain(operators, values)


def _fold_plain(operators: bytes, values: list[float]) -> float:
    """Products (`* / %`) left to right within each sum term, then the sum (`+ -`) left to
    right: meval's program for a plain expression (`values` has one more item than
    `operators`). The hot path: constants are read into locals once, not per operator."""
    times, over, modulo, plus = _TIMES, _OVER, _MODULO, _PLUS
    term = values[0]
    total = 0.0
    adding = 0  # the + or - (as a byte) between `total` and `term`; 0 before the first
    for index, symbol in enumerate(operators, 1):
        value = values[index]
        if symbol == times:
            term *= value
        elif symbol == over:
            term = _divide(term, value)
        elif symbol == modulo:
            term = _remainder(term, value)
        else:
            if not adding:
                total = term
            elif adding == plus:
                total += term
            else:
                total -= term
            adding = symbol
            term = value
    if not adding:
        return term
    return total + term if adding == plus else total - term


_PLUS, _TIMES, _OVER, _MODULO, _LOWER_E, _UPPER_E = b"+*/%eE"


# --- Rust f64 semantics ---------------------------------------------------------------------
# Python's math functions call the same C library as Rust's f64 methods but raise where IEEE
# arithmetic returns nan or inf; these wrappers return what Rust returns.


def _divide(x: float, y: float) -> float:
    if y == 0.0:
        if x != x or x == 0.0:
            return _NAN
        return math.copysign(_INF, math.copysign(1.0, x) * math.copysign(1.0, y))
    return x / y


def _remainder(x: float, y: float) -> float:
    # Rust's `%` on f64 is C fmod: the sign of the dividend. Domain errors (x infinite, y zero)
    # are nan.
    try:
        return math.fmod(x, y)
    except ValueError:
        return _NAN


def _is_odd_integer(y: float) -> bool:
    return math.isfinite(y) and math.fmod(abs(y), 2.0) == 1.0


def _powf(x: float, y: float) -> float:
    try:
        return math.pow(x, y)
    except ValueError:
        # C pow: zero to a negative power is a pole; a negative base to a non-integer power is nan.
        if x == 0.0:
            return math.copysign(_INF, x) if _is_odd_integer(y) else _INF
        return _NAN
    except OverflowError:
        return -_INF if x < 0.0 and _is_odd_integer(y) else _INF


def _sqrt(x: float) -> float:
    try:
        return math.sqrt(x)
    except ValueError:
        return _NAN


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return _INF


def _ln(x: float) -> float:
    try:
        return math.log(x)
    except ValueError:
        return -_INF if x == 0.0 else _NAN


def _ln_1p(x: float) -> float:
    try:
        return math.log1p(x)
    except ValueError:
        return -_INF if x == -1.0 else _NAN


def _domain_nan(function: Callable[[float], float]) -> Callable[[float], float]:
    """Wrap a math function whose only failure is a domain error (nan in C)."""

    def call(x: float) -> float:
        try:
            return function(x)
        except ValueError:
            return _NAN

    call.__name__ = function.__name__
    return call


def _sinh(x: float) -> float:
    try:
        return math.sinh(x)
    except OverflowError:
        return math.copysign(_INF, x)


def _cosh(x: float) -> float:
    try:
        return math.cosh(x)
    except OverflowError:
        return _INF


def _load_c_hypot() -> Callable[[float, float], float]:
    # Rust's f64::hypot calls the C library's hypot; Python's math.hypot has its own algorithm and
    # differs in the last bit for about 1 input in 500. The interpreter has libm loaded already.
    try:
        c_hypot = ctypes.CDLL(None).hypot
    except (OSError, AttributeError, TypeError):
        return math.hypot
    c_hypot.restype = ctypes.c_double
    c_hypot.argtypes = (ctypes.c_double, ctypes.c_double)
    hypot: Callable[[float, float], float] = c_hypot
    return hypot


_hypot: Final = _load_c_hypot()


def _asinh(x: float) -> float:
    # Rust's std computes asinh itself (not with the C library's asinh), so do the same.
    ax = abs(x)
    ix = _divide(1.0, ax)
    return math.copysign(_ln_1p(ax + ax / (_hypot(1.0, ix) + ix)), x)


def _acosh(x: float) -> float:
    if x < 1.0:
        return _NAN
    return _ln(x + _sqrt(x - 1.0) * _sqrt(x + 1.0))


def _atanh(x: float) -> float:
    return 0.5 * _ln_1p(_divide(2.0 * x, 1.0 - x))


def _floor(x: float) -> float:
    if not abs(x) < _INTEGRAL_FROM:  # also true for nan
        return x
    return math.copysign(float(math.floor(x)), x)


def _ceil(x: float) -> float:
    if not abs(x) < _INTEGRAL_FROM:
        return x
    # The sign of x keeps ceil(-0.5) at -0.0, as in Rust.
    return math.copysign(float(math.ceil(x)), x)


def _round(x: float) -> float:
    # Rust rounds half away from zero; Python's round() rounds half to even.
    if not abs(x) < _INTEGRAL_FROM:
        return x
    whole = float(int(x))
    if abs(x - whole) >= 0.5:
        whole += math.copysign(1.0, x)
    return math.copysign(whole, x)


def _signum(x: float) -> float:
    # Rust: 1.0 for +0.0, -1.0 for -0.0, nan for nan.
    if x != x:
        return x
    return math.copysign(1.0, x)


def _max(values: list[float]) -> float:
    # meval folds from -inf with f64::max, which skips nan and keeps the earlier of equal values.
    result = -_INF
    for value in values:
        if value > result:
            result = value
    return result


def _min(values: list[float]) -> float:
    result = _INF
    for value in values:
        if value < result:
            result = value
    return result


_sin: Final = _domain_nan(math.sin)
_cos: Final = _domain_nan(math.cos)
_tan: Final = _domain_nan(math.tan)
_asin: Final = _domain_nan(math.asin)
_acos: Final = _domain_nan(math.acos)

_REAL_CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e}
_REAL_BINARY: Final[dict[str, Callable[[float, float], float]]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": _divide,
    "%": _remainder,
    "^": _powf,
}
_REAL_UNARY_FUNCTIONS: Final[dict[str, Callable[[float], float]]] = {
    "sqrt": _sqrt,
    "exp": _exp,
    "ln": _ln,
    "abs": math.fabs,
    "sin": _sin,
    "cos": _cos,
    "tan": _tan,
    "asin": _asin,
    "acos": _acos,
    "atan": math.atan,
    "sinh": _sinh,
    "cosh": _cosh,
    "tanh": math.tanh,
    "asinh": _asinh,
    "acosh": _acosh,
    "atanh": _atanh,
    "floor": _floor,
    "ceil": _ceil,
    "round": _round,
    "signum": _signum,
}
_REAL_BINARY_FUNCTIONS: Final[dict[str, Callable[[float, float], float]]] = {"atan2": math.atan2}
# meval registers these with "1 or more" arguments; a call always has at least one, so the arity
# check never fails for them.
_REAL_VARIADIC_FUNCTIONS: Final[dict[str, Callable[[list[float]], float]]] = {
    "max": _max,
    "min": _min,
}


def _run_real(program: _Program) -> float:
    stack: list[float] = []
    push = stack.append
    for item in program:
        if isinstance(item, float):
            push(item)
        elif isinstance(item, str):
            if item == "~":
                stack[-1] = -stack[-1]
            else:
                right = stack.pop()
                stack[-1] = _REAL_BINARY[item](stack[-1], right)
        elif isinstance(item, _Variable):
            value = _REAL_CONSTANTS.get(item.name)
            if value is None:
                raise ExpressionError(f"Evaluation error: unknown variable `{item.name}`.")
            push(value)
        else:
            push(_call_real(item, stack))
    return stack[0]


def _call_real(call: _Call, stack: list[float]) -> float:
    """Pop the call's arguments off `stack` and return the function's value."""
    name, nargs = call
    if name in _REAL_UNARY_FUNCTIONS:
        if nargs == 1:
            return _REAL_UNARY_FUNCTIONS[name](stack.pop())
        raise ExpressionError(f"Evaluation error: function `{name}`: Expected 1 arguments")
    if name in _REAL_BINARY_FUNCTIONS:
        if nargs == 2:
            second = stack.pop()
            return _REAL_BINARY_FUNCTIONS[name](stack.pop(), second)
        raise ExpressionError(f"Evaluation error: function `{name}`: Expected 2 arguments")
    if name in _REAL_VARIADIC_FUNCTIONS:
        arguments = stack[-nargs:]
        del stack[-nargs:]
        return _REAL_VARIADIC_FUNCTIONS[name](arguments)
    raise ExpressionError(f"Evaluation error: function `{name}`: Unknown function")


# --- num-complex 0.4 semantics ----------------------------------------------------------------
# Complex values are (re, im) pairs of floats, combined with num-complex's own formulas: Python's
# complex type rounds and signs zeros differently (e.g. it multiplies by a real without the
# cross terms, and it raises on division by zero).

_Complex = tuple[float, float]


def _c_add(a: _Complex, b: _Complex) -> _Complex:
    return (a[0] + b[0], a[1] + b[1])


def _c_sub(a: _Complex, b: _Complex) -> _Complex:
    return (a[0] - b[0], a[1] - b[1])


def _c_mul(a: _Complex, b: _Complex) -> _Complex:
    return (a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0])


def _c_div(a: _Complex, b: _Complex) -> _Complex:
    norm_sqr = b[0] * b[0] + b[1] * b[1]
    return (
        _divide(a[0] * b[0] + a[1] * b[1], norm_sqr),
        _divide(a[1] * b[0] - a[0] * b[1], norm_sqr),
    )


def _c_rem(a: _Complex, b: _Complex) -> _Complex:
    # Upstream's own rule, not num-complex's Rem: the real parts' remainder, a's imaginary part.
    return (_remainder(a[0], b[0]), a[1])


def _c_ln(z: _Complex) -> _Complex:
    return (_ln(_hypot(z[0], z[1])), math.atan2(z[1], z[0]))


def _c_exp(z: _Complex) -> _Complex:
    re_part, im_part = z
    # num-complex's corner cases for infinite and nan real parts.
    if math.isinf(re_part):
        if re_part < 0.0:
            if not math.isfinite(im_part):
                return (0.0, 0.0)
        elif im_part == 0.0 or not math.isfinite(im_part):
            return (re_part, _NAN if math.isinf(im_part) else im_part)
    elif re_part != re_part and im_part == 0.0:
        return z
    modulus = _exp(re_part)
    return (modulus * _cos(im_part), modulus * _sin(im_part))


def _c_pow(base: _Complex, exponent: _Complex) -> _Complex:
    # num-complex `powc`: exp(exponent * ln(base)), with anything to the power 0 being 1.
    if exponent[0] == 0.0 and exponent[1] == 0.0:
        return (1.0, 0.0)
    return _c_exp(_c_mul(exponent, _c_ln(base)))


_COMPLEX_BINARY: Final[dict[str, Callable[[_Complex, _Complex], _Complex]]] = {
    "+": _c_add,
    "-": _c_sub,
    "*": _c_mul,
    "/": _c_div,
    "%": _c_rem,
    "^": _c_pow,
}
_IMAGINARY_UNIT: Final[_Complex] = (0.0, 1.0)


def _run_complex(program: _Program) -> _Complex:
    stack: list[_Complex] = []
    push = stack.append
    for item in program:
        if isinstance(item, float):
            push((item, 0.0))
        elif isinstance(item, str):
            if item == "~":
                re_part, im_part = stack[-1]
                stack[-1] = (-re_part, -im_part)
            else:
                right = stack.pop()
                stack[-1] = _COMPLEX_BINARY[item](stack[-1], right)
        elif isinstance(item, _Variable):
            if item.name != "i":
                raise ExpressionError(f"unknown var {item.name}")
            push(_IMAGINARY_UNIT)
        else:
            raise ExpressionError("unsupported token")
    return stack[0]


# --- Rust Display formatting --------------------------------------------------------------------


def format_rust_f64(x: float) -> str:
    """Format like Rust's `Display` for f64: shortest round-trip digits, never an exponent.

    `3.0` -> `3`, `-0.0` -> `-0`, `1e21` -> `1000000000000000000000`, `1e-7` -> `0.0000001`,
    nan -> `NaN`, infinities -> `inf` and `-inf`.
    """
    if x != x:
        return "NaN"
    if x == _INF:
        return "inf"
    if x == -_INF:
        return "-inf"
    # Python's repr picks the same digits (shortest that round-trips, nearest on ties); only the
    # layout differs.
    text = repr(x)
    mantissa, _, exponent = text.partition("e")
    if not exponent:
        return text[:-2] if text.endswith(".0") else text
    sign = ""
    if mantissa[0] == "-":
        sign = "-"
        mantissa = mantissa[1:]
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + int(exponent)
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _format_parts(re_part: float, im_part: float) -> str:
    # num-complex prints `-` for a negative real part, and `-` instead of `+` for a negative
    # imaginary part; -0.0 is not negative (`<`), so its own Display sign shows: `-0+-0i`.
    real = "-" + format_rust_f64(-re_part) if re_part < 0.0 else format_rust_f64(re_part)
    if im_part < 0.0:
        return f"{real}-{format_rust_f64(-im_part)}i"
    return f"{real}+{format_rust_f64(im_part)}i"


def format_complex(z: complex) -> str:
    """Format like num-complex's `Display` for `Complex64`: `5+5i`, `0.5-1i`, `-0-1i`, `-1+-0i`."""
    return _format_parts(z.real, z.imag)


# --- Entry points ---------------------------------------------------------------------------------


class _Rejected(NamedTuple):
    message: str


# Outcomes of expressions up to this many characters are cached, which bounds the cache's memory
# (4096 entries of at most 512 characters); longer ones are rare and evaluated afresh. 512
# characters are at most 2048 UTF-8 bytes, so cached expressions need no length check.
_CACHED_LENGTH: Final = 512


def _compute(expression: str) -> float | _Rejected:
    if expression.isascii():
        value = plain_value(expression.encode("ascii"))
        if value is not None:
            return value
    try:
        return _run_real(_parse(expression))
    except _SyntaxFailure as failure:
        return _Rejected(f"Parse error: {failure}")
    except ExpressionError as error:
        return _Rejected(str(error))


def _complex(expression: str) -> str | _Rejected:
    try:
        return _format_parts(*_run_complex(_parse(expression)))
    except (_SyntaxFailure, ExpressionError) as error:
        return _Rejected(str(error))


_compute_cached: Final = lru_cache(maxsize=4096)(_compute)
_complex_cached: Final = lru_cache(maxsize=4096)(_complex)


def _too_long(expression: str) -> str | None:
    """The error text for an expression over the length limit, else None."""
    if not _utf8_length_exceeds(expression, MAX_EXPRESSION_BYTES):
        return None
    size = len(expression.encode("utf-8", "surrogatepass"))
    return f"Expression too long: {size} bytes (limit {MAX_EXPRESSION_BYTES})."


def evaluate_compute(expression: str) -> float:
    """Evaluate a `Compute` expression as meval 0.2's `eval_str` does.

    Returns the IEEE result, which may be nan or infinite (the caller answers those with an
    `Error`, since JSON cannot carry them). Raises `ExpressionError` with upstream's error text.
    """
    if len(expression) <= _CACHED_LENGTH:
        outcome = _compute_cached(expression)
    else:
        too_long = _too_long(expression)
        if too_long is not None:
            raise ExpressionError(f"Parse error: {too_long}")
        outcome = _compute(expression)
    if isinstance(outcome, _Rejected):
        # A fresh exception each time: re-raising a cached one would grow its traceback.
        raise ExpressionError(outcome.message)
    return outcome


def evaluate_complex(expression: str) -> str:
    """Evaluate a `ComplexMath` expression as upstream does and format the result like num-complex.

    Raises `ExpressionError` with upstream's error text (no `Parse error:` prefix here).
    """
    if len(expression) <= _CACHED_LENGTH:
        outcome = _complex_cached(expression)
    else:
        too_long = _too_long(expression)
        if too_long is not None:
            raise ExpressionError(too_long)
        outcome = _complex(expression)
    if isinstance(outcome, _Rejected):
        raise ExpressionError(outcome.message)
    return outcome
