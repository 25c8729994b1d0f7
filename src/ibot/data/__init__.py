"""Images -> crops and masks: datasets, multi-crop transforms, mask generators, collate."""
