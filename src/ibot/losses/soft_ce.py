"""Cross-entropy of student logits against soft teacher targets, K-wide work done in row chunks.

Both iBOT losses are H(p, q) = -sum_k p_k log q_k with q = softmax(z / T), per row of K
prototypes. Written over the whole (rows, K) tensor, that costs several fp32 copies of it in
the forward (the fp32 cast, z / T, log q, p * log q) and keeps log q for the backward; at
K = 8,192 and ~1,700 student rows (config A of ``benchmarks/step.py``) each copy is 57 MB.
Here the fp32 work is done a chunk of rows at a time, and the backward recomputes the softmax
from the logits, which are kept in their own dtype (bf16 under autocast).
"""

from __future__ import annotations

import torch

# Rows per chunk: about this many elements of fp32 scratch (16 MiB) whatever K is.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        rows, width = logits.shape
        loss = logits.new_empty(rows, dtype=torch.float32)
        target_mass = logits.new_empty(rows, dtype=torch.float32)
        for chunk in _row_chunks(rows, width):
            log_probs = torch.log_softmax(logits[chunk].float() / temperature, dim=-1)
            target = targets[chunk].float()
            loss[chunk] = -(target * log_probs).sum(dim=-1)
            target_mass[chunk] = target.sum(dim=-1)
        ctx.save_for_backward(logits, targets, target_mass)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        logits, targets, target_mass = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)
        # d loss_r / d z_r = (sum(p_r) * softmax(z_r / T) - p_r) / T: the softmax is recomputed.
        for chunk in _row_chunks(*logits.shape):
            probs = torch.softmax(logits[chunk].float() / temperature, dim=-1)
            probs.mul_(target_mass[chunk, None]).sub_(targets[chunk].float())
            grad[chunk] = probs.mul_(grad_loss[chunk, None] / temperature)
        return grad, None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R,) fp32: -sum_k targets[r, k] * log_softmax(logits[r] / temperature)[k], for (R, K) inputs.

    Differentiable in ``logits`` only (the teacher's targets carry no gradient). ``targets``
    need not sum to 1: the loss is linear in them, which lets the [cls] loss add up the
    teacher views that one student view is compared with.
    """
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"expected (R, K) logits and targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    # Autocast would run the K-wide products in bf16 and round the loss to 3 digits.
    with torch.autocast(logits.device.type, enabled=False):
        return _SoftCrossEntropy.apply(logits, targets.detach(), temperature)
