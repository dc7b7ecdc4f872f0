"""The ServerApp's bounded wait for sites and its presence.json (server/presence.py), with a fake
grid: no processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from server.presence import PatientGrid, PresenceFile, SitesMissing, missing_sites_message, utc_iso

SITES = ["hospital_a", "clinic_b", "cardiology_c"]


class FakeGrid:
    """`nodes`: (node id, registered name) of the online SuperNodes; a reply to a message sent to
    node `sites[i]` names site i as a ClientApp's reply does (`site-index`)."""

    def __init__(self, nodes, clock=None, sites=()):
        self.nodes, self.clock, self.sites, self.sent = nodes, clock, list(sites), {}

    def get_nodes(self):
        return [SimpleNamespace(node_id=i, name=n) for i, n in self.nodes]

    def push_messages(self, messages):
        self.sent.update({msg.metadata.message_id: msg for msg in messages})
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        """One reply per poll (the SuperLink hands out what has arrived), advancing the clock 1 s."""
        self.polls = getattr(self, "polls", 0) + 1
        if self.clock is not None:
            self.clock.now += 1
        return [self.reply(i) for i in sorted(message_ids)[:1]]

    def reply(self, message_id):
        node = getattr(self.sent[message_id].metadata, "dst_node_id", None)
        metrics = {"site-index": self.sites.index(node)} if node in self.sites else {}
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=node),
                               content=SimpleNamespace(metric_records={"metrics": metrics}), has_error=lambda: False)


def instruction(message_id, node_id, server_round):
    """A training instruction as Flower's strategies send it: the round in its config."""
    return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id, dst_node_id=node_id),
                           content=SimpleNamespace(config_records={"config": {"server-round": server_round}}))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_enough_sites_pass_through():
    grid = PatientGrid(FakeGrid([(1, "hospital_a"), (2, "clinic_b"), (3, "cardiology_c")]), SITES, 3, timeout=5)
    assert list(grid.get_node_ids()) == [1, 2, 3]


def test_replies_are_collected_by_polling_until_all_arrived_or_the_timeout():
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id=i)) for i in ("a", "b", "c")]
    clock = Clock()
    fake = FakeGrid([(1, "hospital_a")], clock)
    grid = PatientGrid(fake, SITES, 1, timeout=5, clock=clock)
    replies = grid.send_and_receive(messages, timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b", "c"] and fake.polls == 3
    clock.now, fake.polls = 0.0, 0
    replies = grid.send_and_receive(messages, timeout=1.5)  # two polls fit in 1.5 s of the fake clock
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"] and fake.polls == 2


def test_round_waits_only_straggler_timeout_once_min_sites_replied():
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id=i)) for i in "abcde"]
    clock = Clock()
    fake = FakeGrid([(1, "hospital_a")], clock)  # one reply per 1-s poll
    grid = PatientGrid(fake, SITES, 2, timeout=5, clock=clock, straggler_timeout=1.5)
    replies = grid.send_and_receive(messages, timeout=100)
    # quorum of 2 after the second poll (t = 2 s); 1.5 s more allows one more poll (t = 3 s < 3.5 s)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b", "c", "d"] and fake.polls == 4
    clock.now, fake.polls = 0.0, 0
    grid.straggler_timeout = None  # default: wait for every site (or the round timeout)
    assert len(grid.send_and_receive(messages, timeout=100)) == 5


def test_gives_up_after_the_timeout_naming_the_missing_site():
    clock, fake = Clock(), FakeGrid([(1, "hospital_a"), (2, "clinic_b")])
    grid = PatientGrid(fake, SITES, 3, timeout=60, clock=clock)
    assert list(grid.get_node_ids()) == [1, 2]  # short, but still within the timeout
    clock.now = 59
    grid.get_node_ids()
    clock.now = 61
    with pytest.raises(SitesMissing, match=r"missing: cardiology_c") as err:
        grid.get_node_ids()
    assert "online: clinic_b, hospital_a" in str(err.value) and "after 61 s" in str(err.value)


def test_timer_restarts_when_enough_sites_were_online():
    clock, fake = Clock(), FakeGrid([(1, "hospital_a")])
    grid = PatientGrid(fake, SITES, 2, timeout=10, clock=clock)
    grid.get_node_ids()
    clock.now = 8
    fake.nodes = [(1, "hospital_a"), (2, "clinic_b")]
    grid.get_node_ids()
    fake.nodes = [(1, "hospital_a")]  # a site drops out in a later round
    clock.now = 15
    grid.get_node_ids()  # 0 s short, not 15
    clock.now = 26
    with pytest.raises(SitesMissing, match="missing: clinic_b, cardiology_c"):
        grid.get_node_ids()


