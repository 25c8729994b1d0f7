"""Crops -> tokens -> logits: the masked ViT backbone and the projection heads."""
