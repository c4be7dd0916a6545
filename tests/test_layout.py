"""The package's shape: no import cycles between eopd's modules, and no module too long to read."""

import ast
from pathlib import Path

import eopd

PACKAGE = Path(eopd.__file__).resolve().parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """eopd module -> the eopd modules it imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from eopd.objectives import divergences` imports the submodule, not only the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import eopd.objectives.x.y` -> the module part
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_eopd_has_no_import_cycle():
    graph = import_graph()
    assert "eopd.module" in graph and "eopd.placement" in graph["eopd.module"]  # the reader works
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_in_eopd_is_longer_than_500_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules along a seam (limit {MAX_LINES} lines): {long}"


MAX_FUNCTION_LINES = 60
# Functions longer than the limit when it was set, each at most as long as it was then: none may grow, and
# each entry goes when its function is split into named steps (the redesign's work list, longest first).
LONG_FUNCTIONS = {
    "eopd/train.py:run": 280,
    "eopd/objectives/objective.py:_run": 187,
    "eopd/plan.py:plan": 182,
    "eopd/rollout.py:sample": 142,
    "eopd/objectives/presets.py:preset": 126,
    "eopd/evaluation.py:evaluate": 115,
    "eopd/decode_step.py:fused_layer": 122,
    "eopd/module.py:update": 108,
    "eopd/objectives/closed_form.py:loss_and_grad": 104,
    "eopd/compare.py:write_report": 98,
    "eopd/models.py:build_causal_lm": 87,
    "eopd/pretrain.py:build_pair": 84,
    "eopd/decode_step.py:direct_decode_step": 84,
    "eopd/objectives/teacher_stats.py:teacher_token_stats": 82,
    "eopd/evaluate.py:main": 80,
    "eopd/tasks/multipath.py:make_splits": 74,
    "eopd/objectives/objective.py:__call__": 72,
    "eopd/module.py:__init__": 72,
    "eopd/models.py:check_shared_vocabulary": 68,
    "eopd/supervised.py:train_supervised": 66,
    "eopd/objectives/diagnostics.py:student_metrics": 66,
    "eopd/comparison.py:compare": 64,
    "eopd/evaluate.py:_main": 63,
    "eopd/step_logs.py:log_samples": 61,
    "eopd/module.py:training_step": 61,
}


def function_lengths() -> dict[str, int]:
    """`path:name` -> lines (decorators excluded, docstring included) of every function in eopd/."""
    import ast

    lengths: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{path.relative_to(PACKAGE.parent)}:{node.name}"
                lengths[key] = max(lengths.get(key, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_no_function_grows_past_a_screen():
    lengths = function_lengths()
    too_long = {
        key: n for key, n in lengths.items() if n > max(MAX_FUNCTION_LINES, LONG_FUNCTIONS.get(key, 0))
    }
    assert not too_long, (
        f"split these into named steps (limit {MAX_FUNCTION_LINES} lines; the listed long functions may "
        f"not grow): {too_long}"
    )
    stale = {key: LONG_FUNCTIONS[key] for key in LONG_FUNCTIONS if lengths.get(key, 0) <= MAX_FUNCTION_LINES}
    assert not stale, f"these are within the limit now: remove them from LONG_FUNCTIONS: {stale}"
