"""Files written by an earlier release still load, to the same ΔW (issue 22: the file format is kept).

`tests/data/release-0.1.0/` was written by commit 116c405 (before `SuperLoRAConfig` became a peft config) with
random non-zero factors on the tiny pipeline: a Tucker cube over UNet + CLIP attention, and the demo's
`tucker-axes` over UNet attention + ResNet convs + CLIP with the "sks" embedding. Beside each adapter,
`expected.safetensors` holds that release's ΔW of the first, middle and last target (and the token offsets).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from safetensors.torch import load_file

from superlora_diffusers.components import find_generators

DATA = Path(__file__).resolve().parent / "data" / "release-0.1.0"


@pytest.mark.parametrize("name", ["lorta-unet-text", "tucker-axes-conv-token"])
def test_a_file_of_the_earlier_release_loads_to_the_same_delta(name):
    expected = load_file(str(DATA / name / "expected.safetensors"))
    pipe = tiny_pipeline()
    pipe.load_superlora_weights(DATA / name)
    adapter = next(iter(find_generators(pipe._superlora_components()).values()))
    with torch.no_grad():
        deltas = dict(zip(adapter.targets, adapter()))
    checked = [k.removeprefix("delta.") for k in expected if k.startswith("delta.")]
    assert len(checked) == 3
    for target in checked:
        torch.testing.assert_close(deltas[target], expected[f"delta.{target}"], rtol=0, atol=1e-6)
    if "token.delta" in expected:
        torch.testing.assert_close(adapter.tokens.delta.detach(), expected["token.delta"], rtol=0, atol=0)
        assert adapter.config.token == "sks"
