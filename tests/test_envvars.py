"""odenet/envvars.py is the one list of environment variables: no code reads one by a literal name."""

import ast

from tests.conftest import REPO

READS = {"get", "getenv", "setdefault", "pop"}


def literal_reads(path):
    """(line, name) of each os.environ.get("NAME"), os.getenv("NAME"), os.environ["NAME"] and the like."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in READS:
            owner = ast.unparse(node.func.value)
            key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript):
            owner, key = ast.unparse(node.value), node.slice
        else:
            continue
        if owner in ("os.environ", "os") and isinstance(key, ast.Constant) and isinstance(key.value, str):
            yield node.lineno, key.value


def test_every_environment_variable_is_read_through_envvars():
    found = [f"{path.relative_to(REPO)}:{line} reads {name!r}"
             for folder in ("odenet", "sweeps", "infra", "bench") for path in sorted((REPO / folder).rglob("*.py"))
             if path.name != "envvars.py" for line, name in literal_reads(path)]
    assert not found, "declare these in odenet/envvars.py and read them through it:\n" + "\n".join(found)
