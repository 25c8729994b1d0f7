"""Logits -> scalar losses: teacher centering, the DINO [cls] loss, the iBOT patch loss, KoLeo."""

from ibot.losses.centering import Center
from ibot.losses.dino import DINOClsLoss
from ibot.losses.ibot_patch import IBOTPatchLoss
from ibot.losses.koleo import KoLeoLoss

__all__ = ["Center", "DINOClsLoss", "IBOTPatchLoss", "KoLeoLoss"]
