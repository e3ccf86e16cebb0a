"""dermascan: an ISIC 2018/2019 dermoscopic skin-lesion classifier pipeline."""

__version__ = "0.1.0"
