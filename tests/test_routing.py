"""Routing rules: destinations and priority from the original data set and the calling AE."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node import config
from node.config import Destination, Route
from node.routing import Router

A = Destination("a", "A", "127.0.0.1", 1)
B = Destination("b", "B", "127.0.0.1", 2)
ONLY_ROUTED = Destination("c", "C", "127.0.0.1", 3, default=False)


def ct():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StationName = "ER-CT-2"
    return ds


def test_no_routes_every_destination_gets_everything():
    """Without [[routes]] every destination gets every instance, at the C-STORE priority."""
    decision = Router((), (A, B, ONLY_ROUTED)).decide(ct(), "CT01", priority=-1)
    assert decision.destinations == ("a", "b", "c") and decision.priority == -1 and decision.routes == ()


def test_unmatched_instances_go_to_default_destinations_only():
    """With routes, an instance no route sends anywhere goes to the destinations marked default."""
    router = Router((Route("mr", destinations=("c",), modalities=("MR",)),), (A, B, ONLY_ROUTED))
    assert router.decide(ct(), "CT01").destinations == ("a", "b")


def test_matching_routes_union_their_destinations():
    """Every matching route contributes its destinations (union, in order, no duplicates)."""
    routes = (Route("by-ae", destinations=("c", "a"), calling_aets=("CT01",)),
              Route("by-modality", destinations=("a",), modalities=("CT",)))
    decision = Router(routes, (A, B, ONLY_ROUTED)).decide(ct(), "CT01")
    assert decision.destinations == ("c", "a") and decision.routes == ("by-ae", "by-modality")


@pytest.mark.parametrize("route, matched", [
    (Route("ae", calling_aets=("CT01",)), True),
    (Route("ae", calling_aets=("MR01",)), False),
    (Route("mod", modalities=("CT",)), True),
    (Route("sop", sop_classes=("1.2.840.10008.5.1.4.1.1.2",)), True),
    (Route("sop", sop_classes=("1.2.840.10008.5.1.4.1.1.4",)), False),
    (Route("glob", match=((0x00081010, "er-*"),)), True),  # StationName, case-insensitive glob
    (Route("glob", match=((0x00081010, "ICU-*"),)), False),
    (Route("all", calling_aets=("CT01",), modalities=("MR",)), False),  # every criterion must hold
])
def test_criteria(route, matched):
    """Calling AE, modality, SOP class and tag globs on the original data set; all given criteria must hold."""
    decision = Router((route,), (A,)).decide(ct(), "CT01")
    assert (decision.routes == (route.name,)) == matched


def test_stat_route_raises_priority_but_never_lowers_it():
    """A route marked stat puts the instance ahead; a low route does not demote a HIGH C-STORE."""
    stat = Route("stat", calling_aets=("CT01",), priority=1)
    low = Route("low", modalities=("CT",), priority=-1)
    assert Router((stat,), (A,)).decide(ct(), "CT01", priority=0).priority == 1
    assert Router((low,), (A,)).decide(ct(), "CT01", priority=1).priority == 1
    assert Router((stat,), (A,)).decide(ct(), "CT01").destinations == ("a",)  # priority-only route


def test_routes_load_from_config(tmp_path):
    """[[routes]] keys are typed on load; an unknown destination or tag names the route and key."""
    base = """[anonymization]
key_file = "k.key"
[[destinations]]
name = "telerad"
ae_title = "TELERAD"
host = "127.0.0.1"
port = 11113
[[destinations]]
name = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 11114
default = false
parallel = 2
"""
    path = tmp_path / "t.toml"
    path.write_text(base + """[[routes]]
name = "er-stat"
calling_aets = ["ER_CT"]
match = { StationName = "ER*", "(0008,1030)" = "*HEAD*" }
priority = "stat"
[[routes]]
modalities = ["mr"]
destinations = ["research"]
""")
    settings = config.load(path)
    first, second = settings.routes
    assert first.name == "er-stat" and first.priority == 1 and first.destinations == ()
    assert first.match == ((0x00081010, "ER*"), (0x00081030, "*HEAD*"))
    assert second.name == "route1" and second.modalities == ("MR",) and second.destinations == ("research",)
    assert settings.destinations[1].default is False and settings.destinations[1].parallel == 2
    path.write_text(base + '[[routes]]\ndestinations = ["nowhere"]\n')
    with pytest.raises(config.ConfigError, match=r"routes\[0\]\.destinations"):
        config.load(path)
    path.write_text(base + '[[routes]]\nmatch = { NoSuchKeyword = "x" }\n')
    with pytest.raises(config.ConfigError, match=r"routes\[0\]\.match\.NoSuchKeyword"):
        config.load(path)
