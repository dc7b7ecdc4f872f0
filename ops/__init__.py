"""Operations tooling around the Flower apps: key material and Flower settings for a real
federation (`ops.deploy`), the app bundle `flwr run` submits (`ops.bundle`) and the bookkeeping of
the Flower processes a runner or a test starts (`ops.processes`).

Nothing here trains, aggregates or reads ECGs: `ops` imports neither the science core (`fedssl`)
nor the apps (`server`, `client`), and they do not import it (docs/architecture.md).
"""
