"""Logits -> scalar losses: teacher centering, the DINO [cls] loss and the iBOT patch loss."""

from ibot.losses.centering import Center
from ibot.losses.dino import DINOClsLoss
from ibot.losses.ibot_patch import IBOTPatchLoss

__all__ = ["Center", "DINOClsLoss", "IBOTPatchLoss"]
