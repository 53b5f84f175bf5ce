"""Causal LM loading: the tiny offline LM goes through the generic loader; errors name the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from insight_core.errors import CheckpointError
from insight_core.models.lm import build_tiny_lm, load_lm
from tests.insight_core.models.test_captioner import CAPTIONS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(
        CAPTIONS * 3, tmp_path_factory.mktemp("tiny_lm"), vocab_size=300, n_embd=64, n_head=2
    )


def test_tiny_lm_loads_through_the_generic_path(lm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert (lm_dir / "model.safetensors").is_file()
    assert (lm_dir / "tokenizer.json").is_file()
    assert not list(lm_dir.glob("*.bin"))
    with caplog.at_level("WARNING"):
        lm, tok = load_lm(str(lm_dir))
    assert "random weights" in caplog.text
    assert tok.pad_token_id is not None
    assert tok.eos_token_id is not None
    ids = tok("a red dog", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "a red dog"
    assert lm.config.hidden_size == 64


def test_load_lm_errors_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"lm='.*nowhere'"):
        load_lm(str(tmp_path / "nowhere"))
