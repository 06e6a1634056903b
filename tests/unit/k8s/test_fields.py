"""The validation vocabulary: apimachinery's syntax rules and how field errors read."""

from __future__ import annotations

import pytest

from aviator.k8s.fields import FieldError, label_key_error, port_name_error


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("app", True),
        ("app.kubernetes.io/name", True),
        ("topology.kubernetes.io/zone", True),
        ("a_b.c-d", True),
        ("/name", False),
        ("Bad_Prefix/name", False),
        ("-app", False),
        ("x" * 64, False),
        ("", False),
    ],
)
def test_label_keys(key: str, ok: bool) -> None:
    assert (label_key_error(key) is None) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("http", True),
        ("http-alt", True),
        ("h2c", True),
        ("web-8080", True),
        ("8080", False),
        ("-http", False),
        ("http-", False),
        ("ht--tp", False),
        ("HTTP", False),
        ("a" * 16, False),
    ],
)
def test_port_names(name: str, ok: bool) -> None:
    assert (port_name_error(name) is None) is ok


def test_field_error_str() -> None:
    assert str(FieldError("spec.port", "bad")) == "spec.port: bad"
