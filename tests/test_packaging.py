"""Dependencies: lower bounds that exclude known-vulnerable releases, and constraints.txt
(what CI installs) pinning every dependency but torch to versions that satisfy them."""

import configparser
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def install_requires() -> dict[str, Requirement]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options"]["install_requires"].splitlines()
    reqs = [
        Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")
    ]
    return {canonicalize_name(r.name): r for r in reqs}


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name.strip())] = Version(pinned.strip())
    return pins


@pytest.mark.parametrize(
    "name, vulnerable, fixed",
    [
        ("jinja2", "3.1.5", "3.1.6"),  # sandbox breakouts via chat templates
        ("h11", "0.15.0", "0.16.0"),  # request smuggling
    ],
)
def test_known_vulnerable_releases_are_excluded(name, vulnerable, fixed):
    spec = install_requires()[name].specifier
    assert vulnerable not in spec and fixed in spec
    assert Version(version(name)) in spec  # and what is installed here is past it


def test_constraints_pin_every_dependency_within_its_bounds():
    pins = constraints()
    for name, req in install_requires().items():
        if name == "torch":
            assert name not in pins  # the machine's own wheel, installed first
            continue
        assert name in pins, f"constraints.txt does not pin {name}"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} is outside {req}"
