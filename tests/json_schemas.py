"""JSON Schemas for structured output: every kind a grammar has to enforce (nested objects, arrays, enums, consts,
required and optional properties, bounded integers and numbers, anyOf and oneOf, $ref, patterns, formats, tuples).
Strings and arrays are bounded, so that every reply ends well within the token limits the tests give, whatever a
tiny model makes of the prompt."""

NAME = {"type": "string", "maxLength": 24}
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10},
        "y": {"type": "integer", "minimum": -10, "maximum": 10},
    },
    "required": ["x", "y"],
}

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    },
    "bounded_int_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 1,
        "maxItems": 5,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "any_of_scalar": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 10}]},
    "flags": {
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 1000}},
        "required": ["done", "count"],
    },
    "unit_interval": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
    },
    "negative_range": {
        "type": "object",
        "properties": {"celsius": {"type": "number", "minimum": -40, "maximum": -10}},
        "required": ["celsius"],
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["n"],
    },
    "order_lines": {
        "type": "object",
        "properties": {
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 8},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                },
                "maxItems": 3,
            }
        },
        "required": ["lines"],
    },
    "const_and_enum": {
        "type": "object",
        "properties": {
            "kind": {"const": "event"},
            "day": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]},
        },
        "required": ["kind", "day"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["title"],
    },
    "refs": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "string_lengths": {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 6}},
        "required": ["code"],
    },
    "nullable": {
        "type": "object",
        "properties": {"note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}},
        "required": ["note"],
    },
    "matrix": {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    "mixed_enum": {"type": "object", "properties": {"level": {"enum": [1, 2, 3, "max"]}}, "required": ["level"]},
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": 0, "maximum": 100}],
    },
    "date": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    "year": {
        "type": "object",
        "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        "required": ["year"],
    },
    "one_of_shapes": {
        "type": "object",
        "properties": {
            "shape": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"radius": {"type": "integer", "minimum": 1, "maximum": 100}},
                        "required": ["radius"],
                    },
                    {
                        "type": "object",
                        "properties": {"side": {"type": "integer", "minimum": 1, "maximum": 100}},
                        "required": ["side"],
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "wide_number": {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100000}},
        "required": ["price"],
    },
}
