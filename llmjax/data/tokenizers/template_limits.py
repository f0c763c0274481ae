"""Limits on rendering a chat template: a template comes with a downloaded model, so it must not be able to
make us run for hours, fill the memory or read other files.

`LimitedEnvironment` is Jinja's immutable sandbox (no attribute escapes, no mutation of the inputs) with:

- a budget of `MAX_STEPS` steps per render: every loop iteration, call and filter is one step, so nested
  `range(100000)` loops or exponentially recursing macros stop after about a second;
- no string, list or number bigger than `MAX_CHARS` characters (items; `MAX_INT_BITS` bits for integers)
  built by `*`, `**`, `+`, `~`, `%`, a filter or a method call (`{{ 'a' * 4000000000 }}` is refused before
  Python allocates it: the sizes are checked from the operands), and no integer argument over `MAX_CHARS`
  to a filter or a string method (`center(10**9)`);
- at most `MAX_CHARS` characters of output;
- `range()` over more than Jinja's `MAX_RANGE` (100,000) items and `include` / `import` / `extends` refused.

Every limit is a `jinja2.exceptions.SecurityError` (a `TemplateError`) that names the value and the bound;
`llmjax.data.tokenizers.chat_template` reports it with the template's file like any other template error.
The limits are far above what real chat templates need (a few steps per message); they are constants here.
"""

from __future__ import annotations

import contextvars
import functools
import re
from typing import Any

import jinja2
import jinja2.nodes as nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

MAX_STEPS = 200_000  # loop iterations + calls + filters per render
MAX_CHARS = 4_000_000  # characters of output; items of any string or list built while rendering
MAX_INT_BITS = 100_000  # bits of any integer built (about 30,000 decimal digits)
_LOOP_FILTER, _SIZE_FILTER = "_llmjax_loop", "_llmjax_size"
_FORBIDDEN = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "import",
              nodes.Extends: "extends"}
_DIGITS = re.compile(r"\d+")
_steps: contextvars.ContextVar[list[int]] = contextvars.ContextVar("template_steps")


def _step() -> None:
    budget = _steps.get(None)
    if budget is None:
        return
    budget[0] += 1
    if budget[0] > MAX_STEPS:
        raise SecurityError(f"more than {MAX_STEPS:,} loop iterations and calls in one render (the limit)")


def _size(value: Any) -> int:
    """Characters of a string, items of a list/tuple/dict, 0 for anything else (ints: see `_check_int`)."""
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise SecurityError(f"{what} would hold {n:,} characters/items, more than the limit of {MAX_CHARS:,}")


def _check_int(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"{what} would be an integer of about {bits:,} bits, more than the limit of "
                            f"{MAX_INT_BITS:,}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_format(text: str, what: str) -> None:
    """A %-format or str.format string with a width or precision over MAX_CHARS (`'%0999999999d'`)."""
    for digits in _DIGITS.findall(text):
        if len(digits) > 7 or int(digits) > MAX_CHARS:
            raise SecurityError(f"{what}: the width {digits} in the format string is over the limit of {MAX_CHARS:,}")


def _check_args(args: tuple, kwargs: dict[str, Any], what: str) -> None:
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_CHARS:
            raise SecurityError(f"{what}: the argument {value} is over the limit of {MAX_CHARS:,}")


def _limited_filter(name: str, fn: Any) -> Any:
    """`fn` with its integer arguments and its result's size checked, counted as a step."""
    if getattr(fn, "_llmjax_limited", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _step()
        first = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # a context/environment argument
        _check_args(args[first + 1:], kwargs, f"the filter {name}")
        out = fn(*args, **kwargs)
        _check_size(_size(out), f"the filter {name}'s result")
        return out

    wrapped._llmjax_limited = True  # type: ignore[attr-defined]
    return wrapped


def _loop(iterable: Any) -> Any:
    """A for loop's iterable, one step per item."""
    for item in iterable:
        _step()
        yield item


def _sized(value: Any) -> Any:
    """A `~` concatenation's result, checked (its operands were)."""
    _check_size(_size(value), "a ~ concatenation")
    return value


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the limits of this module. Call `limit_filters()` after adding filters."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters[_LOOP_FILTER] = _loop
        self.filters[_SIZE_FILTER] = _sized
        self.limit_filters()

    def limit_filters(self) -> None:
        """Wrap every filter (the defaults and any added since) in the argument and result checks."""
        for name, fn in list(self.filters.items()):
            if name not in (_LOOP_FILTER, _SIZE_FILTER):
                self.filters[name] = _limited_filter(name, fn)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for kind, word in _FORBIDDEN.items():
            for node in tree.find_all(kind):
                raise TemplateSyntaxError(f"'{word}' is not allowed in a chat template (it is one file that reads "
                                          "no other)", node.lineno, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            concat.nodes = [nodes.Filter(n, _SIZE_FILTER, [], [], None, None, lineno=concat.lineno)
                            for n in concat.nodes]
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        what = f"{operator!r}"
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(n):
                    _check_size(len(seq) * max(n, 0), f"a {what} repetition")
            if _is_int(left) and _is_int(right):
                _check_int(left.bit_length() + right.bit_length(), f"a {what} product")
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
                _check_int(right * left.bit_length() if right < 2 ** 40 else 2 ** 40, f"a {what} power")
        elif operator == "+":
            if _size(left) and _size(right):
                _check_size(_size(left) + _size(right), f"a {what} concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, "a % format")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        _step()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function
        owner = getattr(method, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)):  # a method of a value: 'a'.ljust(10**9), s.format(...)
            _check_args(args, kwargs, f"the method {getattr(__obj, '__name__', '?')}")
            if isinstance(owner, str) and getattr(method, "__name__", "") in ("format", "format_map"):
                _check_format(owner, "a format string")
        try:
            out = super().call(__context, __obj, *args, **kwargs)
        except OverflowError:  # the sandbox's range() over MAX_RANGE items
            shown = ", ".join(map(str, args))
            raise SecurityError(f"range({shown}): more than {MAX_RANGE:,} items "
                                "(the limit)") from None
        _check_size(_size(out), f"the result of {getattr(__obj, '__name__', 'a call')}")
        return out


def render_limited(template: jinja2.Template, **variables: Any) -> str:
    """`template.render(**variables)` within the limits (SecurityError, a TemplateError, past one).

    Errors of the template's own Python operations (a TypeError adding a number to a string, a ValueError
    printing an integer of more than 4,300 digits) are TemplateErrors too."""
    token = _steps.set([0])
    try:
        pieces, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            _check_size(n, "the rendered text")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError:
        raise
    except (ArithmeticError, ValueError, TypeError, LookupError, AttributeError) as e:
        raise TemplateError(f"{type(e).__name__}: {e}") from None
    finally:
        _steps.reset(token)
