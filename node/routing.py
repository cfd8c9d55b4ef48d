"""Routing: which destinations an instance goes to, and how urgently.

Evaluated on the original data set, before de-identification (a route may
look at the station or the modality the profile is about to remove); only
the outcome — destination names and a priority — is kept, never the values
matched. With no `[[routes]]`, every destination gets every instance.

An instance goes to the union of the destinations of every route it matches;
if that is empty, to every destination marked `default` (true unless said
otherwise). Its priority is the highest of the C-STORE request's and the
matching routes' (a calling AE or modality marked "stat" jumps every queue).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.config import Destination, Route


@dataclass(frozen=True)
class Decision:
    """Where one instance goes and with which queue priority; `routes` names the routes that matched."""

    destinations: tuple[str, ...]
    priority: int
    routes: tuple[str, ...] = ()


class Router:
    """Applies the configured routes; one per process."""

    def __init__(self, routes: Sequence[Route], destinations: Sequence[Destination]) -> None:
        self.routes = tuple(routes)
        self.all = tuple(d.name for d in destinations)
        self.defaults = tuple(d.name for d in destinations if d.default)

    def decide(self, ds: Dataset, calling_aet: str, priority: int = 0) -> Decision:
        """Destinations and priority for this (original) data set from this calling AE."""
        matched = [route for route in self.routes if matches(route, ds, calling_aet)]
        chosen = [name for route in matched for name in route.destinations]
        destinations = tuple(dict.fromkeys(chosen)) if chosen else (self.defaults if self.routes else self.all)
        for route in matched:
            if route.priority is not None:
                priority = max(priority, route.priority)
        return Decision(destinations, priority, tuple(route.name for route in matched))


def matches(route: Route, ds: Dataset, calling_aet: str) -> bool:
    """Every criterion the route gives holds (a list: any of its values; match: every glob)."""
    if route.calling_aets and calling_aet.strip() not in {aet.strip() for aet in route.calling_aets}:
        return False
    if route.modalities and _text(ds, 0x00080060).upper() not in route.modalities:
        return False
    if route.sop_classes and _text(ds, 0x00080016) not in route.sop_classes:
        return False
    return all(fnmatch.fnmatchcase(_text(ds, tag).upper(), pattern.upper()) for tag, pattern in route.match)


def _text(ds: Dataset, tag: int) -> str:
    elem = ds.get(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    return "\\".join(str(v) for v in value) if isinstance(value, (MultiValue, list)) else str(value).strip()
