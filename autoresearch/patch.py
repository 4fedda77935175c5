"""Read and write train.py's constants through Python's syntax tree, never with regexes.

Only top-level `NAME = <literal>` assignments are touched. A new value replaces exactly the
characters of the old value's expression, so comments, spacing and everything else survive;
the result is parsed again and must read back the values written.
"""
import ast
import operator
from functools import lru_cache


class PatchError(ValueError):
    """A constant that is missing, duplicated or not a literal, or a value we cannot write."""


_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


def literal_value(node):
    """A literal, or plain arithmetic on numbers such as 2**19 (the way batch sizes are written)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left, right = literal_value(node.left), literal_value(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _ARITH[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -literal_value(node.operand)
    return ast.literal_eval(node)


def _assignments(tree):
    """name -> [value nodes] for every top-level single-name assignment."""
    found = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            found.setdefault(stmt.targets[0].id, []).append(stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
            found.setdefault(stmt.target.id, []).append(stmt.value)
    return found


def _parse(source, what="train.py"):
    try:
        return ast.parse(source)
    except SyntaxError as e:
        raise PatchError(f"{what} does not parse: {e}") from None


@lru_cache(maxsize=256)
def _constants_of(source):
    """The top-level assignments of a source text. Parsing train.py takes milliseconds and the
    loop asks about the same few texts many times per trial, so parses are remembered (the
    nodes are only ever read)."""
    return _assignments(_parse(source))


def _constant_node(assignments, name):
    nodes = assignments.get(name)
    if not nodes:
        raise PatchError(f"train.py has no top-level constant {name}")
    if len(nodes) > 1:
        raise PatchError(f"train.py assigns {name} {len(nodes)} times at top level; "
                         f"keep one assignment so a patch is unambiguous")
    return nodes[0]


def read_constants(source, names=None):
    """{name: value} for `names` (each must exist once and be a literal), or for every top-level
    literal constant in UPPER_CASE when names is None."""
    assignments = _constants_of(source)
    if names is None:
        out = {}
        for name, nodes in assignments.items():
            if name.isupper() and len(nodes) == 1:
                try:
                    out[name] = literal_value(nodes[0])
                except (ValueError, TypeError, SyntaxError):
                    pass
        return out
    out = {}
    for name in names:
        node = _constant_node(assignments, name)
        try:
            out[name] = literal_value(node)
        except (ValueError, TypeError, SyntaxError):
            raise PatchError(f"train.py's {name} is not a literal (line {node.lineno}): "
                             f"{ast.unparse(node)}") from None
    return out


def render(value):
    """Python source for a value, or PatchError for anything that is not a plain literal."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise PatchError(f"cannot write {value!r} as a literal")
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = ", ".join(render(v) for v in value)
        if isinstance(value, list):
            return f"[{items}]"
        return f"({items},)" if len(value) == 1 else f"({items})"
    raise PatchError(f"cannot write a {type(value).__name__} ({value!r}) into train.py")


def patch_constants(source, changes):
    """train.py source with each name in `changes` set to its value."""
    if not changes:
        return source
    assignments = _constants_of(source)
    edits = []
    for name, value in changes.items():
        node = _constant_node(assignments, name)
        try:
            literal_value(node)
        except (ValueError, TypeError, SyntaxError):
            raise PatchError(f"train.py's {name} is not a literal (line {node.lineno}); "
                             f"it cannot be patched") from None
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                      render(value)))
    # ast offsets count UTF-8 bytes, so edit bytes; from the end backwards, offsets stay valid.
    lines = source.encode("utf-8").splitlines(keepends=True)
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        first, last = lines[lineno - 1], lines[end_lineno - 1]
        lines[lineno - 1:end_lineno] = [first[:col] + text.encode("utf-8") + last[end_col:]]
    result = b"".join(lines).decode("utf-8")
    written = read_constants(result, list(changes))
    for name, value in changes.items():
        want = tuple(value) if isinstance(value, list) else value
        got = tuple(written[name]) if isinstance(written[name], list) else written[name]
        if got != want or type(got) is not type(want):
            raise PatchError(f"patching {name} read back {written[name]!r}, not {value!r}")
    return result
