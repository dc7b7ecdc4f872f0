"""fedssl ClientApp: one hospital's local self-supervised training step of a federated round.

The site receives the global model, trains the whole objective (encoder + its own heads) on its
own windows for `train.local_steps` steps, keeps the heads on disk and replies with the shared
weights and scalar metrics only. What is shared is `federation.share`: the encoder (the heads
never leave the site) or the whole objective. With `federation.local_update: fedema` the site
starts from a blend of the global model and its own previous one; with FedProx (the strategy
sends `proximal-mu`) the local loss gets a proximal term. Recordings and windows never leave.

With DP-SGD enabled for the site (`sites[i].privacy`, else the plan's `privacy`), the site
trains with the privacy ledger of its state folder, reports the epsilon it has spent so far and
its delta as the metrics `epsilon` and `delta` (`dp-sgd` 1; a site without DP sends `dp-sgd` 0
and zeros, since every reply must carry the same metric names), and declines a round that would
take it past its target epsilon: it replies with an Error of code `PRIVACY_BUDGET_CODE` and the
fixed reason `PRIVACY_BUDGET_REASON` (nothing about its data), and spends nothing.

The site knows the run only from the plan each message carries (fedssl/plan.py): it reads no
scenario file. It reviews the plan against its site file's policy before it reads any data, and
declines a plan its policy refuses (or, with `manual_approval`, one not yet approved at the site)
with an Error of code `PLAN_DECLINED_CODE` whose reason is about the plan only. Every message it
answers is one line of its audit log (client/audit.py). See client/site_round.py.

Node config: deployment: `site-file` (the hospital's site.yaml, fedssl/sitefile.py: the site's name,
its records and labels on this machine, its window cache `work`, its `state` folder and its policy);
simulation: `partition-id` (the site is the plan's `sites[partition-id]`) with the run config's
`run-dir` (run folder: window cache `<run-dir>/data`, state `<run-dir>/sites/<site>`).

The app runs wherever Flower runs a ClientApp: in Ray actors (simulation), in a `flwr-clientapp`
process per message, or in the site's warm worker (client/worker.py, started by `fedssl node`),
which runs it in one long-lived process for every message. It imports torch only once a message
needs it, so a per-message process pays for Flower's imports alone until then.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received encoder on this site's data; reply with encoder weights + metrics. With
    central DP clipped at the sites (`federation.central_dp: client`) the server sends a clipping
    norm, and the site clips its update before the reply is packed and audited."""
    return answer("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (`evaluation.federated`): probe the global encoder on this site's
    own labelled windows; the reply holds scalars only (AUROC and window counts)."""
    return answer("evaluate", msg, context)


def answer(kind: str, msg: Message, context: Context) -> Message:
    """Hand the message to the site's work (client/site_round.py) and wrap what it returns."""
    from client.site_round import respond  # torch and the site's data: only once a message needs them

    content = respond(kind, msg.content, context.run_config, context.node_config, msg.metadata.run_id)
    return Message(content, reply_to=msg)  # the reply's records, or its Error
