"""Model-config files: keyword arguments as JSON/TOML, relative paths, and how the factory is found."""

from __future__ import annotations

import json

import pytest
import torch
from diffload_models import metas, trained_state
from safetensors.torch import save_file

from ckpt_tools.diff import diff_keys
from ckpt_tools.errors import UsageError
from ckpt_tools.modelconfig import build_from_config, find_factory, read_config


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "vit.json").write_text("{}")
    config = tmp_path / "flamingo.json"
    config.write_text(json.dumps({"lang_encoder_path": "lm", "clip_vision_encoder_path": "./vit.json",
                                  "tokenizer_path": "org/hub-id", "cross_attn_every_n_layers": 4,
                                  "clip_vision_encoder_pretrained": None}))
    kwargs = read_config(config)
    assert kwargs == {"lang_encoder_path": str(tmp_path / "lm"), "clip_vision_encoder_path": str(tmp_path / "vit.json"),
                      "tokenizer_path": "org/hub-id", "cross_attn_every_n_layers": 4,
                      "clip_vision_encoder_pretrained": None}


def test_toml_config_builds_through_an_explicit_factory(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text('factory = "diffload_models:build_tiny"\nevery = 2\n')
    model = build_from_config(config)
    assert model.embed.weight.device.type == "meta"  # the factory takes device: a skeleton
    source = metas(trained_state(build_from_config(config, device=None)))
    assert diff_keys(source, str(config)).verdict == "ok"  # a .toml target is a model config


@pytest.mark.parametrize("text, message", [
    ("{not json", "invalid model config"),
    ("[1, 2]", "table of keyword arguments"),
    ('{"factory": "no_such_module_xyz:build"}', "cannot import model factory"),
    ('{"factory": "unregistered-name"}', "unknown model factory"),
    ('{"factory": "diffload_models:build_tiny", "no_such_argument": 1}', "rejected the config"),
])
def test_bad_configs_are_usage_errors(tmp_path, text, message):
    config = tmp_path / "bad.json"
    config.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        build_from_config(config)
    assert info.value.path == str(config)


def test_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_config(tmp_path / "nope.json")


def test_without_a_factory_key_the_error_says_how_to_name_one(tmp_path, monkeypatch):
    import ckpt_tools.modelconfig as modelconfig

    monkeypatch.setattr(modelconfig, "_registered_factories", dict)
    monkeypatch.setattr(modelconfig, "_preset_factories", set)
    with pytest.raises(UsageError) as info:
        find_factory(None, config_path="x.json")
    assert '"factory"' in info.value.fix
    monkeypatch.setattr(modelconfig, "_preset_factories", lambda: {"diffload_models:build_tiny"})
    assert find_factory(None).__name__ == "build_tiny"


def test_a_config_naming_a_missing_file_is_one_line_naming_the_key(tmp_path, run_cli):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"clip_vision_encoder_path": "./gone/tiny-vit.json"}))
    checkpoint = tmp_path / "c.safetensors"
    save_file({"a": torch.ones(1)}, str(checkpoint))
    result = run_cli("diff", checkpoint, "--model-config", config)
    assert result.exit_code == 2
    assert f"key 'clip_vision_encoder_path': names {tmp_path / 'gone' / 'tiny-vit.json'}, which does not exist" \
        in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
