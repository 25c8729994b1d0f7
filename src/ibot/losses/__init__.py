"""Logits -> losses: teacher targets (centering, MIM tokenizers), DINO [cls] loss, iBOT patch loss, KoLeo."""

from ibot.losses.centering import CENTERINGS, Center, NoCentering, SinkhornKnopp, build_centering
from ibot.losses.dino import DINOClsLoss
from ibot.losses.ibot_patch import IBOTPatchLoss
from ibot.losses.koleo import KoLeoLoss
from ibot.losses.patch_targets import MIM_TARGETS, build_patch_targets

__all__ = [
    "CENTERINGS",
    "Center",
    "NoCentering",
    "SinkhornKnopp",
    "build_centering",
    "DINOClsLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MIM_TARGETS",
    "build_patch_targets",
]
