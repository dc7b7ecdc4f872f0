"""A hospital's site file (`site.yaml`): who the site is, where its data and state live, how its
node reaches the coordinator, and the site's **policy**: what training it accepts.

The coordinator's plan reaches the site in each round's message (fedssl/plan.py); the site file is
the hospital's own side of the agreement and never leaves its machine. `fedssl node site.yaml`
reads it to start the node, and the ClientApp reads it (node config `site-file`) for the site's
folders and policy. Relative paths are resolved against the file's folder.

    site: hospital_a
    records: /data/ecg                  # the site's WFDB records (read only)
    labels_csv: null                    # optional `record,labels[,patient]` CSV of its own labels
    work: /srv/fedssl/work              # window cache
    state: /srv/fedssl/state            # heads, privacy ledger, audit log, approved plans
    log: null                           # the node's log file (default <state>/node.log)
    superlink: superlink.example.org:9091
    ca_certificate: /srv/fedssl/certs/ca.crt
    node_key: /srv/fedssl/keys/hospital_a.key
    port: 9094                          # the SuperNode's local port for its app processes
    worker: true                        # keep a warm training process between rounds
    policy:
      objectives: [cpc, hybrid]         # empty: any
      encoders: [conv_transformer]      # empty: any
      share: [encoder]                  # what may leave the site: encoder and/or all
      require_dp: false                 # decline plans that train this site without DP-SGD
      max_epsilon: null                 # decline plans whose target epsilon for this site is higher
      max_local_steps: null             # decline plans with more local steps per round
      manual_approval: false            # a new plan waits for `fedssl node approve`
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedssl.config import ConfigError, check_name, from_dict, read_yaml, to_dict

SHARE_CHOICES = ("encoder", "all")


@dataclass(frozen=True)
class SitePolicy:
    """What the site accepts; a round whose plan exceeds it is declined with the reason."""

    objectives: tuple[str, ...] = ()
    encoders: tuple[str, ...] = ()
    share: tuple[str, ...] = ("encoder",)
    require_dp: bool = False
    max_epsilon: float | None = None
    max_local_steps: int | None = None
    manual_approval: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.share) - set(SHARE_CHOICES))
        if unknown or not self.share:
            raise ConfigError(f"share: expected a non-empty list of {list(SHARE_CHOICES)}, got {list(self.share)}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"max_epsilon: must be > 0, got {self.max_epsilon}")
        if self.max_local_steps is not None and not self.max_local_steps > 0:
            raise ConfigError(f"max_local_steps: must be > 0, got {self.max_local_steps}")


@dataclass(frozen=True)
class SiteFile:
    """One hospital's `site.yaml` (see the module docstring); paths are absolute once loaded."""

    site: str
    records: str
    work: str
    state: str
    superlink: str = "127.0.0.1:9091"
    ca_certificate: str | None = None
    node_key: str | None = None
    labels_csv: str | None = None
    log: str | None = None
    port: int = 9094
    worker: bool = True  # a warm worker process (client/worker.py) answers the node's messages
    policy: SitePolicy = field(default_factory=SitePolicy)

    def __post_init__(self) -> None:
        check_name(self.site, "site")
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or "://" in self.superlink:
            raise ConfigError(f"superlink: expected host:port (no https://), got {self.superlink!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be a TCP port, got {self.port}")

    @property
    def log_file(self) -> Path:
        return Path(self.log) if self.log else Path(self.state) / "node.log"


def load_site_file(path: str | Path) -> SiteFile:
    """Read and check a site file; a ConfigError names the file and the key."""
    path = Path(path)
    values = read_yaml(path, "site file")
    try:
        site = from_dict(SiteFile, values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    paths = ("records", "work", "state", "ca_certificate", "node_key", "labels_csv", "log")
    resolved = {k: str((path.parent / getattr(site, k)).resolve()) for k in paths if getattr(site, k) is not None}
    return dataclasses.replace(site, **resolved)


def save_site_file(site: SiteFile, path: str | Path) -> Path:
    """Write `site` as a site file that `load_site_file` reads back as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(site), sort_keys=False))
    return path
