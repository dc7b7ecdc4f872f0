"""Bounded waiting for sites: the ServerApp never waits without end for SuperNodes to connect.

Flower's strategies wait for `min_available_nodes` by polling `grid.get_node_ids()` once a second,
for ever. `PatientGrid` wraps the run's grid: when fewer than `min_sites` SuperNodes are online for
longer than `timeout` seconds (at the start or in any later round), `get_node_ids` raises
`SitesMissing`, which fails the run with a message naming the sites that are missing.

Sites are named by the name their key was registered with at the SuperLink
(`fedssl register <site>.key.pub --site <site>`, deployment); in simulation
the nodes have no names and the message gives counts.

With a `PresenceFile`, the grid also keeps the run folder's `presence.json` (who is online, when
and in which round each site was last seen) for `fedssl dashboard`, from the polls it makes anyway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedssl.protocol import SERVER_ROUND_KEY
from fedssl.storage import atomic_write
from server.validation import node_sites

REPLY_POLL_SECONDS = 0.1  # one small request to the SuperLink per poll while a round's replies are due


class SitesMissing(RuntimeError):
    """Too few sites were online for longer than the connect timeout."""


def missing_sites_message(expected: Sequence[str], online: Sequence[tuple[int, str]], min_sites: int,
                          waited: float) -> str:
    """What to tell the coordinator: who is online, who is missing, what to check."""
    names = [name for _, name in online if name]
    missing = [site for site in expected if site not in names]
    unknown = sorted(set(names) - set(expected))
    unnamed = [node_id for node_id, name in online if not name]
    text = (f"only {len(online)} of the {min_sites} sites needed (federation.min_sites) were online "
            f"after {waited:.0f} s")
    if names:
        text += f"; online: {', '.join(sorted(names))}"
    if names or not unnamed:
        text += f"; missing: {', '.join(missing) or '-'}"
    if unknown:
        text += f"; online under names not in the scenario: {', '.join(unknown)}"
    if unnamed:
        text += (f"; {len(unnamed)} online SuperNode(s) without a name (ids {', '.join(map(str, unnamed))}: "
                 "register each key with `fedssl register KEY.pub --site <site>` so that "
                 "missing sites can be named)")
    return text + ". Check that their nodes run, reach the SuperLink and are registered (`fedssl status`)."


def utc_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PresenceFile:
    """`presence.json`: per SuperNode, whether it was online at the ServerApp's last poll of the
    SuperLink, and when (UTC ISO) and in which round it was last seen online.

    Only the ServerApp can know it (the SuperLink tells it who is connected) and the dashboard only
    reads the run folder, so the ServerApp writes it there: whole (tmp + rename: a reader never sees
    half a file), at once when who is online or a node's name changes, else at most once per
    `interval` s to say it is still polling (the dashboard treats an old file as no news).

    A node is named by the name its key was registered with (deployment) or, in simulation where
    nodes have no names, by the site its replies name (`reply_site`); until then by its id alone.
    `round` is the last round whose instructions went out (None before the first).
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time, interval: float = 1.0) -> None:
        self.path, self.clock, self.interval = Path(path), clock, interval
        self.round: int | None = None
        self.nodes: dict[int, dict] = {}  # node id -> {"site", "online", "last_seen" (Unix), "round"}
        self._written = float("-inf")
        self._changed = False

    def due(self) -> bool:
        return self.clock() - self._written >= self.interval

    def polled(self, online: Sequence[tuple[int, str]]) -> None:
        """Record a poll: the nodes in `online` (id, registered name) are online, every other is not."""
        now = self.clock()
        names = dict(online)
        for node_id in names.keys() - self.nodes.keys():
            self.nodes[node_id] = {"site": None, "online": False}
        for node_id, node in self.nodes.items():
            self._changed |= node["online"] != (node_id in names)
            node["online"] = node_id in names
            if node["online"]:
                node.update(last_seen=now, round=self.round)
                if names[node_id]:
                    self.name(node_id, names[node_id])
        if self._changed or self.due():
            self.write()

    def name(self, node_id: int, site: str | None) -> None:
        """Name a known node by the site it belongs to (first name wins: a registered name comes
        with the first poll, before any reply)."""
        node = self.nodes.get(node_id)
        if site and node is not None and node["site"] is None:
            node["site"], self._changed = site, True

    def write(self) -> None:
        now = self.clock()
        record = {"updated": utc_iso(now), "round": self.round,
                  "nodes": [{"node_id": node_id, "site": node["site"], "online": node["online"],
                             "last_seen": utc_iso(node["last_seen"]), "round": node["round"]}
                            for node_id, node in sorted(self.nodes.items())]}
        atomic_write(self.path, lambda f: f.write(json.dumps(record).encode() + b"\n"))
        self._written, self._changed = now, False


