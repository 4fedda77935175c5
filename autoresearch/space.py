"""search_space.yaml: parse, validate against train.py, sample, mutate, check constraints.

The file has one section per profile:

    cpu:
      mutate: [2, 4]                      # constants one greedy step changes (min, max)
      params:
        MATRIX_LR: {low: 0.01, high: 0.12, log: true}
        DEPTH: {choices: [2, 3, 4]}
        DEVICE_BATCH_SIZE: {low: 4, high: 64, log: true, int: true}
      constraints:
        - TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN) == 0

Constraints are small expressions over train.py's constants and the profile's MAX_SEQ_LEN,
TIME_BUDGET, EVAL_TOKENS and VOCAB_SIZE, evaluated by a walker that knows arithmetic,
comparisons, and/or/not and len(), and nothing else: no eval, no attribute access, no calls.
"""
import ast
import math
import operator
from dataclasses import dataclass, field

import yaml


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the entry."""


@dataclass
class Param:
    name: str
    choices: list = None      # a list of values, or
    low: float = None         # a numeric range
    high: float = None
    log: bool = False
    integer: bool = False

    def sample(self, rng):
        if self.choices is not None:
            return self.choices[rng.randrange(len(self.choices))]
        if self.log:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        return self._snap(x)

    def near(self, value, rng, width=0.25):
        """A value different from `value`, close to it on the range's scale."""
        if self.choices is not None:
            others = [c for c in self.choices if c != value]
            return others[rng.randrange(len(others))] if others else value
        for _ in range(20):
            if self.log:
                span = width * (math.log(self.high) - math.log(self.low))
                centre = math.log(min(max(value, self.low), self.high))
                x = math.exp(centre + rng.uniform(-span, span))
            else:
                span = width * (self.high - self.low)
                x = value + rng.uniform(-span, span)
            x = self._snap(min(max(x, self.low), self.high))
            if x != value:
                return x
        return self.sample(rng)

    def _snap(self, x):
        if self.integer:
            return int(round(x))
        return float(f"{x:.3g}")  # readable values in train.py and results.tsv

    def json_schema(self):
        """The allowed values as JSON Schema: an enum of the choices (tuples as arrays), else a
        number or integer with minimum and maximum."""
        if self.choices is not None:
            return {"enum": [list(c) if isinstance(c, tuple) else c for c in self.choices]}
        return {"type": "integer" if self.integer else "number",
                "minimum": self.low, "maximum": self.high}

    def contains(self, value):
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return self.low <= value <= self.high


