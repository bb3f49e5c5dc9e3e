"""vitlab: vision-transformer backbones (PVT, PVTv2, Pale, GPViT, ScalableViT) on Lightning + Hydra.

    import vitlab
    model = vitlab.create_model("pvt_v2_b2", num_classes=1000)
"""

__all__ = ["available_backbones", "create_backbone", "create_model"]


def __getattr__(name: str):
    # Lazy: the model/task/data modules import no Hydra; only the config-composing API does.
    if name in __all__:
        from vitlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
