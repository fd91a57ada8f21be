"""A small JSON Schema validator for the subset ``leaderboard.schema.json`` uses (``type``, ``enum``, ``minimum``,
``maximum``, ``pattern``, ``required``, ``properties``, ``additionalProperties``, ``items``, ``minItems``,
``maxItems``, local ``$ref``), so validating the leaderboard needs no extra dependency."""
import json
import re
from typing import Any, Dict, List

__all__ = ['validate', 'load_schema']

_TYPES = {
    'null': lambda v: v is None,
    'boolean': lambda v: isinstance(v, bool),
    'integer': lambda v: isinstance(v, int) and not isinstance(v, bool),
    'number': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    'string': lambda v: isinstance(v, str),
    'array': lambda v: isinstance(v, list),
    'object': lambda v: isinstance(v, dict),
}


def load_schema(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def validate(instance: Any, schema: Dict) -> List[str]:
    """Every violation of ``schema`` by ``instance``, as ``'$.path: problem'`` strings (empty when valid)."""
    errors: List[str] = []
    _check(instance, schema, schema, '$', errors)
    return errors


def _resolve(ref: str, root: Dict) -> Dict:
    if not ref.startswith('#/'):
        raise ValueError(f'only local $ref are supported, got {ref!r}')
    node = root
    for part in ref[2:].split('/'):
        node = node[part]
    return node


def _check(value: Any, schema: Dict, root: Dict, path: str, errors: List[str]) -> None:
    if '$ref' in schema:
        _check(value, _resolve(schema['$ref'], root), root, path, errors)
    if 'type' in schema:
        types = schema['type'] if isinstance(schema['type'], list) else [schema['type']]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f'{path}: expected {" or ".join(types)}, got {type(value).__name__} {value!r:.60}')
            return
    if 'enum' in schema and value not in schema['enum']:
        errors.append(f'{path}: {value!r} is not one of {schema["enum"]}')
    if _TYPES['number'](value):
        if 'minimum' in schema and value < schema['minimum']:
            errors.append(f'{path}: {value} < minimum {schema["minimum"]}')
        if 'maximum' in schema and value > schema['maximum']:
            errors.append(f'{path}: {value} > maximum {schema["maximum"]}')
    if isinstance(value, str) and 'pattern' in schema and not re.search(schema['pattern'], value):
        errors.append(f'{path}: {value!r} does not match {schema["pattern"]}')
    if isinstance(value, list):
        if len(value) < schema.get('minItems', 0):
            errors.append(f'{path}: {len(value)} items, fewer than {schema["minItems"]}')
        if 'maxItems' in schema and len(value) > schema['maxItems']:
            errors.append(f'{path}: {len(value)} items, more than {schema["maxItems"]}')
        if 'items' in schema:
            for i, item in enumerate(value):
                _check(item, schema['items'], root, f'{path}[{i}]', errors)
    if isinstance(value, dict):
        errors += [f'{path}: missing required {key!r}' for key in schema.get('required', []) if key not in value]
        properties = schema.get('properties', {})
        extra = schema.get('additionalProperties', True)
        for key, item in value.items():
            if key in properties:
                _check(item, properties[key], root, f'{path}.{key}', errors)
            elif extra is False:
                errors.append(f'{path}: unexpected property {key!r}')
            elif isinstance(extra, dict):
                _check(item, extra, root, f'{path}.{key}', errors)
