"""The ServerApp's bounded wait for sites (server/presence.py), with a fake grid: no processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.presence import PatientGrid, SitesMissing, missing_sites_message

SITES = ["hospital_a", "clinic_b", "cardiology_c"]


class FakeGrid:
    def __init__(self, nodes, clock=None):
        self.nodes, self.clock = nodes, clock

    def get_nodes(self):
        return [SimpleNamespace(node_id=i, name=n) for i, n in self.nodes]

    def push_messages(self, messages):
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        """One reply per poll (the SuperLink hands out what has arrived), advancing the clock 1 s."""
        self.polls = getattr(self, "polls", 0) + 1
        if self.clock is not None:
            self.clock.now += 1
        first = sorted(message_ids)[:1]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: False)
                for i in first]


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
    assert "only 2 of the 3 sites" in text and "ids 11, 12" in text and "--name <site>" in text
    text = missing_sites_message(SITES, [(11, "hospital_a"), (12, "intruder")], 3, 600)
    assert "missing: clinic_b, cardiology_c" in text and "not in the scenario: intruder" in text
    assert "missing: hospital_a, clinic_b, cardiology_c" in missing_sites_message(SITES, [], 3, 1)
