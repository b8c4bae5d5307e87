"""Benchmark ``infer_rules`` (remap rules inferred from shapes and structure) on the issue's two sizes.

1. OpenFlamingo-9B: the 158 keys of the published ``checkpoint.pt`` (``data/openflamingo-released-keys.json``)
   against the ``openflamingo-9b-vitl-mpt7b`` preset's meta-device skeleton (648 names; its listing
   comes from the skeleton cache, built once and not timed). Twice: as published (nothing to infer),
   and renamed (PEFT's ``base_model.model.`` prefix and ``gated_cross_attn_layer`` saved as ``xattn``).
   Target < 0.5 s.
2. A 70B-class key set: a LLaMA-2-70B-shaped listing generated from its config (80 layers x 9
   tensors + embedding, norm and head = 723 tensors each side) against the same listing in
   transformers' names. Twice: renamed (PEFT prefix, ``self_attn`` saved as ``attention``, layers saved
   one up: 82 rules to find) and in Meta's original naming (``tok_embeddings``, ``attention.wq``,
   ``feed_forward.w1``...: most pairs need names, two per layer stay ambiguous). Target < 2 s.

Each figure is the median of ``--runs`` in-process calls after one untimed warm-up. The baseline in
the same run is the diff itself (``diff.compare``) on the same two sides, so the ratio says what
inference adds to a diff. ``--scale`` scales the 70B layer count (0.1 -> 8 layers). Prints the
results as JSON and records them in ``<out>/results.json`` for ``run_all.py``.

Example:
    .venv/bin/python scripts/bench/bench_infer.py
    .venv/bin/python scripts/bench/bench_infer.py --scale 0.1 --runs 3
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import harness

from ckpt_tools.diff import compare
from ckpt_tools.infer import infer_rules
from ckpt_tools.meta import TensorMeta
from ckpt_tools.targets import mapping_side, preset_side

LAYOUTS = Path(__file__).resolve().parent / "data" / "openflamingo-released-keys.json"
PRESET_9B = "openflamingo-9b-vitl-mpt7b"
# LLaMA-2-70B: hidden 8192, MLP 28672, 8 key/value heads of 128, vocabulary 32000
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv": 1024, "vocab": 32000, "layers": 80}
# transformers' LLaMA names -> Meta's original ones (llama/model.py)
META_NAMES = ((r"^model\.embed_tokens\.", "tok_embeddings."), (r"^model\.norm\.", "norm."),
              (r"^lm_head\.", "output."), (r"^model\.layers\.", "layers."),
              (r"\.self_attn\.q_proj\.", ".attention.wq."), (r"\.self_attn\.k_proj\.", ".attention.wk."),
              (r"\.self_attn\.v_proj\.", ".attention.wv."), (r"\.self_attn\.o_proj\.", ".attention.wo."),
              (r"\.mlp\.gate_proj\.", ".feed_forward.w1."), (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
              (r"\.mlp\.up_proj\.", ".feed_forward.w3."), (r"\.input_layernorm\.", ".attention_norm."),
              (r"\.post_attention_layernorm\.", ".ffn_norm."))


def llama_listing(layers: int) -> dict[str, TensorMeta]:
    c = LLAMA_70B
    h, i, kv = c["hidden"], c["intermediate"], c["kv"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h), "model.norm.weight": (h,), "lm_head.weight": (c["vocab"], h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return {k: TensorMeta.of(k, s, "BF16") for k, s in shapes.items()}


def renamed(metas: dict[str, TensorMeta], rename: Callable[[str], str]) -> dict[str, TensorMeta]:
    return {rename(k): v.renamed(rename(k)) for k, v in metas.items()}


def peft_shifted(key: str) -> str:
    key = re.sub(r"^model\.layers\.(\d+)\.", lambda m: f"model.layers.{int(m.group(1)) + 1}.", key)
    return "base_model.model." + key.replace(".self_attn.", ".attention.")


def meta_naming(key: str) -> str:
    for pattern, repl in META_NAMES:
        key = re.sub(pattern, repl, key)
    return key


def timed(fn: Callable[[], object], runs: int) -> tuple[harness.Stats, object]:
    out = fn()  # warm-up: caches of the regex engine and the skeleton listing
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    stats = harness.Stats(["in-process"], [harness.Run(w, 0, 0, 0) for w in walls], "warm")
    return stats, out


def scenario(args, operation: str, checkpoint: dict[str, TensorMeta], target, limit_s: float) -> dict:
    """Time ``infer_rules`` and, as the baseline, ``compare`` on the same sides."""
    ck_side = mapping_side(checkpoint, "checkpoint")
    ours, inference = timed(lambda: infer_rules(checkpoint, target.metas, target_aliases=target.groups,
                                                tail_rules=_preset_rules(target)), args.runs)
    baseline, _ = timed(lambda: compare(ck_side, target), args.runs)
    notes = (f"{len(checkpoint)} checkpoint keys vs {len(target.metas)} target names; {inference.summary()}; "
             f"runs: {', '.join(f'{r.wall_s:.4f}' for r in ours.runs)} s")
    entry = harness.result("infer", operation, ours, baseline, baseline_name="diff.compare on the same sides",
                           args=args, max_seconds=limit_s, notes=notes)
    entry["command"] = f"infer_rules(<{operation}>)"
    # in-process timings: no process of its own to sample, so no memory figure
    entry["ours_peak_anon_mb"] = entry["baseline_peak_anon_mb"] = entry["ours_peak_rss_mb"] = None
    entry["rules"] = len(inference.rules)
    entry["median_s"] = statistics.median(r.wall_s for r in ours.runs)
    return harness.record(args, entry)


def _preset_rules(target) -> list:
    from ckpt_tools.remap import rules_from_dicts

    return rules_from_dicts(target.preset.remap) if getattr(target, "preset", None) else []


def main() -> int:
    args = harness.arg_parser(__doc__).parse_args()
    published = json.loads(LAYOUTS.read_text())["openflamingo/OpenFlamingo-9B-vitl-mpt7b"]["tensors"]
    flamingo = {k: TensorMeta.of(k, v["shape"], v["dtype"]) for k, v in published.items()}
    skeleton = preset_side(PRESET_9B)
    layers = max(2, round(LLAMA_70B["layers"] * args.scale))
    llama = mapping_side(llama_listing(layers), f"llama-70b-shaped ({layers} layers)")
    xattn = renamed(flamingo, lambda k: "base_model.model." + k.replace(".gated_cross_attn_layer.", ".xattn."))
    results = [
        scenario(args, "infer_rules, OpenFlamingo-9B published keys vs its skeleton", flamingo, skeleton, 0.5),
        scenario(args, "infer_rules, OpenFlamingo-9B renamed (PEFT prefix, xattn) vs its skeleton", xattn,
                 skeleton, 0.5),
        scenario(args, f"infer_rules, LLaMA-70B-shaped ({len(llama.metas)} tensors) PEFT prefix + rename + "
                 "layers one up", renamed(llama.metas, peft_shifted), llama, 2.0),
        scenario(args, f"infer_rules, LLaMA-70B-shaped ({len(llama.metas)} tensors) in Meta's naming",
                 renamed(llama.metas, meta_naming), llama, 2.0),
    ]
    print(json.dumps([{k: r[k] for k in ("operation", "ours_s", "baseline_s", "ratio", "target", "ok", "rules",
                                         "notes")} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
