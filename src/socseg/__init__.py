"""socseg: segmentation of PXCT volumes of solid oxide cell Ni/YSZ electrodes."""

__version__ = "0.1.0"
