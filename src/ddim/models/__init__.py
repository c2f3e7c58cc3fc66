"""The DDPM U-Net, official checkpoint loading and the weight EMA."""
from ddim.models.ema import DEFAULT_EMA_DECAY, EMA
from ddim.models.official import (OFFICIAL_CONFIGS, load_official_unet, official_config, official_state_dict,
                                  unet_kwargs_from_config)
from ddim.models.unet import UNet

__all__ = ["UNet", "load_official_unet", "OFFICIAL_CONFIGS", "official_config", "official_state_dict",
           "unet_kwargs_from_config", "EMA", "DEFAULT_EMA_DECAY"]