def instruction_round(messages: Sequence[Message]) -> int | None:
    """The round the server's instructions belong to (Flower's strategies put it in their config)."""
    for msg in messages:
        for config in msg.content.config_records.values():
            if SERVER_ROUND_KEY in config:
                return int(config[SERVER_ROUND_KEY])
    return None


class PatientGrid(Grid):
    """A grid whose `get_node_ids` gives up after `timeout` s with fewer than `min_sites` nodes online,
    recording who is online into `presence` when given."""

    def __init__(self, grid: Grid, expected_sites: Sequence[str], min_sites: int, timeout: float,
                 clock: Callable[[], float] = time.monotonic, straggler_timeout: float | None = None,
                 presence: PresenceFile | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._grid, self.expected, self.min_sites, self.timeout = grid, list(expected_sites), min_sites, timeout
        self.straggler_timeout, self.presence = straggler_timeout, presence
        self._clock = clock
        self._short_since: float | None = None
        self._last_report = float("-inf")

    def online(self) -> list[tuple[int, str]]:
        """(node id, registered name) of every online SuperNode of this run."""
        return [(int(node.node_id), str(getattr(node, "name", "") or "")) for node in self._grid.get_nodes()]

    def get_node_ids(self) -> Iterable[int]:
        online = self.online()
        if self.presence is not None:
            self.presence.polled(online)
        if len(online) >= self.min_sites:
            self._short_since = None
            return [node_id for node_id, _ in online]
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        waited = now - self._short_since
        if waited > self.timeout:
            raise SitesMissing(missing_sites_message(self.expected, online, self.min_sites, waited))
        if now - self._last_report >= 30:  # a progress line every 30 s, not every poll
            self._last_report = now
            names = [name for _, name in online if name]
            log(INFO, "fedssl | waiting for sites: %d of %d online%s (gives up in %.0f s)", len(online),
                self.min_sites, f" ({', '.join(sorted(names))})" if names else "", self.timeout - waited)
        return [node_id for node_id, _ in online]

    # -- everything else is the wrapped grid's ----------------------------------------------------

    def get_nodes(self):
        return self._grid.get_nodes()

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's `send_and_receive`, but asking for the replies every `REPLY_POLL_SECONDS`: the
        deployment Grid asks every 3 s, which adds 1.5 s to every round on average.

        Each message lives only as long as the round waits for it (its TTL, 12 h by default): a
        SuperNode that was dead during the round and comes back later does not find and train on
        the stale instruction (spending privacy budget on a round already aggregated without it).

        With `straggler_timeout` (federation.straggler_timeout), once `min_sites` sites have
        replied without error the round waits at most that many seconds more for the others, so
        one slow or dead hospital does not hold every round up to the round timeout (a dead
        SuperNode is otherwise noticed only by Flower's heartbeat, after 30-60 s).

        With `presence`, the wait also asks who is online (at most once per its interval: the
        round may wait minutes without any other poll, and once at its end) and names each
        replying node by its site.
        """
        messages = list(messages)
        if self.presence is not None:
            self.presence.round = instruction_round(messages) or self.presence.round
        if timeout is not None:
            for msg in messages:
                msg.metadata.ttl = timeout
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        quorum = False
        while pending and (deadline is None or self._clock() < deadline):
            pulled = list(self._grid.pull_messages(pending))
            replies += pulled
            pending -= {msg.metadata.reply_to_message_id for msg in pulled}
            if self.presence is not None:
                for node, site in node_sites(pulled, self.expected).items():
                    self.presence.name(node, site)
                if self.presence.due():
                    self.presence.polled(self.online())
            answered = sum(not msg.has_error() for msg in replies)
            if self.straggler_timeout is not None and not quorum and answered >= self.min_sites and pending:
                quorum, last = True, self._clock() + self.straggler_timeout
                deadline = last if deadline is None else min(deadline, last)
                log(INFO, "fedssl | %d sites replied (federation.min_sites %d): waiting at most %.0f s for the "
                    "other %d", answered, self.min_sites, self.straggler_timeout, len(pending))
            if pending:
                time.sleep(REPLY_POLL_SECONDS)
        if self.presence is not None:  # the names the last replies gave are written now, not next round
            self.presence.polled(self.online())
        return replies

    def __getattr__(self, name: str):  # anything newer Grids add
        return getattr(self._grid, name)
