"""Model protocol, loaders (MONAI bundle, TorchScript) and the registry read from ``config/models.yaml``."""