def test_message_without_registered_names():
    text = missing_sites_message(SITES, [(11, ""), (12, "")], 3, 600)
    assert "only 2 of the 3 sites" in text and "ids 11, 12" in text and "--site <site>" in text
    text = missing_sites_message(SITES, [(11, "hospital_a"), (12, "intruder")], 3, 600)
    assert "missing: clinic_b, cardiology_c" in text and "not in the scenario: intruder" in text
    assert "missing: hospital_a, clinic_b, cardiology_c" in missing_sites_message(SITES, [], 3, 1)


# -- presence.json ---------------------------------------------------------------------------------

def nodes_in(path):
    return {n["node_id"]: (n["site"], n["online"], n["last_seen"], n["round"])
            for n in json.loads(path.read_text())["nodes"]}


def test_presence_names_nodes_by_their_replies_and_keeps_when_each_was_last_seen(tmp_path):
    """Simulated nodes have no names: each is named by the site its reply gives; a node that goes
    away is offline, last seen at the last poll that listed it, in that poll's round."""
    clock, path = Clock(), tmp_path / "presence.json"
    clock.now = 1_000_000.0
    fake = FakeGrid([(11, ""), (12, ""), (13, "")], clock, sites=[11, 12, 13])
    grid = PatientGrid(fake, SITES, 2, timeout=60, clock=clock, presence=PresenceFile(path, clock=clock))
    grid.get_node_ids()  # the strategy looks for sites before round 1: not named yet, no round
    assert nodes_in(path) == {i: (None, True, utc_iso(1_000_000.0), None) for i in (11, 12, 13)}

    grid.send_and_receive([instruction("a", 11, 1), instruction("b", 12, 1), instruction("c", 13, 1)], timeout=100)
    seen = utc_iso(1_000_003.0)  # one reply per 1-s poll: the wait asked who is online at every one
    assert nodes_in(path) == {11: ("hospital_a", True, seen, 1), 12: ("clinic_b", True, seen, 1),
                              13: ("cardiology_c", True, seen, 1)}

    fake.nodes = [(11, ""), (12, "")]  # cardiology_c's SuperNode goes away
    clock.now += 5
    grid.get_node_ids()
    record = json.loads(path.read_text())
    assert record["updated"] == utc_iso(1_000_008.0) and record["round"] == 1
    assert nodes_in(path)[13] == ("cardiology_c", False, seen, 1)
    assert nodes_in(path)[11] == ("hospital_a", True, utc_iso(1_000_008.0), 1)

    fake.nodes = [(11, ""), (12, ""), (13, "")]  # and comes back under the same node id: still named
    clock.now += 1
    grid.send_and_receive([instruction("d", 11, 2)], timeout=100)
    assert nodes_in(path)[13] == ("cardiology_c", True, utc_iso(1_000_010.0), 2)


def test_the_names_the_last_replies_give_are_written_when_the_wait_ends(tmp_path):
    clock, path = Clock(), tmp_path / "presence.json"
    fake = FakeGrid([(11, ""), (12, "")], clock, sites=[11, 12])
    presence = PresenceFile(path, clock=clock, interval=60)  # no poll during the wait is due
    grid = PatientGrid(fake, SITES, 1, timeout=60, clock=clock, presence=presence)
    grid.get_node_ids()
    grid.send_and_receive([instruction("a", 11, 1), instruction("b", 12, 1)], timeout=100)
    assert {node: seen[0] for node, seen in nodes_in(path).items()} == {11: "hospital_a", 12: "clinic_b"}


def test_presence_is_written_at_once_on_a_change_else_at_most_once_per_interval(tmp_path):
    clock, path = Clock(), tmp_path / "presence.json"
    presence = PresenceFile(path, clock=clock, interval=1.0)
    clock.now = 100.0
    presence.polled([(1, "hospital_a")])  # a registered name (deployment) names the node at once

    def updated():
        return json.loads(path.read_text())["updated"]

    assert updated() == "1970-01-01T00:01:40.000Z" and nodes_in(path)[1][:2] == ("hospital_a", True)
    clock.now = 100.5
    presence.polled([(1, "hospital_a")])
    assert updated() == utc_iso(100.0)  # nothing changed within the interval: not rewritten
    clock.now = 100.7
    presence.polled([])
    assert updated() == utc_iso(100.7) and nodes_in(path)[1] == ("hospital_a", False, utc_iso(100.5), None)
    clock.now = 101.2
    presence.polled([])
    assert updated() == utc_iso(100.7)
    clock.now = 101.7
    presence.polled([])
    assert updated() == utc_iso(101.7)  # the interval passed: rewritten, so readers know it is current
    assert [p.name for p in tmp_path.iterdir()] == ["presence.json"]  # written whole: no temporary file left
