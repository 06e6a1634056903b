"""Which addresses the prober may contact (issue 14): pod addresses only, never this host's
loopback, link-local or the cloud metadata service unless allowed, and no probe path that can
move the request to another host."""

from __future__ import annotations

import pytest
import yarl
from hypothesis import given
from hypothesis import strategies as st

from aviator.probing.prober import AddressPolicy
from aviator.probing.results import ProbeTarget

STRICT = AddressPolicy()
LOOPBACK_OK = AddressPolicy(allow_loopback=True)
LINK_LOCAL_OK = AddressPolicy(allow_link_local=True)
BOTH = AddressPolicy(allow_loopback=True, allow_link_local=True)


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "loopback"),  # connect() to 0.0.0.0 reaches this host
        ("::", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged as 127.0.0.1
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("febf::1", "link-local"),
        ("::ffff:169.254.7.7", "link-local"),
    ],
)
def test_loopback_and_link_local_are_refused_unless_allowed(ip: str, kind: str) -> None:
    why = STRICT.refusal(ip)
    assert why is not None
    assert f"is a {kind} address" in why
    flag = "--allow-probe-loopback" if kind == "loopback" else "--allow-probe-link-local"
    assert why.endswith(f"it is probed only with aviator run {flag}")
    allowed = LOOPBACK_OK if kind == "loopback" else LINK_LOCAL_OK
    assert allowed.refusal(ip) is None
    other = LINK_LOCAL_OK if kind == "loopback" else LOOPBACK_OK
    assert other.refusal(ip) is not None


@pytest.mark.parametrize("ip", ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"])
def test_the_metadata_service_is_never_probed(ip: str) -> None:
    for policy in (STRICT, BOTH):
        why = policy.refusal(ip)
        assert why is not None
        assert "cloud metadata service" in why
    assert STRICT.refusal("::ffff:169.254.169.254") == (
        "::ffff:169.254.169.254 (the IPv4 address 169.254.169.254) is a cloud metadata "
        "service address; it is never probed"
    )


@pytest.mark.parametrize("ip", ["10.0.0.1", "192.0.2.7", "2001:db8::1", "::ffff:10.1.2.3"])
def test_pod_addresses_are_probed(ip: str) -> None:
    assert STRICT.refusal(ip) is None


def test_multicast_is_refused() -> None:
    assert STRICT.refusal("224.0.0.1") == "224.0.0.1 is a multicast address; a pod has none"


@pytest.mark.parametrize(
    "path",
    [
        "//evil.example/x",
        "/@evil.example/x",
        "/x@evil.example:80/",
        "/..//evil.example",
        "/%2F%2Fevil.example",
        "/?next=http://evil.example/",
    ],
)
def test_a_path_cannot_change_the_host(path: str) -> None:
    target = ProbeTarget("10.0.0.1", 8080, path=path)
    assert STRICT.target_refusal(target) is None  # it is only a path...
    url = yarl.URL(target.url)
    assert (url.host, url.port) == ("10.0.0.1", 8080)  # ...and the host stays the pod's


@pytest.mark.parametrize(
    "path", ["/x\r\nHost: evil.example", "/a b", "/x#frag", "/\x00", "/caf\u00e9"]
)
def test_a_path_with_control_characters_spaces_or_a_fragment_is_refused(path: str) -> None:
    why = STRICT.target_refusal(ProbeTarget("10.0.0.1", 8080, path=path))
    assert why is not None
    assert why.startswith("probe path ")
    assert "must start with '/' and hold printable ASCII only, no space and no '#'" in why


@pytest.mark.parametrize("path", ["http://evil.example/x", "evil.example", ""])
def test_a_path_that_is_a_url_is_not_a_target(path: str) -> None:
    with pytest.raises(ValueError, match="probe path must start with '/'"):
        ProbeTarget("10.0.0.1", 8080, path=path)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40))
def test_no_accepted_path_moves_the_host(tail: str) -> None:
    """Whatever follows the '/', a path the policy accepts keeps the pod's host and port."""
    for ip in ("10.0.0.1", "2001:db8::5"):
        target = ProbeTarget(ip, 8080, path="/" + tail)
        if STRICT.target_refusal(target) is None:
            url = yarl.URL(target.url)
            assert url.host == ip
            assert url.port == 8080
            assert url.user is None
