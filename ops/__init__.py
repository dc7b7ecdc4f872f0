"""Operations tooling around the Flower apps: key material and Flower settings for a real
federation (`ops.deploy`), the hospital's node (`ops.node`), the coordinator's SuperLink, runs and
status (`ops.coordinator`), the app bundle `flwr run` submits (`ops.bundle`) and the bookkeeping of
the Flower processes a runner, a node or a test starts (`ops.processes`).

`ops` runs Flower's commands (`flower-superlink`, `flower-supernode`, `flwr`) as processes and never
imports Flower; it reads the site file, a site's data and state and run folders through `fedssl`
and `client` (docs/architecture.md). Nothing in `fedssl`, `server` or `client` imports it.
"""
