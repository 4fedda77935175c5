"""Code mode: apply an LLM's search/replace edits to train.py and check that the result may run.

An edit may change anything in train.py except what makes trials comparable: the profile's
fixed constants (MAX_SEQ_LEN, TIME_BUDGET, FIXED_STEPS), loading the prepared data, the
evaluate_bpb call and the val_bpb it yields, and the summary block the runner parses. Those
lines must survive verbatim, val_bpb must be assigned exactly as often as before, and every
summary key must still be printed. The constants block must stay patchable (one literal per
searched constant) and inside the search space. After the run, `contract_violation` checks the
summary against the budget and the profile, since a static check cannot see everything. Nor
can it see through code written to evade it: what a trial may not do is enforced when it runs
(the fixed evaluation in the loop's process, the sandbox); these checks only turn the obvious
attempts into a repair round instead of a wasted trial.
"""
import ast
import difflib

from autoresearch.patch import PatchError, read_constants
from autoresearch.protocol import EVAL_FD_ENV, PROTECTED, SUMMARY_KEYS



class EditError(ValueError):
    """An edit that cannot be used, with a reason the model can act on."""


def apply_edits(source, edits):
    """source with each {"search", "replace"} applied in turn; each search text must occur
    exactly once in the text as edited so far."""
    if not isinstance(edits, list) or not edits:
        raise EditError('expected "edits": a non-empty list of {"search": ..., "replace": ...}')
    for i, edit in enumerate(edits, 1):
        if not (isinstance(edit, dict) and isinstance(edit.get("search"), str)
                and isinstance(edit.get("replace"), str)):
            raise EditError(f"edit {i} must be an object with string fields search and replace")
        search, replace = edit["search"], edit["replace"]
        if not search.strip():
            raise EditError(f"edit {i} has an empty search text")
        count = source.count(search)
        if count != 1:
            first = search.strip().splitlines()[0][:80]
            where = "does not occur" if count == 0 else f"occurs {count} times"
            raise EditError(f"edit {i}: the search text (starting {first!r}) {where} in train.py; "
                            f"copy it exactly, with enough lines to be unique")
        source = source.replace(search, replace)
    return source


def _strings(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _assignments_to(tree, name):
    count = 0
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr))
                   else [])
        for target in targets:
            count += sum(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))
    return count


def _harness_uses(tree):
    """What the file takes from the fixed harness: `from prepare import X`, `import prepare`,
    `prepare.X`, and assignments that would replace part of it (`data.evaluate_bpb = ...`)."""
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "prepare":
            uses |= {f"prepare.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            uses |= {f"import {a.name}" for a in node.names if a.name.split(".")[0] == "prepare"}
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "prepare"):
            uses.add(f"prepare.{node.attr}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Attribute) and target.attr == "evaluate_bpb":
                    uses.add("an assignment to evaluate_bpb")
    return uses


def check_edited(new, base, space, constants_default=None):
    """The searched constants of an edited train.py, or EditError saying what breaks the
    contract. constants_default maps a constant left at None to the profile's value."""
    try:
        tree = ast.parse(new)
    except SyntaxError as e:
        raise EditError(f"the edited train.py does not parse: {e.msg} (line {e.lineno})") from None
    base_lines = base.splitlines()
    new_lines = new.splitlines()
    for line in base_lines:
        if any(p.search(line) for p in PROTECTED) and new_lines.count(line) < base_lines.count(line):
            raise EditError(f"the line {line.strip()!r} is fixed (it makes trials comparable); "
                            f"leave it as it is")
    added = _harness_uses(tree) - _harness_uses(ast.parse(base))
    if added or new.count(EVAL_FD_ENV) > base.count(EVAL_FD_ENV):
        what = ", ".join(sorted(added)) or EVAL_FD_ENV
        raise EditError(f"prepare.py is the fixed harness: use only what train.py already takes "
                        f"from it, unchanged (not {what})")
    if _assignments_to(tree, "val_bpb") != _assignments_to(ast.parse(base), "val_bpb"):
        raise EditError("val_bpb must come from evaluate_bpb alone; do not assign it elsewhere")
    printed = [s.lstrip() for s in _strings(tree)]
    missing = [k for k in SUMMARY_KEYS if not any(s.startswith(f"{k}:") for s in printed)]
    if missing or "---" not in printed:
        raise EditError(f"the summary block must stay (missing: {', '.join(missing) or '---'})")
    try:
        params = read_constants(new, list(space.params))
    except PatchError as e:
        raise EditError(f"the constants block must stay one literal per constant: {e}") from None
    defaults = constants_default or {}
    params = {k: defaults.get(k, v) if v is None else v for k, v in params.items()}
    for name, value in params.items():
        if not space.params[name].contains(value):
            raise EditError(f"{name}={value!r} is outside the search space")
    return params


def diff(base, new):
    """A unified diff of train.py and (added, removed) line counts."""
    lines = list(difflib.unified_diff(base.splitlines(keepends=True), new.splitlines(keepends=True),
                                      "train.py", "train.py (trial)"))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return "".join(lines), added, removed


def contract_violation(summary, budget, profile, slack=0.1, grace_seconds=5.0):
    """Why a code-edited trial's summary cannot be compared with the others, or None: it
    trained past the budget, or on another profile."""
    seconds = summary.get("training_seconds", 0.0)
    if seconds > budget * (1 + slack) + grace_seconds:
        return f"trained {seconds:.1f}s, past the {budget:g}s budget"
    if summary.get("profile", profile) != profile:
        return f"reported profile {summary.get('profile')!r}, not {profile!r}"
    return None
