"""Any model as a diff target: transformers configs (folder, config.json, hf:// at a commit), timm and
open_clip architectures, a factory; expectations that follow the target; listings cached by data."""

from __future__ import annotations

import json

import pytest
import torch
from diffload_models import build_tiny, metas, trained_state
from safetensors.torch import save_file

import ckpt_tools.targets as targets
from ckpt_tools.diff import diff_keys
from ckpt_tools.errors import UsageError
from ckpt_tools.html import render_html
from ckpt_tools.load import load_checkpoint
from ckpt_tools.meta import TensorMeta
from ckpt_tools.server import HubServer, publish
from ckpt_tools.targets import TargetOptions, module_side, parse_target, target_side
from ckpt_tools.validation import validate

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 50,
         "tie_word_embeddings": False, "dtype": "bfloat16"}
NEOX = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50, "tie_word_embeddings": False}
LLAMA_KEYS = 2 * 9 + 3  # per layer: q, k, v, o, gate, up, down, two norms; embed, final norm, lm_head


def write_config(folder, config) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def model_state(config) -> dict[str, torch.Tensor]:
    """The state dict a model of this config saves, in the config's dtype (built for real: the
    configs are tiny)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(conf)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "skeletons"


@pytest.fixture
def builds(monkeypatch):
    """Every model built for a listing, by target kind (a cached listing builds none)."""
    built: list[str] = []
    real = targets._build

    def counting(spec, device):
        built.append(spec.kind)
        return real(spec, device)

    monkeypatch.setattr(targets, "_build", counting)
    return built


# -- transformers configs -------------------------------------------------------------------------

@pytest.mark.parametrize("config", [LLAMA, NEOX], ids=["llama", "gpt-neox"])
def test_a_folder_and_its_config_json_are_the_same_target(tmp_path, config, builds, cache):
    folder = write_config(tmp_path / "model", config)
    state = model_state(config)
    by_folder = diff_keys(metas(state), folder)
    by_file = diff_keys(metas(state), f"{folder}/config.json")
    assert by_folder.verdict == "ok", by_folder.problems[:3]
    assert by_folder.counts["matched"] == len(state)
    assert by_file.to_dict()["counts"] == by_folder.to_dict()["counts"]
    assert (by_folder.target, by_file.target) == (folder, f"{folder}/config.json")  # as given
    assert builds == ["transformers"]  # the second target's listing came from the cache: same config data
    assert len(list(cache.glob("transformers-*.json"))) == 1


def test_the_listing_follows_the_configs_dtype_and_class(tmp_path):
    folder = write_config(tmp_path / "llama", LLAMA)
    side = target_side(parse_target(folder))
    assert side.metas["model.embed_tokens.weight"] == TensorMeta.of("model.embed_tokens.weight", (50, 16), "BF16")
    assert len(side.metas) == LLAMA_KEYS
    bare = target_side(parse_target(folder, TargetOptions(model_class="LlamaModel")))
    assert "embed_tokens.weight" in bare.metas and "lm_head.weight" not in bare.metas


def test_without_architectures_the_auto_class_for_the_task_builds_it(tmp_path):
    config = {k: v for k, v in LLAMA.items() if k != "architectures"}
    assert "lm_head.weight" in target_side(parse_target(write_config(tmp_path / "a", config))).metas
    renamed = dict(LLAMA, architectures=["MyLlamaFinetuneForCausalLM"])  # a name transformers lacks
    assert "lm_head.weight" in target_side(parse_target(write_config(tmp_path / "b", renamed))).metas


def test_an_unknown_model_class_is_one_line(tmp_path, run_cli):
    folder = write_config(tmp_path / "llama", LLAMA)
    save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    result = run_cli("diff", tmp_path / "x.safetensors", "--model", folder, "--model-class", "NoSuchModel")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "has no class 'NoSuchModel'" in result.stderr


@pytest.mark.parametrize("model_class, message", [
    ("BertForMaskedLM", "transformers could not build the model: AttributeError"),
    ("AutoModelForImageClassification", "AutoModelForImageClassification of transformers .* hold no model"),
])
def test_a_class_that_does_not_fit_the_config_is_a_usage_error(tmp_path, model_class, message):
    folder = write_config(tmp_path / "llama", LLAMA)
    with pytest.raises(UsageError, match=message):
        target_side(parse_target(folder, TargetOptions(model_class=model_class)))


def test_a_tied_head_is_covered_by_the_embedding(tmp_path):
    folder = write_config(tmp_path / "tied", dict(LLAMA, tie_word_embeddings=True, dtype="float32"))
    state = model_state(dict(LLAMA, tie_word_embeddings=True, dtype="float32"))
    del state["lm_head.weight"]  # what save_pretrained writes for tied weights
    report = diff_keys(metas(state), folder)
    assert report.verdict == "ok"
    (entry,) = [e for e in report.entries if "lm_head.weight" in e.names]
    assert entry.names == ["model.embed_tokens.weight", "lm_head.weight"] and entry.status == "matched"


def test_buffers_the_model_recreates_are_ignored_in_a_checkpoint(tmp_path):
    folder = write_config(tmp_path / "neox", NEOX)
    state = metas(model_state(NEOX))
    state["gpt_neox.rotary_emb.inv_freq"] = TensorMeta.of("gpt_neox.rotary_emb.inv_freq", (4,), "F32")  # non-persistent
    state["gpt_neox.layers.0.attention.bias"] = TensorMeta.of("x", (1, 1, 8, 8), "BOOL")  # _keys_to_ignore_on_load_unexpected
    report = diff_keys(state, folder)
    assert report.verdict == "ok"
    assert report.ignored == ["gpt_neox.rotary_emb.inv_freq", "gpt_neox.layers.0.attention.bias"]
    assert report.counts["unexpected"] == 0
    assert [e["status"] for e in report.to_dict()["entries"][-2:]] == ["ignored", "ignored"]
    assert "2 ignored (the model re-creates them)" in report.summary_line()


def test_keys_a_model_ignores_when_missing_and_ties_it_makes_on_load_are_expected():
    class Recreating(torch.nn.Module):
        _keys_to_ignore_on_load_missing = [r"position_ids"]

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            self.register_buffer("position_ids", torch.arange(4))
            self.all_tied_weights_keys = {"head.weight": "embed.weight"}  # tied when loaded, not yet

    model = Recreating()
    report = diff_keys({"embed.weight": TensorMeta.of("embed.weight", (4, 2), "F32")}, model)
    assert report.verdict == "ok"
    reasons = {e.name: (e.status, e.reason) for e in report.entries if e.status != "matched"}
    assert reasons == {"head.weight": ("missing_expected", "tied to embed.weight when the model is loaded"),
                       "position_ids": ("missing_expected", "the model ignores it when missing ('position_ids')")}
    assert module_side(torch.nn.Linear(2, 2)).expected == {}


def test_a_repository_that_needs_its_own_code_is_refused_in_one_line(tmp_path, run_cli):
    folder = write_remote_code_model(tmp_path / "remote")
    save_file({"proj.weight": torch.zeros(3, 3)}, tmp_path / "x.safetensors")
    result = run_cli("diff", tmp_path / "x.safetensors", "--model", folder)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "defined by its repository's own code" in result.stderr
    assert "--trust-remote-code" in result.stderr
    assert not (folder / "ran").exists()  # nothing of the repository was run


def test_trust_remote_code_runs_the_repositorys_code(tmp_path):
    folder = write_remote_code_model(tmp_path / "remote")
    side = target_side(parse_target(folder, TargetOptions(trust_remote_code=True)))
    assert sorted(side.metas) == ["proj.bias", "proj.weight"]
    assert (folder / "ran").exists()


def write_remote_code_model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny-remote", "architectures": ["TinyRemoteModel"], "width": 3,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyRemoteConfig", "AutoModel": "modeling_tiny.TinyRemoteModel"}}))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class TinyRemoteConfig(PretrainedConfig):\n"
        "    model_type = 'tiny-remote'\n\n"
        "    def __init__(self, width=3, **kwargs):\n"
        "        self.width = width\n"
        "        super().__init__(**kwargs)\n")
    (folder / "modeling_tiny.py").write_text(
        "import pathlib\n\nimport torch\nfrom transformers import PreTrainedModel\n\n"
        "from .configuration_tiny import TinyRemoteConfig\n\n"
        f"pathlib.Path({str(folder / 'ran')!r}).touch()\n\n\n"
        "class TinyRemoteModel(PreTrainedModel):\n"
        "    config_class = TinyRemoteConfig\n\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.proj = torch.nn.Linear(config.width, config.width)\n"
        "        self.post_init()\n")
    return folder


def test_a_config_served_by_the_mirror_is_read_at_a_commit(root, tmp_path, builds):
    commit = publish(root, "org/tiny-llama", {"config.json": json.dumps(LLAMA).encode(), "weights.bin": b"x" * 4096})
    state = model_state(LLAMA)
    with HubServer(root) as server:
        report = diff_keys(metas(state), "hf://org/tiny-llama", endpoint=server.endpoint)
        again = diff_keys(metas(state), f"hf://org/tiny-llama@{commit}", endpoint=server.endpoint)
        fetched = sorted({path for _, path, _ in server.stats.requests})
    assert report.verdict == "ok"
    assert report.target == f"hf://org/tiny-llama@{commit}"  # the repository at the commit it was read at
    assert again.target == report.target
    assert f"`hf://org/tiny-llama@{commit}`" in report.to_markdown()
    assert f"hf://org/tiny-llama@{commit}" in render_html("diff", report.to_dict(), command_line="ckpt diff", tool_version="0")
    assert fetched == [f"/org/tiny-llama/resolve/{commit}/config.json", "/org/tiny-llama/resolve/main/config.json"]
    assert builds == ["transformers"]


def test_the_cli_reads_a_hub_config_through_hf_endpoint(root, tmp_path, monkeypatch, run_cli):
    commit = publish(root, "org/tiny-neox", {"config.json": json.dumps(NEOX).encode()})
    weights = tmp_path / "neox.safetensors"
    save_file(model_state(NEOX), weights)
    with HubServer(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        result = run_cli("diff", weights, "--model", "hf://org/tiny-neox@main", "--format", "json")
    assert result.exit_code == 0, result.stdout[-1500:]
    assert json.loads(result.stdout)["target"] == f"hf://org/tiny-neox@{commit}"


# -- timm, open_clip, a factory ---------------------------------------------------------------------

def test_timm_architecture(builds):
    import timm

    with torch.device("meta"):
        reference = timm.create_model("test_vit", pretrained=False).state_dict()
    report = diff_keys(metas(reference), "timm:test_vit")
    assert report.verdict == "ok" and report.counts["matched"] == len(reference)
    assert report.target == "timm:test_vit"
    assert diff_keys(metas(reference), "timm:test_vit").verdict == "ok"
    assert builds == ["timm"]


def test_open_clip_architecture():
    import open_clip

    reference = open_clip.create_model("ViT-S-32", pretrained=None, device="meta").state_dict()
    towers = {k: v for k, v in metas(reference).items() if k.startswith("visual.")}
    report = diff_keys(towers, "open_clip:ViT-S-32", expect_missing=["*"])
    assert report.verdict == "ok"
    assert report.counts["matched"] == len(towers)
    assert report.counts["missing_expected"] == len(reference) - len(towers)


@pytest.mark.parametrize("target, message", [
    ("timm:no_such_net", "has no model 'no_such_net'"),
    ("open_clip:No-Such-CLIP", "open_clip has no model 'No-Such-CLIP'"),
    ("timm:", "timm: needs an architecture name"),
    ("os:getcwd", "the factory returned a str, not a model"),
    ("no_such_package_xyz.models:build", "cannot import model factory"),
    ("./no/such/config.json", "no such file or folder"),
])
def test_bad_targets_are_usage_errors(target, message):
    with pytest.raises(UsageError, match=message):
        target_side(parse_target(target))


def test_a_factory_module_in_the_current_folder_gets_the_pythonpath_fix(tmp_path, monkeypatch):
    (tmp_path / "my_factory_xyz.py").write_text("def build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"my_factory_xyz.py is in this folder.*PYTHONPATH=\. ckpt"):
        target_side(parse_target("my_factory_xyz:build"))


def test_a_factory_builds_on_the_meta_device():
    state = metas(trained_state(build_tiny()))
    report = diff_keys(state, "diffload_models:build_tiny")
    assert report.verdict == "ok" and report.target == "diffload_models:build_tiny"
    # a factory that takes no device runs under torch.device("meta")
    assert targets.build_model("diffload_models:Tiny").model.embed.weight.device.type == "meta"


# -- building a target for a load or a validation -----------------------------------------------------

def test_load_checkpoint_builds_a_transformers_target(tmp_path):
    folder = write_config(tmp_path / "llama", dict(LLAMA, dtype="float32"))
    weights = tmp_path / "llama.safetensors"
    state = model_state(dict(LLAMA, dtype="float32"))
    save_file(state, weights)
    report = load_checkpoint(weights, folder)
    assert report.load["verified"] is True and report.load["loaded"] == len(state)
    assert type(report.model).__name__ == "LlamaForCausalLM"
    assert torch.equal(report.model.lm_head.weight, state["lm_head.weight"])


def test_validate_takes_any_target(tmp_path):
    folder = write_config(tmp_path / "neox", NEOX)
    weights = tmp_path / "neox.safetensors"
    save_file(model_state(NEOX), weights)
    listed = validate(weights, model=folder)
    assert listed.verdict == "ok" and listed.target == folder
    loaded = validate(weights, model=folder, load=True)
    assert loaded.keys.load["verified"] is True


def test_model_config_beside_a_non_preset_model_is_refused(tmp_path):
    folder = write_config(tmp_path / "neox", NEOX)
    with pytest.raises(UsageError, match="--model names the preset"):
        validate(tmp_path / "x.pt", model=folder, model_config=tmp_path / "flamingo.json", load=True)


def test_a_folder_without_config_json_as_a_model_says_what_a_model_folder_holds(tmp_path, run_cli):
    (tmp_path / "model").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    result = run_cli("diff", tmp_path / "w.safetensors", "--model", tmp_path / "model")
    assert result.exit_code == 2
    assert "a transformers model folder holds config.json" in result.stderr


GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 16, "n_layer": 2, "n_head": 2,
        "vocab_size": 50, "n_positions": 32}


def test_an_ignore_pattern_spans_whole_name_segments(tmp_path):
    # GPT-2 ignores 'attn.bias' (a buffer older files hold); a trained 'c_attn.bias' of a layer the
    # model lacks is unexpected, not ignored
    target = write_config(tmp_path / "gpt2", {**GPT2, "bos_token_id": 0, "eos_token_id": 0})
    state = {**metas(model_state(GPT2)), "transformer.h.7.attn.c_attn.bias": TensorMeta.of(
        "transformer.h.7.attn.c_attn.bias", (48,), "F32"), "transformer.h.0.attn.bias": TensorMeta.of(
        "transformer.h.0.attn.bias", (1, 1, 32, 32), "BOOL")}
    report = diff_keys(state, target)
    assert (report.unexpected, report.ignored) == (["transformer.h.7.attn.c_attn.bias"], ["transformer.h.0.attn.bias"])
