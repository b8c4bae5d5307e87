"""Choosing the model's state dict by content, with every tensor accounted for.

The first part drives ``select_state_dict`` with stand-in leaves (it needs nothing else); the
last part saves real files with torch and reads them through ``open_checkpoint``.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
import torch

from ckpt_tools import open_checkpoint
from ckpt_tools.errors import InvalidCheckpointError, UsageError
from ckpt_tools.formats.wrappers import WRAPPER_KEYS
from ckpt_tools.selection import Alternative, select_state_dict

_IDS = itertools.count()
SIZES = {"F32": 4, "F16": 2}


@dataclass(frozen=True, eq=False)
class T:
    """A tensor leaf as selection sees one: shape, dtype, nbytes and an identity."""

    shape: tuple = ()
    dtype: str = "F32"
    uid: int = field(default_factory=lambda: next(_IDS))
    ckpt_leaf = "tensor"
    ckpt_type_name = "Tensor"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SIZES[self.dtype]

    def identity(self) -> tuple:
        return ("t", self.uid)


class Obj:
    """A placeholder as the inert reader makes one: fields set by BUILD, items by SETITEMS."""

    ckpt_leaf = "inert"

    def __init__(self, dotted: str, items: list | None = None, **fields) -> None:
        self.dotted, self.items, self._fields = dotted, list(items or []), fields

    @property
    def ckpt_type_name(self) -> str:
        return f"{self.dotted} (not executed)"

    def fields(self) -> dict:
        return dict(self._fields)

    def inert_entries(self) -> list:
        return list(self._fields.items()) + list(self.items)


def module(params=None, buffers=None, children=None, non_persistent=(), name="torch.nn.Module") -> Obj:
    return Obj(name, training=True, _parameters=OrderedDict(params or {}), _buffers=OrderedDict(buffers or {}),
               _non_persistent_buffers_set=set(non_persistent), _modules=OrderedDict(children or {}))


def weights(*shapes, dtype="F32", prefix="layer") -> dict:
    return {f"{prefix}.{i}.weight": T(shape, dtype) for i, shape in enumerate(shapes)}


def select(root, **kw):
    return select_state_dict(root, priority=WRAPPER_KEYS, source="ckpt.pt", **kw)


def buckets(selection) -> list[tuple]:
    return [(b.kind, b.path, b.tensors, b.nbytes) for b in selection.accounting.buckets]


# -- the choice ------------------------------------------------------------------------------

def test_scalars_beside_the_model_never_make_the_top_level_the_state_dict():
    model = weights((4, 3), (4,))
    chosen = select({"model": model, "epoch": 3, "step": T(())})
    assert (chosen.path, list(chosen.state)) == ("model", list(model))
    assert chosen.extras == {"epoch": "int", "step": "Tensor"}
    assert chosen.alternatives == []
    assert buckets(chosen) == [("selected", "model", 2, 64), ("extra", "step", 1, 4)]


def test_nanogpt_layout_accounts_for_the_optimizer_and_the_loss():
    model = {"_orig_mod.wte.weight": T((8, 4)), "_orig_mod.ln_f.weight": T((4,))}
    model["_orig_mod.lm_head.weight"] = model["_orig_mod.wte.weight"]  # tied: one tensor, two names
    optimizer = {"state": {0: {"exp_avg": T((8, 4)), "exp_avg_sq": T((8, 4))}},
                 "param_groups": [{"lr": 6e-4, "params": [0]}]}
    chosen = select({"model": model, "optimizer": optimizer, "model_args": {"n_layer": 2}, "iter_num": 5,
                     "best_val_loss": T(()), "config": {"batch_size": 12}})
    assert (chosen.path, list(chosen.state)) == ("model", list(model))
    assert buckets(chosen) == [("selected", "model", 2, 144), ("optimizer", "optimizer", 2, 256),
                               ("extra", "best_val_loss", 1, 4)]
    assert (chosen.accounting.tensors, chosen.accounting.nbytes) == (5, 404)


@pytest.mark.parametrize(("name", "ema"), [("state_dict", "state_dict_ema"), ("model", "model_ema"),
                                           ("model", "ema"), ("state_dict", "model_ema")])
def test_wrapper_priority_breaks_ties_between_comparable_state_dicts(name, ema):
    chosen = select({ema: weights((3, 2), (2,)), name: weights((3, 2), (2,)), "epoch": 1})
    assert chosen.path == name
    assert chosen.alternatives == [Alternative(ema, "state dict", 2, 32)]
    assert chosen.alternatives[0].select == ema


def test_an_ema_kept_in_another_dtype_is_still_a_tie():
    chosen = select({"model_ema": weights((8, 8), dtype="F32"), "model": weights((8, 8), dtype="F16")})
    assert chosen.path == "model"


def test_more_bytes_win_over_a_preferred_name_when_not_comparable():
    chosen = select({"state_dict": weights((2,)), "teacher": weights((64, 64), (64,), prefix="block")})
    assert chosen.path == "teacher"
    assert [a.path for a in chosen.alternatives] == ["state_dict"]


def test_parameter_like_names_win_over_more_bytes_under_other_keys():
    chosen = select({"samples": {"image 1.png": T((100, 100))}, "model": weights((2, 2))})
    assert chosen.path == "model"


def test_a_nested_state_dict_is_found_and_named_by_its_path():
    chosen = select({"state": {"model": weights((2, 2)), "step": 3}, "version": 1})
    assert chosen.path == "state.model"
    assert chosen.extras == {"state.step": "int", "version": "int"}


def test_non_tensor_entries_of_the_selected_state_dict_are_extras():
    chosen = select({"w": T((2,)), "version": 2})
    assert (chosen.path, list(chosen.state), chosen.extras) == ("", ["w"], {"version": "int"})


@pytest.mark.parametrize("root", [
    {"model": weights((2,)), "optimizer": {"state": {0: {"exp_avg": T((64, 64))}}, "param_groups": []}},
    {"model": weights((2,)), "optimizer_states": [{"state": {0: {"m": T((64, 64))}}, "param_groups": []}]},
    {"model": weights((2,)), "last_optimizer_state": {"fp32": {"w": T((64, 64))}}},
    {"module": weights((2,)), "optimizer": {"fp32_flat_groups": {"group0": T((4096,))}}},
    {"model_state_dict": weights((2,)), "optimizer_state_dict": {"adam": {"w.m": T((64, 64))}}},
], ids=["torch", "lightning", "fairseq", "deepspeed", "training-loop"])
def test_optimizer_state_is_never_the_model(root):
    chosen = select(root)
    assert chosen.path == next(iter(root))
    assert chosen.alternatives == []
    assert [b.kind for b in chosen.accounting.buckets] == ["selected", "optimizer"]


def test_deepspeed_shapes_and_names_hold_no_candidates():
    sd = weights((4, 4), (4,))
    chosen = select({"module": sd, "buffer_names": [], "param_shapes": [OrderedDict({"layer.0.weight": (4, 4)})],
                     "ds_config": {"train_batch_size": 8}, "global_steps": 10})
    assert (chosen.path, chosen.alternatives) == ("module", [])


def test_a_state_dict_held_by_a_placeholder_is_found():
    held = Obj("mylib.StateDict", items=[("w", T((4,))), ("b", T((2,)))])
    chosen = select({"model": held, "args": Obj("argparse.Namespace", lr=0.1)})
    assert (chosen.path, chosen.kind, list(chosen.state)) == ("model", "state dict", ["w", "b"])
    assert chosen.not_executed == {"mylib.StateDict": ["model"], "argparse.Namespace": ["args"]}
    assert chosen.extras == {"args": "argparse.Namespace (not executed)"}


# -- pickled modules ---------------------------------------------------------------------------

def test_a_pickled_module_is_named_as_its_state_dict_would_be():
    conv = module(params={"weight": T((3, 2)), "bias": None}, buffers={"mean": T((3,)), "scratch": T((3,))},
                  non_persistent={"scratch"})
    root = module(children={"backbone": module(children={"0": module(children={"conv": conv})}), "head": None},
                  params={"scale": T(())})
    chosen = select({"model": root, "epoch": 2})
    assert (chosen.path, chosen.kind) == ("model", "module")
    assert list(chosen.state) == ["scale", "backbone.0.conv.weight", "backbone.0.conv.mean"]
    assert chosen.alternatives == []  # its own _parameters mappings are not candidates
    assert buckets(chosen) == [
        ("selected", "model", 3, 40),
        ("extra", "model._modules.backbone._modules.0._modules.conv._buffers.scratch", 1, 12)]


def test_two_pickled_modules_of_one_shape_go_to_the_model():
    chosen = select({"ema": module(params={"w": T((2, 2))}), "model": module(params={"w": T((2, 2))})})
    assert chosen.path == "model"
    assert chosen.alternatives == [Alternative("ema", "module", 1, 16)]


# -- select= -------------------------------------------------------------------------------------

def test_select_overrides_the_choice_and_says_so():
    chosen = select({"model": weights((2, 2)), "model_ema": weights((2, 2))}, select="model_ema")
    assert chosen.path == "model_ema"
    assert chosen.accounting.explicit is True
    assert buckets(chosen) == [("selected", "model_ema", 1, 16), ("alternative", "model", 1, 16)]


def test_select_dot_takes_the_top_level():
    chosen = select({"w": T((2,)), "model": weights((2, 2))}, select=".")
    assert (chosen.path, list(chosen.state)) == ("", ["w"])


@pytest.mark.parametrize(("path", "message"), [
    ("nope", "--select nope: no such entry in the checkpoint; fix: choose one of the state dicts found: "
             "model, model_ema"),
    ("config", "--select config: the entry holds no tensors"),
    ("optimizer.state", "--select optimizer.state: the entry's tensors are keyed by int, not by names"),
    ("config.lr", "--select config.lr: the entry is a value of type int, not a state dict"),
    ("model.layer.0.weight", "--select model.layer.0.weight: the entry is a single tensor, not a state dict"),
    ("optimizer", "--select optimizer: the entry's tensors sit one level deeper; fix: select one of its "
                  "entries: optimizer.state"),
])
def test_select_errors_name_what_is_there(path, message):
    root = {"model": weights((2, 2)), "model_ema": weights((2, 2)), "config": {"lr": 1},
            "optimizer": {"state": {0: T((2,))}, "param_groups": []}}
    with pytest.raises(UsageError) as info:
        select(root, select=path)
    assert message in str(info.value)


def test_a_wrong_select_on_a_flat_file_names_the_top_level_in_words():
    with pytest.raises(UsageError) as info:
        select({"w": T((2,)), "b": T((2,))}, select="foo")
    assert str(info.value).endswith("fix: choose one of the state dicts found: . (the top level)")


def nested_root() -> dict:
    return {"model": {"encoder": weights((2, 2)), "decoder": weights((2, 2), (3,))}, "epoch": 3}


def test_select_of_a_mapping_of_state_dicts_takes_them_as_one_with_dotted_names():
    chosen = select(nested_root(), select="model")
    assert list(chosen.state) == ["encoder.layer.0.weight", "decoder.layer.0.weight", "decoder.layer.1.weight"]


def test_an_ema_copy_beside_the_model_is_not_a_part_to_take_together():
    chosen = select({"run": {"model": weights((2, 2)), "model_ema": weights((2, 2))}})
    assert (chosen.path, chosen.together) == ("run.model", None)


def test_state_dicts_taken_together_are_neither_alternatives_nor_extras():
    chosen = select(nested_root(), select="model")
    assert (chosen.alternatives, list(chosen.extras)) == ([], ["epoch"])
    assert buckets(chosen) == [("selected", "model", 3, 44)]


def test_a_choice_by_content_names_the_parent_that_takes_siblings_together():
    chosen = select(nested_root())
    assert chosen.path == "model.decoder"
    assert chosen.notes == ["model holds 2 state dicts; --select model takes them together as one "
                            "(3 tensors: encoder.*, decoder.*)"]


# -- nothing to choose ---------------------------------------------------------------------------

@pytest.mark.parametrize(("root", "message"), [
    ({"step": T(()), "epoch": 3}, "no state dict found: the file's 1 tensor sits under step "
                                  "(scalars beside other entries)"),
    ({1: T((2,)), 2: T((3,))}, "no state dict found: the file's 2 tensors sit under 1, 2 (keys that are not strings)"),
    ([T((2,)), T((2,))], "the pickle holds a list, not a dict of tensors"),
    ({"lr": 0.1}, "no tensors found (top-level entries: lr)"),
    (Obj("transformers.training_args.TrainingArguments", lr=0.1),
     "the pickle holds a transformers.training_args.TrainingArguments (not executed), not a dict of tensors"),
])
def test_nothing_to_choose_says_why(root, message):
    with pytest.raises(InvalidCheckpointError) as info:
        select(root)
    assert message in str(info.value)


def test_nesting_past_the_limit_is_reported_not_followed():
    nested: dict = {"w": T((2,))}
    for _ in range(300):
        nested = {"a": nested}
    with pytest.raises(InvalidCheckpointError) as info:
        select(nested)
    assert "entries nest deeper than 200 levels; what lies below them was not searched" in str(info.value)


# -- the report ------------------------------------------------------------------------------------

def test_the_report_lists_choice_alternatives_and_accounting():
    chosen = select({"state_dict": weights((2, 2), (2,)), "state_dict_ema": weights((2, 2), (2,)),
                     "args": Obj("argparse.Namespace", lr=0.1)})
    assert chosen.lines() == [
        "selected: state_dict (state dict, 2 tensors; chosen by content)",
        "also found: state_dict_ema (2 tensors, 24 bytes): --select state_dict_ema",
        "the file holds 4 tensors, 48 bytes",
        "  selected: state_dict (2 tensors, 24 bytes)",
        "  alternative: state_dict_ema (2 tensors, 24 bytes)",
        "not executed: argparse.Namespace at args",
    ]
    assert chosen.to_dict()["accounting"]["selected_fraction"] == 0.5


# -- real files ------------------------------------------------------------------------------------

def real_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"blocks.0.attn.weight": torch.randn(8, 8, generator=generator),
            "blocks.0.attn.bias": torch.randn(8, generator=generator),
            "head.weight": torch.randn(3, 8, generator=generator)}


def test_a_nanogpt_file_converts_every_weight(tmp_path):
    from safetensors.torch import load_file

    from ckpt_tools.convert import convert_to_safetensors

    model = {"_orig_mod." + k: v for k, v in real_weights().items()}
    optimizer = {"state": {i: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.ones_like(v)}
                           for i, v in enumerate(model.values())}, "param_groups": [{"lr": 6e-4, "params": [0, 1, 2]}]}
    torch.save({"model": model, "optimizer": optimizer, "model_args": {"n_layer": 1}, "iter_num": 100,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "shakespeare"}}, tmp_path / "ckpt.pt")
    result = convert_to_safetensors(tmp_path / "ckpt.pt", tmp_path / "model.safetensors")
    written = load_file(tmp_path / "model.safetensors")
    assert sorted(written) == sorted(model)
    assert all(torch.equal(written[k], v) for k, v in model.items())
    assert result.extras == {"optimizer": "dict", "model_args": "dict", "iter_num": "int", "best_val_loss": "Tensor",
                             "config": "dict"}


def test_a_timm_file_lists_its_ema_and_args(tmp_path):
    state, ema = real_weights(0), real_weights(1)
    torch.save({"epoch": 3, "arch": "tiny", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "args": argparse.Namespace(model="tiny", lr=0.1), "state_dict_ema": ema,
                "metric": 0.5}, tmp_path / "checkpoint-3.pth.tar")
    with open_checkpoint(tmp_path / "checkpoint-3.pth.tar") as ckpt:
        assert (ckpt.wrapper, ckpt.keys()) == ("state_dict", list(state))
        assert [a.to_dict() for a in ckpt.alternatives] == [
            {"path": "state_dict_ema", "kind": "state dict", "tensors": 3, "nbytes": 384, "select": "state_dict_ema"}]
        assert ckpt.not_executed == {"argparse.Namespace": ["args"]}
        assert ckpt.accounting.selected_fraction == 0.5
    with open_checkpoint(tmp_path / "checkpoint-3.pth.tar", select="state_dict_ema") as ckpt:
        assert torch.equal(ckpt.tensor("head.weight"), ema["head.weight"])
