"""A JSON Schema → the llama.cpp grammar (GBNF) that lets through only JSON that validates against it.

llama-cpp-python's SchemaConverter does most of the work, but it passes over some keywords without a word (the bounds
of numbers, multipleOf, not, uniqueItems...), which would leave the reply free to break them. Here the bounds of
numbers become grammar rules of their own, and a schema with a keyword the grammar cannot enforce is refused with
its place in the schema, so a reply is never less constrained than its schema says.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

# Keywords that constrain JSON in ways a grammar built by SchemaConverter does not enforce.
UNENFORCEABLE = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "unevaluatedProperties",
    "unevaluatedItems",
)
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
MAX_DIGITS = 16  # the most digits SchemaConverter's numbers have before the point
FRACTION = '("." [0-9]{1,16})?'
# A character inside a JSON string: SchemaConverter's lets control characters through raw (a newline, say), which
# JSON forbids; they must be escaped.
JSON_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', []
)


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message says where and why."""


def json_grammar(schema: Any) -> str:
    """The GBNF grammar for a JSON Schema; SchemaError for one that cannot be enforced."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    _check(schema, "schema")
    converter = _BoundedConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "")
    except SchemaError:
        raise
    except Exception as ex:  # the converter's asserts and KeyErrors, for what it cannot express
        raise SchemaError(f"{type(ex).__name__}: {str(ex)[:300]}") from None
    return converter.format_grammar()


def _check(node: Any, where: str) -> None:
    """Refuses the keywords the grammar would not enforce, in this schema and every schema inside it."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise SchemaError(f"{where} must be a schema (a JSON object), not {json.dumps(node)[:60]}")
    for keyword in UNENFORCEABLE:
        if keyword in node:
            raise SchemaError(f"{where} uses '{keyword}', which the grammar cannot enforce")
    kind = node.get("type")
    if isinstance(kind, list) and len(node) > 1 + ("description" in node) + ("title" in node):
        raise SchemaError(f"{where}: a list of types with other keywords; write it as anyOf, one schema per type")
    if any(bound in node for bound in BOUNDS) and kind not in ("integer", "number"):
        raise SchemaError(f"{where}: bounds need 'type': 'integer' or 'number'")
    if ("minLength" in node or "maxLength" in node) and ("pattern" in node or "format" in node):
        raise SchemaError(f"{where}: a length with a pattern or format; put the length in the pattern")
    for keyword in SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(keyword) or []):
            _check(sub, f"{where}.{keyword}[{i}]")
    for keyword in SUBSCHEMA_MAPS:
        for name, sub in (node.get(keyword) or {}).items():
            _check(sub, f"{where}.{keyword}.{name}")
    for keyword in ("items", "additionalProperties"):
        if isinstance(node.get(keyword), dict):
            _check(node[keyword], f"{where}.{keyword}")


class _BoundedConverter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, JSON_CHAR if name == "char" else rule)

    def visit(self, schema: dict, name: str) -> str:
        if schema.get("type") in ("integer", "number") and any(bound in schema for bound in BOUNDS):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, _number_rule(schema))
        return super().visit(schema, name)


def _number_rule(schema: dict) -> str:
    """The grammar for an integer, or a number without an exponent, within the schema's bounds."""
    whole = schema["type"] == "integer"
    low, high = (
        _bound(schema, "minimum", "exclusiveMinimum", whole, 1),
        _bound(schema, "maximum", "exclusiveMaximum", whole, -1),
    )
    if low is not None and high is not None and low > high:
        raise SchemaError(f"no number lies within the bounds of {json.dumps(schema)[:100]}")
    magnitude = _integers if whole else _decimals
    alternatives = []
    if high is None or high >= 0:
        alternatives += magnitude(max(low, 0) if low is not None else 0, high)
    if low is None or low < 0:  # negatives, by their magnitude
        smallest = max(-high, 0 if not whole else 1) if high is not None else (1 if whole else 0)
        alternatives.append('"-" ' + _group(magnitude(smallest, None if low is None else -low)))
    return _group(alternatives) + " space"


def _bound(schema: dict, inclusive: str, exclusive: str, whole: bool, inward: int) -> int | None:
    """A bound as a whole number, moved inward by one where it is exclusive (integers only)."""
    value, strict = (schema[exclusive], True) if exclusive in schema else (schema.get(inclusive), False)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"'{exclusive if strict else inclusive}' must be a number, not {json.dumps(value)}")
    if whole:
        bound = int(-(-value // 1)) if inward > 0 else int(value // 1)  # the whole numbers inside
        return bound + inward if strict and bound == value else bound
    if strict or not float(value).is_integer():
        raise SchemaError(
            f"a number's bounds must be inclusive whole numbers for the grammar to enforce them, not "
            f"{exclusive if strict else inclusive} {value}; use type integer, or whole-number minimum/maximum"
        )
    return int(value)


def _integers(low: int, high: int | None) -> list[str]:
    """Alternatives matching the whole numbers from low to high (None: up to MAX_DIGITS digits), no leading zeros."""
    top = high if high is not None else 10**MAX_DIGITS - 1
    alternatives = []
    for digits in range(len(str(low)), len(str(top)) + 1):
        a, b = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(top, 10**digits - 1)
        if a <= b:
            alternatives += _same_length(str(a), str(b))
    return alternatives


def _decimals(low: int, high: int | None) -> list[str]:
    """Alternatives matching the decimals from low to high (whole numbers, high None: no limit)."""
    if high is None:
        return [_group(_integers(low, None)) + " " + FRACTION]
    alternatives = [_group(_integers(low, high - 1)) + " " + FRACTION] if high > low else []
    return alternatives + [f'"{high}" ("." "0"{{1,16}})?']


def _same_length(a: str, b: str) -> list[str]:
    """Alternatives matching the digit strings of a's length from a to b."""
    if a == b:
        return [f'"{a}"']
    rest = len(a) - 1
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return [f"[{a[0]}-{b[0]}]" + " [0-9]" * rest]
    if a[0] == b[0]:
        return [f'"{a[0]}" ' + _group(_same_length(a[1:], b[1:]))]
    alternatives = [f'"{a[0]}" ' + _group(_same_length(a[1:], "9" * rest))]
    between = range(int(a[0]) + 1, int(b[0]))
    if between:
        first = f'"{between[0]}"' if len(between) == 1 else f"[{between[0]}-{between[-1]}]"
        alternatives.append(first + " [0-9]" * rest)
    return alternatives + [f'"{b[0]}" ' + _group(_same_length("0" * rest, b[1:]))]


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"
