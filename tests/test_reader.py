"""The one folder rule of ``ibot.models.reader``: which file each consumer reads from a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ibot.errors import DataError
from ibot.models.reader import BACKBONE, INIT, TOKENIZER, read, resolve


def test_each_purpose_reads_its_file_from_a_run_folder(tmp_path: Path) -> None:
    (tmp_path / "teacher.safetensors").write_bytes(b"")
    assert resolve(tmp_path, INIT) == tmp_path / "teacher.safetensors"  # no checkpoint: the backbone
    torch.save({"step": 1}, tmp_path / "checkpoint-00000001.pt")
    torch.save({"step": 2}, tmp_path / "checkpoint-00000002.pt")
    # Without the checkpoint.pt link, a full checkpoint is the newest step's, for both its readers.
    assert resolve(tmp_path, INIT) == resolve(tmp_path, TOKENIZER) == tmp_path / "checkpoint-00000002.pt"
    assert read(tmp_path, TOKENIZER).loaded == {"step": 2}
    (tmp_path / "checkpoint.pt").symlink_to("checkpoint-00000001.pt")
    assert resolve(tmp_path, TOKENIZER) == tmp_path / "checkpoint.pt"  # the link wins
    assert resolve(tmp_path, BACKBONE) == tmp_path / "teacher.safetensors"  # evaluation: the teacher file alone
    assert resolve(tmp_path / "checkpoint-00000002.pt", BACKBONE) == tmp_path / "checkpoint-00000002.pt"


def test_a_folder_without_the_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"teacher\.safetensors: backbone weights not found"):
        read(tmp_path, BACKBONE)
    with pytest.raises(DataError, match=r"checkpoint\.pt: checkpoint not found"):
        read(tmp_path, TOKENIZER)
