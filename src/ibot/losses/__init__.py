"""Logits -> scalar losses: teacher targets (centering), the DINO [cls] loss, the iBOT patch loss, KoLeo."""

from ibot.losses.centering import CENTERINGS, Center, NoCentering, SinkhornKnopp, build_centering
from ibot.losses.dino import DINOClsLoss
from ibot.losses.ibot_patch import IBOTPatchLoss
from ibot.losses.koleo import KoLeoLoss

__all__ = [
    "CENTERINGS",
    "Center",
    "NoCentering",
    "SinkhornKnopp",
    "build_centering",
    "DINOClsLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
]
