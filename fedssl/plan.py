"""The plan: what a site needs to know of a run, sent with every round, and the site's review of it.

The coordinator's scenario holds more than a hospital should need (its held-out probe data, the
baselines, its own paths and timeouts are its business); a hospital holds its own side in its site
file (fedssl/sitefile.py). The ServerApp sends the plan, the settings a site trains and probes
with, in every train and evaluate message (`fedssl.protocol.PLAN_KEY`), so no hospital needs the
coordinator's scenario file: the site rebuilds its `Scenario` from the plan alone.

The plan travels as canonical JSON (sorted keys, no spaces); its **fingerprint** is the SHA-256 of
that text, shown to people by its first 12 hex digits. The round number travels apart
(`SERVER_ROUND_KEY`), so a run's fingerprint is the same every round, and a site that approved a
plan (client/approval.py) is not asked again until the plan itself changes.

`policy_problems` is the site's review of a plan against its policy (`SitePolicy`): one line per
thing the policy refuses, about the plan only, never about the site's data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from fedssl.config import ConfigError, Scenario, from_dict, to_dict
from fedssl.sitefile import SitePolicy

# the scenario's sections a site trains with, whole (`sites`: every site's name, data source,
# labels CSV and DP setting, which the site finds its own entry in); `name` tells people which plan
SECTIONS = ("name", "seed", "data", "model", "objective", "train", "federation", "privacy", "sites")
# of `evaluation`, what a site's own probe (`evaluation.federated`) uses: not the held-out data
PROBE_SETTINGS = ("test_fraction", "probe_l2")
SHORT = 12  # hex digits of a fingerprint shown to people


@dataclass(frozen=True)
class Plan:
    """A run's plan as it travels: `text`, canonical JSON of plain values (`Plan.of`, `from_json`)."""

    text: str

    @classmethod
    def of(cls, scenario: Scenario) -> Plan:
        """The plan of the coordinator's scenario."""
        values = {key: to_dict(getattr(scenario, key)) for key in SECTIONS}
        values["evaluation"] = {key: getattr(scenario.evaluation, key) for key in PROBE_SETTINGS}
        return cls(canonical(values))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan a message carried, made canonical again: its fingerprint is that of its content,
        however the sender spaced or ordered it. A ConfigError if it is not a JSON object."""
        try:
            values = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"the message's plan is not JSON: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"the message's plan is not a JSON object: {text[:60]!r}")
        return cls(canonical(values))

    @property
    def values(self) -> dict:
        return json.loads(self.text)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON: the same plan, the same fingerprint, every round."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def short(self) -> str:
        """The fingerprint as people see it: its first 12 hex digits."""
        return self.fingerprint[:SHORT]

    def scenario(self) -> Scenario:
        """The scenario a site trains with; sections the plan does not carry keep their defaults
        (the site never reads them). A ConfigError names the plan's bad key."""
        try:
            return from_dict(Scenario, self.values)
        except ConfigError as err:
            raise ConfigError(f"the message's plan: {err}") from None


def canonical(values: dict) -> str:
    """JSON with sorted keys and no spaces: one text per content, the input of the fingerprint."""
    try:
        return json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as err:  # NaN or infinity: no scenario holds them, a forged plan might
        raise ConfigError(f"the plan holds a value JSON cannot carry: {err}") from None


def policy_problems(policy: SitePolicy, scenario: Scenario, site_name: str) -> list[str]:
    """Why `policy` refuses to train site `site_name` as `scenario` plans it: one human line per
    refused setting, [] if it accepts. Reads the plan only, so a site can decline before it reads
    any of its data."""
    privacy = scenario.privacy_of(scenario.site(site_name))
    problems = []
    for what, value, accepted in (("objective", scenario.objective.name, policy.objectives),
                                  ("encoder", scenario.model.encoder, policy.encoders)):
        if accepted and value not in accepted:
            problems.append(f"{what} {value} is not accepted (policy.{what}s: {', '.join(accepted)})")
    if scenario.federation.share not in policy.share:
        problems.append(f"shares {scenario.federation.share} but policy.share allows {', '.join(policy.share)}")
    if not privacy.enabled and policy.require_dp:
        problems.append("trains without DP-SGD but policy.require_dp is set")
    elif not privacy.enabled and policy.max_epsilon is not None:  # no DP: no epsilon bound at all
        problems.append(f"trains without DP-SGD but policy.max_epsilon is {policy.max_epsilon:g}")
    elif privacy.enabled and policy.max_epsilon is not None and privacy.target_epsilon > policy.max_epsilon:
        problems.append(f"target epsilon {privacy.target_epsilon:g} exceeds policy.max_epsilon {policy.max_epsilon:g}")
    steps = scenario.train.local_steps
    if policy.max_local_steps is not None and steps > policy.max_local_steps:
        problems.append(f"local_steps {steps} exceeds policy.max_local_steps {policy.max_local_steps}")
    return problems
