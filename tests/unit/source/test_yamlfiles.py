"""Manifest bytes → objects, bounded: sizes, alias bombs, recursion, depth, error messages."""

from __future__ import annotations

import pickle
import time

import pytest
import yaml

from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import Pod
from aviator.k8s.state import Problem
from aviator.source import yamlfiles
from aviator.source.yamlfiles import DEFAULT_LIMITS, Limits, Parsed, parse_byte_size, parse_file
from tests.unit.k8s.builders import pod_doc, workload_doc

POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status: {phase: Running, podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
"""


def bomb(levels: int, fan_out: int = 10) -> bytes:
    """A Pod whose ``spec.containers[0].args`` expands to ``fan_out ** levels`` strings."""
    lines = ["apiVersion: v1", "kind: Pod", "metadata: {name: bomb, namespace: shop}", "x:"]
    lines.append("  l0: &l0 [" + ",".join(['"lol"'] * fan_out) + "]")
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * fan_out) + "]")
    lines.append(f"spec: {{containers: [{{name: main, args: *l{levels - 1}}}]}}")
    lines.append("status: {phase: Running, podIP: 10.0.0.1}")
    return ("\n".join(lines) + "\n").encode()


def parsed(data: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Parsed:
    result = parse_file("f.yaml", data.encode() if isinstance(data, str) else data, limits)
    assert isinstance(result, Parsed), result
    return result


def refused(data: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Problem:
    result = parse_file("f.yaml", data.encode() if isinstance(data, str) else data, limits)
    assert isinstance(result, Problem), result
    return result


def test_the_installed_pyyaml_has_libyaml_and_the_loader_uses_it() -> None:
    # The speed figures in docs/benchmarks/source.md assume it; the pure-Python loader is
    # the fallback for a PyYAML built without libyaml.
    assert yamlfiles.LIBYAML
    assert issubclass(yamlfiles._Loader, yaml.CSafeLoader)


def test_a_billion_laughs_is_refused_before_it_expands() -> None:
    data = bomb(levels=8)  # 10^8 strings from ~500 bytes
    assert len(data) < 600
    start = time.process_time()
    problem = refused(data)
    # Expanding it takes tens of seconds and gigabytes; refusing it, a few milliseconds
    # (bounded very generously: this is a test of the algorithm, not a benchmark).
    assert time.process_time() - start < 2
    # Nodes of the document, counted by hand: l_k (a list of ten l_{k-1}) expands to
    # 1 + 10 * l_{k-1} nodes, l_0 to 11; the Pod's own nodes, the eight keys of x and the
    # keys and values around `args` are 35; `args` is one more l_7.
    sizes = [11]
    for _ in range(7):
        sizes.append(1 + 10 * sizes[-1])
    expanded = 35 + sum(sizes) + sizes[-1]
    written = 35 + 8 + 10  # the same, each alias one node and l_0's ten strings
    assert problem.source == "f.yaml"
    assert problem.line == 1
    assert problem.message == (
        f"YAML aliases expand too far: document 1 is {written} nodes as written and "
        f"{expanded:,} with its aliases expanded; a file's aliases may add at most "
        "1,000,000 nodes (an alias bomb? write the repeated parts out); not parsed"
    )


def test_the_alias_budget_is_a_file_budget_and_configurable() -> None:
    small = bomb(levels=3)  # 1,000 strings: fine by default
    (doc,) = parsed(small).docs
    assert isinstance(doc.obj, Pod)
    problem = refused(small, Limits(max_alias_nodes=500))
    assert "aliases may add at most 500 nodes" in problem.message
    # Each alias of `a` (a list of nine numbers: ten nodes) adds ten nodes when expanded.
    # Two documents that add 60 each: under a budget of 100 each, not together.
    doc = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [*a, *a, *a, *a, *a, *a]\n"
    assert isinstance(parse_file("f.yaml", doc.encode(), Limits(max_alias_nodes=100)), Parsed)
    problem = refused(doc + "---\n" + doc, Limits(max_alias_nodes=100))
    assert problem.message.startswith("YAML aliases expand too far: document 2 is ")
    assert problem.line == 4
    assert isinstance(parse_file("f.yaml", (doc + "---\n" + doc).encode()), Parsed)


def test_ordinary_anchors_and_merge_keys_still_work() -> None:
    text = (
        "apiVersion: v1\nkind: Pod\n"
        "metadata:\n  <<: &meta {namespace: shop}\n  name: web-1\n  labels: &l {app: web}\n"
        "  annotations: *l\n"
        "status: {phase: Running, podIP: 10.0.0.1}\n"
        "---\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n"
        "spec: {selector: {matchLabels: &sel {app: web}}, template: {metadata: {labels: *sel}}}\n"
    )
    docs = parsed(text).docs
    assert [(d.obj.ref, d.document) for d in docs] == [
        (ObjectRef("Pod", "shop", "web-1"), 1),
        (ObjectRef("Deployment", "shop", "web"), 2),
    ]
    assert docs[0].obj.meta.labels == {"app": "web"}
    # Anchors are per document: one from document 1 does not reach document 2.
    problem = refused(text.replace("labels: *sel", "labels: *l"))
    assert problem.message == "YAML does not parse: found undefined alias 'l' (line 13, column 80)"


def test_a_recursive_alias_is_refused_not_a_crash() -> None:
    problem = refused(POD + "spec: {containers: &c [{name: main, args: *c}]}\n")
    assert problem.message == (
        "a YAML alias refers to a node that contains it (a recursive structure, which no "
        "API object can be); not parsed"
    )
    assert problem.line == 5


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    # Under libyaml's limit of 1,000 levels but too deep for the content hash's JSON.
    deep = POD + "spec: {x: " + "[" * 990 + "]" * 990 + "}\n"
    result = parsed(deep)
    assert result.docs == ()
    (p,) = result.problems
    assert (p.document, p.object, p.message) == (
        1,
        ObjectRef("Pod", "shop", "web-1"),
        "nested too deeply to read",
    )
    deeper = POD + "spec: {x: " + "[" * 1200 + "]" * 1200 + "}\n"
    assert "exceeded maximum nesting depth" in refused(deeper).message


def test_a_file_above_the_size_limit_is_not_parsed() -> None:
    data = "---\n".join([POD] * 4).encode()
    problem = refused(data, Limits(max_file_bytes=len(data) - 1))
    assert problem == Problem(
        "f.yaml",
        f"file too large to read: {len(data):,} bytes, the limit is "
        f"{len(data) - 1:,} bytes; split it into smaller files (or raise --max-file-size)",
    )
    assert isinstance(parse_file("f.yaml", data, Limits(max_file_bytes=len(data))), Parsed)
    big = yamlfiles.size_problem("big.yaml", 50_000_000, Limits())
    assert big is not None
    assert big.message.startswith(
        "file too large to read: 47.7 MiB (50,000,000 bytes), the limit is 10.0 MiB; "
    )


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n",
            "YAML does not parse: while parsing a flow mapping did not find expected ',' or '}' "
            "(line 4, column 1)",
            4,
        ),
        ("a: 1\nb: *nowhere\n", "YAML does not parse: found undefined alias 'nowhere'", 2),
        (
            "a: &x 1\nb: &x 2\n",
            "YAML does not parse: found duplicate anchor 'x' (first at line 1) (line 2, column 4)",
            2,
        ),
        (
            "kind: Pod\nname: a\x07b\n",
            "YAML does not parse: unacceptable character #x0007 (line 2, column 8): "
            "control characters are not allowed",
            2,
        ),
        (
            "kind: Pod\nmetadata:\n  name: a\n  name: b\n",
            "YAML does not parse: while constructing a mapping found duplicate key 'name' "
            "(first at line 3) (line 4, column 3)",
            4,
        ),
    ],
)
def test_errors_name_line_column_and_what_was_wrong(text: str, message: str, line: int) -> None:
    problem = refused(text)
    assert problem.message.startswith(message)
    assert problem.line == line


def test_results_survive_the_trip_from_the_worker() -> None:
    # The worker process pickles what it parsed; Labels once refused to be unpickled.
    import yaml as _yaml

    data = _yaml.safe_dump_all([workload_doc(), pod_doc("web-1", "10.0.0.1")]).encode()
    result = parsed(data)
    assert pickle.loads(pickle.dumps(result)) == result


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10Mi", 10 * 1024 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("500K", 500_000),
        ("500kb", 500_000),
        ("1.5Gi", 1024**3 * 3 // 2),
        ("1048576", 1_048_576),
    ],
)
def test_byte_sizes(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10 apples", "0", "-5M"])
def test_bad_byte_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_byte_size(text)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_file_bytes must be a positive integer"):
        Limits(max_file_bytes=0)
    with pytest.raises(ValueError, match="max_alias_nodes"):
        Limits(max_alias_nodes=-1)
