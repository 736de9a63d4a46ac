"""The pooling a checkpoint declares in its sentence-transformers files, the flags over it, and ``LLM.embed``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import FalconModel as HFModel

from falconlm import LLM
from falconlm.engine.pooling import (
    PoolingConfig,
    PoolingParams,
    read_sentence_transformers_config,
    resolve_pooling_config,
    truncate_prompt,
)

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def write_sentence_transformers(folder: Path, modes: dict[str, bool], modules: list[dict]) -> Path:
    """The files sentence-transformers saves beside a model: modules.json and the Pooling module's config."""
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**config, **modes}))
    return folder


def test_no_modules_json_means_none_and_the_default(tmp_path):
    assert read_sentence_transformers_config(tmp_path) is None
    assert resolve_pooling_config(tmp_path, None, None) == PoolingConfig("last", True, "default")


@pytest.mark.parametrize(
    ("modes", "with_normalize", "expected"),
    [
        ({"pooling_mode_lasttoken": True}, True, ("last", True)),
        ({"pooling_mode_mean_tokens": True}, False, ("mean", False)),
        ({"pooling_mode_cls_token": True}, True, ("cls", True)),
    ],
)
def test_the_pooling_module_and_normalize_are_read(tmp_path, modes, with_normalize, expected):
    modules = [TRANSFORMER, POOLING, NORMALIZE] if with_normalize else [TRANSFORMER, POOLING]
    write_sentence_transformers(tmp_path, modes, modules)
    config = read_sentence_transformers_config(tmp_path)
    assert (config.pooling_type, config.normalize) == expected
    assert config.source.endswith("modules.json")


def test_flags_override_the_checkpoint(tmp_path):
    write_sentence_transformers(tmp_path, {"pooling_mode_mean_tokens": True}, [TRANSFORMER, POOLING, NORMALIZE])
    config = resolve_pooling_config(tmp_path, "last", None)
    assert (config.pooling_type, config.normalize) == ("last", True)
    config = resolve_pooling_config(tmp_path, None, False)
    assert (config.pooling_type, config.normalize) == ("mean", False)
    assert config.source.startswith("flags over")


@pytest.mark.parametrize(
    ("modes", "modules", "message"),
    [
        ({"pooling_mode_max_tokens": True}, [TRANSFORMER, POOLING], "pooling_mode_max_tokens is not supported"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, [TRANSFORMER, POOLING], "exactly one"),
        ({}, [TRANSFORMER, POOLING], "exactly one"),
        (
            {"pooling_mode_lasttoken": True},
            [TRANSFORMER, POOLING, {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
            "Dense module is not supported",
        ),
        ({"pooling_mode_lasttoken": True}, [TRANSFORMER], "no Pooling module"),
    ],
)
def test_what_cannot_be_reproduced_is_a_clear_error(tmp_path, modes, modules, message):
    write_sentence_transformers(tmp_path, modes, modules)
    with pytest.raises(ValueError, match=message):
        read_sentence_transformers_config(tmp_path)


def test_truncate_prompt_keeps_the_last_tokens():
    assert truncate_prompt([1, 2, 3, 4], 2) == [3, 4]
    assert truncate_prompt([1, 2], 5) == [1, 2]
    assert truncate_prompt([1, 2], None) == [1, 2]


@pytest.fixture(scope="module")
def mean_pooling_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with sentence-transformers files asking for mean pooling without Normalize."""
    folder = tmp_path_factory.mktemp("st-mean") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return write_sentence_transformers(folder, {"pooling_mode_mean_tokens": True}, [TRANSFORMER, POOLING])


def test_llm_embed_uses_the_checkpoints_pooling(mean_pooling_checkpoint):
    llm = LLM(mean_pooling_checkpoint, dtype="float32", task="embed")
    assert llm.engine.config.pooling.pooling_type == "mean" and not llm.engine.config.pooling.normalize
    texts = ["Once upon a time", "the fox ran to the river to drink water"]
    outputs = llm.embed(texts)
    ref = HFModel.from_pretrained(mean_pooling_checkpoint, torch_dtype=torch.float32).eval()
    for text, out in zip(texts, outputs, strict=True):
        ids = llm.tokenizer.encode(text)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        assert torch.allclose(torch.tensor(out.outputs.embedding), expected, atol=1e-5)
    # token ids, a request's own params, and truncation to the last tokens
    (single,) = llm.embed([1, 2, 3, 4, 5], PoolingParams(pooling_type="last", normalize=True), truncate_prompt_tokens=3)
    assert single.prompt_token_ids == [3, 4, 5]
    with torch.no_grad():
        last = ref(torch.tensor([[3, 4, 5]])).last_hidden_state[0, -1]
    assert torch.allclose(torch.tensor(single.embedding), F.normalize(last, dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        llm.embed([list(range(1, 200))])
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="embeddings only"):
        llm.generate("hello")


def test_llm_flags_override_and_a_generate_model_embeds_too(mean_pooling_checkpoint):
    llm = LLM(mean_pooling_checkpoint, dtype="float32", pooling="last", normalize=True)
    assert llm.engine.config.pooling.pooling_type == "last" and llm.engine.config.pooling.normalize
    (out,) = llm.embed("hello fox")
    assert abs(torch.tensor(out.embedding).norm().item() - 1) < 1e-5
    assert llm.generate("hello", None)[0].outputs[0].finish_reason is not None