@dataclass
class Space:
    profile: str
    params: dict                        # name -> Param
    constraints: list = field(default_factory=list)  # [(text, parsed expression)]
    mutate_min: int = 2
    mutate_max: int = 4

    def violations(self, config):
        """Texts of the constraints that config (every constant + profile values) breaks."""
        return [text for text, tree in self.constraints if not evaluate(tree, config)]

    def sample(self, rng):
        return {name: p.sample(rng) for name, p in self.params.items()}

    def json_schema(self):
        """Changes to a configuration as JSON Schema: some searched constants, each with its
        allowed values, nothing else. The cross-constant constraints are not expressible here."""
        return {"type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {name: p.json_schema() for name, p in self.params.items()}}

    def mutate(self, base, rng):
        """Changes to `base`: between mutate_min and mutate_max constants, each to a value near
        its current one; at least one really differs."""
        movable = [n for n, p in self.params.items() if p.near(base[n], rng) != base[n]]
        if not movable:
            return {}
        k = rng.randint(min(self.mutate_min, len(movable)), min(self.mutate_max, len(movable)))
        return {n: self.params[n].near(base[n], rng) for n in rng.sample(movable, k)}


# ---------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------

PROFILE_NAMES = ("MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE")
_PARAM_KEYS = {"choices", "low", "high", "log", "int"}


def load_space(path, profile, constants):
    """The section of `path` for `profile`, validated against train.py's effective constants
    (`constants`: name -> value, profile defaults filled in) and the profile's own values."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpaceError(f"no search space file {path}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or profile not in doc:
        have = ", ".join(doc) if isinstance(doc, dict) else "nothing"
        raise SpaceError(f"{path} has no section for profile {profile!r} (it has: {have})")
    return parse_space(doc[profile], profile, constants, where=f"{path}: {profile}")


def parse_space(section, profile, constants, where="search space"):
    if not isinstance(section, dict) or not isinstance(section.get("params"), dict) \
            or not section["params"]:
        raise SpaceError(f"{where}: needs a non-empty 'params' mapping")
    unknown = set(section) - {"params", "constraints", "mutate"}
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    params = {name: _parse_param(name, spec, constants, f"{where}: {name}")
              for name, spec in section["params"].items()}
    mutate = section.get("mutate", [2, 4])
    if not (isinstance(mutate, list) and len(mutate) == 2 and all(isinstance(m, int) for m in mutate)
            and 1 <= mutate[0] <= mutate[1]):
        raise SpaceError(f"{where}: mutate must be [min, max] with 1 <= min <= max, not {mutate!r}")
    names = set(constants)
    constraints = []
    for text in section.get("constraints") or []:
        if not isinstance(text, str):
            raise SpaceError(f"{where}: constraint {text!r} must be a string")
        try:
            tree = ast.parse(text, mode="eval")
            _check(tree.body, names)
        except (SyntaxError, SpaceError) as e:
            raise SpaceError(f"{where}: constraint {text!r} cannot be used: "
                             f"{e.msg if isinstance(e, SyntaxError) else e}") from None
        constraints.append((text, tree.body))
    space = Space(profile, params, constraints, mutate[0], mutate[1])
    broken = space.violations(constants)
    if broken:
        raise SpaceError(f"{where}: train.py's current values break constraint(s): "
                         f"{'; '.join(broken)}")
    return space


def _parse_param(name, spec, constants, where):
    if name not in constants or name in PROFILE_NAMES:
        raise SpaceError(f"{where}: train.py has no top-level constant {name} to search (or it "
                         f"is assigned twice, or not to a literal)")
    current = constants[name]
    if not isinstance(spec, dict) or not spec or set(spec) - _PARAM_KEYS:
        raise SpaceError(f"{where}: expected {{choices: [...]}} or {{low:, high:, log:, int:}}, "
                         f"got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        if isinstance(current, tuple):
            choices = [tuple(c) if isinstance(c, list) else c for c in choices]
        for c in choices:
            if not _same_kind(c, current):
                raise SpaceError(f"{where}: choice {c!r} is a {type(c).__name__}, but train.py's "
                                 f"{name} is a {type(current).__name__} ({current!r})")
        return Param(name, choices=choices)
    if not {"low", "high"} <= set(spec):
        raise SpaceError(f"{where}: a range needs both low and high")
    low, high = spec["low"], spec["high"]
    integer = bool(spec.get("int", False))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise SpaceError(f"{where}: low and high must be numbers")
    if not low < high:
        raise SpaceError(f"{where}: low ({low}) must be below high ({high})")
    if spec.get("log") and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0")
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise SpaceError(f"{where}: train.py's {name} is {current!r}, not a number")
    if isinstance(current, int) and not integer:
        raise SpaceError(f"{where}: train.py's {name} is an integer; add int: true")
    if isinstance(current, float) and integer:
        raise SpaceError(f"{where}: train.py's {name} is a float; drop int: true")
    return Param(name, low=low, high=high, log=bool(spec.get("log", False)), integer=integer)


def _same_kind(value, current):
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(current, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, tuple):
        return isinstance(value, tuple) and len(value) == len(current)
    return isinstance(value, type(current))


# ---------------------------------------------------------------------------
# The constraint walker
# ---------------------------------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


def _check(node, names):
    """Reject, before anything runs, every construct the walker does not evaluate."""
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, names)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, names)
        _check(node.right, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        _check(node.operand, names)
    elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        for v in [node.left, *node.comparators]:
            _check(v, names)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise SpaceError(f"unknown name {node.id}")
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        pass
    elif isinstance(node, (ast.Tuple, ast.List)):
        for v in node.elts:
            _check(v, names)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"
          and len(node.args) == 1 and not node.keywords):
        _check(node.args[0], names)
    else:
        raise SpaceError(f"{ast.unparse(node)!r} is not allowed (arithmetic, comparisons, "
                         f"and/or/not, len() and constant names only)")


def evaluate(node, env):
    if isinstance(node, ast.BoolOp):
        values = (evaluate(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left, env), evaluate(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise SpaceError(f"exponent {right} too large in {ast.unparse(node)!r}")
        try:
            return _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            return math.nan  # compares false: a config dividing by zero is not valid
    if isinstance(node, ast.UnaryOp):
        v = evaluate(node.operand, env)
        return (not v) if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = evaluate(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(evaluate(v, env) for v in node.elts)
    if isinstance(node, ast.Call):
        return len(evaluate(node.args[0], env))
    raise SpaceError(f"cannot evaluate {ast.unparse(node)!r}")
