"""Byzantine-robust aggregation settings: the `federation` keys of FedTrimmedAvg, Krum and MultiKrum.

FedMedian (coordinate-wise median) needs no setting. FedTrimmedAvg drops the `trim_beta` fraction
of sites at both ends of every coordinate. Krum (Blanchard et al., 2017) keeps the one update
closest to its n - f - 2 nearest neighbours, MultiKrum averages the `krum_select` best (0: n - f),
where f = `malicious_sites`; with f > 0 Krum's guarantee needs n >= 2f + 3 sites.
"""

from __future__ import annotations

from typing import Any

from fedssl.config import ConfigError, FederationConfig


def robust_options(fed: FederationConfig, num_sites: int) -> dict[str, Any]:
    """Constructor arguments of `fed.strategy` from the federation section, checked first."""
    if fed.max_update_ratio != 0 and fed.max_update_ratio < 1:
        raise ConfigError(f"federation.max_update_ratio must be 0 (off) or at least 1, got {fed.max_update_ratio}")
    if fed.strategy == "fedtrimmedavg":
        if not 0 <= fed.trim_beta < 0.5:
            raise ConfigError(f"federation.trim_beta must be in [0, 0.5), got {fed.trim_beta}")
        return {"beta": fed.trim_beta}
    if fed.strategy not in ("krum", "multikrum"):
        return {}
    f = fed.malicious_sites
    if f < 0 or (f > 0 and num_sites < 2 * f + 3):
        raise ConfigError(f"federation.malicious_sites: {fed.strategy} tolerates f malicious sites only "
                          f"with at least 2f + 3 sites; {num_sites} sites, f = {f}")
    if fed.strategy == "krum":
        return {"num_malicious_nodes": f}
    if not 0 <= fed.krum_select <= num_sites - f:
        raise ConfigError(f"federation.krum_select must be between 0 (all but the malicious) and "
                          f"{num_sites - f}, got {fed.krum_select}")
    return {"num_malicious_nodes": f, "num_nodes_to_select": fed.krum_select or num_sites - f}
