"""fedssl: federated self-supervised pretraining of ECG foundation models."""
