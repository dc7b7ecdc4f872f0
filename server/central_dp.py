"""Site-level (central) DP: Flower's fixed-clipping wrappers, accounted, over a fixed denominator.

`federation.central_dp: server|client`: every sampled site's update is clipped to norm C (by the
server here, or by the site before it packs its reply: `fedssl.federated.clip_update`; the server
clips those again, since a float16 reply can round a clipped update a little above C) and Flower's
`DifferentialPrivacyClientSideFixedClipping` adds Gaussian noise of std `sigma * C / n` to the mean
of the n sampled sites' updates. That is the Gaussian
mechanism on a sum of n terms of norm <= C, so each round is (epsilon, delta)-DP with respect to
adding or removing one *site's* whole data; the wrapper's accountant composes one release per
round (no sampling amplification: every site trains every round).

The bound only holds for an unweighted mean over exactly n updates, so Flower's accounted wrappers
refuse a round with unequal weights or fewer replies. `CentralDP` makes every round such a
mean (DP-FedAvg with a fixed denominator, McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018): each reply is weighted 1 (`SITE_WEIGHT_KEY`) whatever its
number of windows, and a sampled site that sent no usable update (it declined for its sample-level
privacy budget, failed, timed out, or validation rejected its update) counts as a zero update (the
global model it was sent), so the sum still has n terms of norm <= C and the noise still fits.
The round's loss means stay the window-weighted means over the sites that really trained. The
server clips here rather than in Flower's server-side wrapper, whose clipping divides by the
update's norm and fails on a zero update.

The accountant implements Flower's `PrivacyAccountant` interface with Opacus' RDP analysis (the
one behind each site's sample-level ledger): Flower's own `RdpAccountant` needs the optional
`flwr[dp]` dependency (Google's dp-accounting). Without sampling amplification both compute the
Renyi DP alpha / (2 sigma^2) per release.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from fedssl.federated import clip_update

CENTRAL_DP = ("server", "client")  # who clips the updates
SITE_WEIGHT_KEY = "central-dp-weight"  # every update's weight in the mean: 1


class SiteLevelAccountant:
    """Flower's `PrivacyAccountant` interface over Opacus' RDP analysis of the Gaussian mechanism:
    every composed event is a release of the mean of all sites (sampling rate 1)."""

    def __init__(self, config: PrivacyConfig) -> None:
        self._config = config
        self._events: list[tuple[float, int]] = []  # (noise multiplier, releases)

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(count for _, count in self._events)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self._events.append((float(event.noise_multiplier), int(count)))

    def get_epsilon(self, delta: float, events: list[tuple[float, int]] | None = None) -> float:
        from fedssl.privacy import compute_epsilon

        return compute_epsilon([(sigma, 1.0, count) for sigma, count in (events or self._events)], delta)

    def get_delta(self, epsilon: float) -> float:
        raise NotImplementedError("the site-level accountant reports epsilon at a fixed delta")

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(epsilon=self.get_epsilon(delta), delta=delta, num_releases=self.num_releases,
                            accounting_method="rdp")

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        after = self.get_epsilon(self._config.target_delta, self._events + [(event.noise_multiplier, count)])
        return limit is not None and after > limit

    def state_dict(self) -> dict[str, object]:
        return {"events": [list(e) for e in self._events]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._events = [(float(sigma), int(count)) for sigma, count in state["events"]]


class CentralDP:
    """Site-level DP of the aggregate: Flower's accounted client-side fixed-clipping wrapper around
    the base FedAvg, fed exactly the n sampled sites' updates, each weighted 1, a site without a
    usable update as a zero update (`fixed_denominator`). Not a strategy of its own:
    `FedSSLStrategy` (server/strategy.py) calls it at its place in the round.

    `base` is a FedAvg built with `weighted_by_key=SITE_WEIGHT_KEY`. Without noise there is no
    accountant (clipping alone bounds a site's influence but gives no epsilon). A resumed run
    passes the rounds it already `released` (every completed round released one aggregate).
    """

    def __init__(self, base: FedAvg, mode: str, noise_multiplier: float, clipping_norm: float, sampled: int,
                 sites: int, delta: float, released: int = 0) -> None:
        accountant = None
        if noise_multiplier > 0:
            accountant = SiteLevelAccountant(PrivacyConfig(
                target_delta=delta, population_size=sites, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION))
            if released:
                accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sampled,
                                                        population_size=sites), count=released)
        self.wrapper = DifferentialPrivacyClientSideFixedClipping(
            base, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, num_sampled_clients=sampled,
            accountant=accountant)
        self.clip_at_server = mode == "server"

    def summary(self) -> None:
        log(INFO, "\t├──> Central DP (%s-side clipping) over a fixed denominator: every sampled site weighs 1, "
            "a missing update counts as zero", "server" if self.clip_at_server else "client")
        self.wrapper.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """The base strategy's instructions, planned by the wrapper as one private release. The
        wrapper asks the sites to clip; when the server clips, that request is taken out."""
        sent = list(self.wrapper.configure_train(server_round, arrays, config, grid))
        if self.clip_at_server:
            for content in {id(m.content): m.content for m in sent}.values():  # often one shared RecordDict
                del content["config"][KEY_CLIPPING_NORM]
        return sent

    def aggregate_train(self, server_round: int, sent: list[Message], trained: list[Message],
                        global_arrays: ArrayRecord) -> tuple[ArrayRecord | None, PrivacySpent | None]:
        """The noised mean over the fixed denominator of the instructions `sent`, and the site-level
        privacy spent so far, this round included (None without an accountant)."""
        if len(trained) < len(sent):
            log(INFO, "fedssl | round %d: central DP counts %d of %d sampled sites as a zero update (no usable "
                "update: declined, failed or rejected)", server_round, len(sent) - len(trained), len(sent))
        uniform = fixed_denominator(sent, trained, global_arrays, self.wrapper.clipping_norm)
        arrays, _ = self.wrapper.aggregate_train(server_round, uniform)
        return arrays, self.wrapper.privacy_spent()


def fixed_denominator(sent: list[Message], trained: list[Message], global_arrays: ArrayRecord,
                      clipping_norm: float) -> list[Message]:
    """One reply per instruction `sent`, each weighted 1 (`SITE_WEIGHT_KEY`): the site's update
    from `trained`, clipped to `clipping_norm`, or for a site without one the global model it was
    sent: a zero update."""
    updates = {m.metadata.src_node_id: next(iter(m.content.array_records.values())) for m in trained}
    weight = MetricRecord({SITE_WEIGHT_KEY: 1.0})
    uniform = []
    for instruction in sent:
        arrays = updates.get(instruction.metadata.dst_node_id)
        if arrays is None:
            arrays = global_arrays
        else:
            arrays = ArrayRecord(clip_update(arrays.to_torch_state_dict(), global_arrays.to_torch_state_dict(),
                                             clipping_norm))
        uniform.append(Message(RecordDict({"arrays": arrays, "metrics": weight}), reply_to=instruction))
    return uniform

