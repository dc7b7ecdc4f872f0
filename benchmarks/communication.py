"""Bytes on the wire per site per round, against the encoder's size; float16 transfer's AUROC effect.

    .venv/bin/python benchmarks/communication.py [--scenario simulations/quickstart.yaml] [--auroc]

Bytes: one round's messages of the default encoder (st_mem tiny, hybrid objective) are built as
the ServerApp and the ClientApp build them (the global model, packed into one Array, + config
with its manifest down; the packed shared weights, their manifest and the metrics up) and counted
as Flower 1.41 sends them: every object of the message (Message, RecordDict, ArrayRecord, Array,
ArrayChunk, ConfigRecord, MetricRecord) deflated, identical objects once (the weights are
perturbed as training would). The number of objects is what the deployment engine moves one
request each. That is compared with
the encoder's parameter bytes in float32, for `federation.share` encoder and all, and
`federation.transfer_dtype` float32 and float16. gRPC framing (a few bytes per object) is left out.

With `--auroc` the scenario (default: the quickstart, without the local-only baselines) is run
twice on Flower's simulation engine with the same seed, once per transfer dtype, and the final
global encoder's linear-probe macro AUROC of both arms is reported. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from client.wire import reply_records
from fedssl.config import Scenario, load_scenario, save_scenario
from fedssl.federated import SHARE_MODES, TRANSFER_DTYPES, shared_state
from fedssl.objectives import build_objective
from fedssl.protocol import SITE_INDEX_KEY
from server.strategy import on_the_wire


def wire_objects(message: Message) -> dict[str, int]:
    """What Flower pushes for `message`: its distinct objects and their bytes, deflated."""
    objects = get_all_nested_objects(message).values()
    return {"objects": len(objects), "bytes": sum(len(obj.deflate()) for obj in objects)}


def trained_state(scenario: Scenario, share: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The shared state with a small seeded perturbation: after training no two arrays are equal,
    while freshly initialised ones (zero biases, unit LayerNorm scales) would be sent once each."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in shared_state(build_objective(scenario), share).items()}


def round_bytes(scenario: Scenario, share: str, dtype: str) -> dict[str, dict[str, int]]:
    """Objects and bytes of one site's round: the train message down and its reply up."""
    state = trained_state(scenario, share)
    config = ConfigRecord({"num-rounds": scenario.federation.rounds, "server-round": 1})
    (down,) = on_the_wire([Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), dst_node_id=1,
                                   message_type="train")], dtype)
    metrics = {"num-examples": 500, "examples-seen": 640, SITE_INDEX_KEY: 0, "loss": 1.0, "generative": 1.0,
               "contrastive": 1.0, "dp-sgd": 0, "epsilon": 0.0, "delta": 0.0}  # what a site sends
    up = Message(RecordDict({**reply_records(state, dtype), "metrics": MetricRecord(metrics)}), reply_to=down)
    return {"down": wire_objects(down), "up": wire_objects(up)}


def transfer_auroc(path: Path, local_baselines: bool) -> dict:
    """Run the scenario once per transfer dtype (same seed) and return each arm's probe AUROCs."""
    from simulations.run import run_scenario

    scenario = load_scenario(path)
    arms = {}
    with tempfile.TemporaryDirectory(prefix="fedssl-transfer-") as tmp:
        for dtype in TRANSFER_DTYPES:
            arm = dataclasses.replace(
                scenario, federation=dataclasses.replace(scenario.federation, transfer_dtype=dtype),
                evaluation=dataclasses.replace(scenario.evaluation, local_baselines=local_baselines))
            arm_path = Path(tmp) / f"{dtype}.yaml"
            save_scenario(arm, arm_path)
            summary = run_scenario(arm_path, Path(tmp) / dtype, echo=lambda line: print(line, file=sys.stderr)).summary
            arms[dtype] = {"final_macro_auroc": summary["encoders"]["federated"]["macro_auroc"],
                           "probe_macro_auroc_by_round": summary["probe_macro_auroc_by_round"],
                           "random_init_macro_auroc": summary["encoders"]["random_init"]["macro_auroc"],
                           "federation_seconds": summary["federation_seconds"]}
    return {"scenario": scenario.name, "seed": scenario.seed, "rounds": scenario.federation.rounds, "arms": arms,
            "float16_minus_float32": arms["float16"]["final_macro_auroc"] - arms["float32"]["final_macro_auroc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", type=Path, default=Path(__file__).resolve().parents[1] / "simulations/quickstart.yaml")
    parser.add_argument("--auroc", action="store_true", help="also run the scenario with both transfer dtypes")
    parser.add_argument("--local-baselines", action="store_true", help="with --auroc: keep the local-only baselines")
    args = parser.parse_args()
    for attribute in ("run_id", "node_id", "task_id"):  # flwr stamps each Message with its run
        setattr(TaskIdentity, attribute, 1)
    scenario = Scenario()
    encoder_bytes = sum(p.numel() * 4 for p in build_objective(scenario).encoder.parameters())
    rows = []
    for share in SHARE_MODES:
        for dtype in TRANSFER_DTYPES:
            sent = round_bytes(scenario, share, dtype)
            total = sent["down"]["bytes"] + sent["up"]["bytes"]
            rows.append({"share": share, "transfer_dtype": dtype, "down_bytes": sent["down"]["bytes"],
                         "up_bytes": sent["up"]["bytes"], "down_objects": sent["down"]["objects"],
                         "up_objects": sent["up"]["objects"], "per_site_per_round_bytes": total,
                         "ratio_to_encoder_float32_bytes": round(total / encoder_bytes, 4)})
    result = {"encoder": f"{scenario.model.encoder} {scenario.model.size}", "objective": scenario.objective.name,
              "encoder_parameter_bytes_float32": encoder_bytes, "rounds": rows}
    if args.auroc:
        result["float16_auroc"] = transfer_auroc(args.scenario, args.local_baselines)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
