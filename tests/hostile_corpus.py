"""A corpus of broken and hostile checkpoint inputs, generated into a folder.

Every case is small (under a few MiB on disk) and built from scratch: truncations, lying headers,
malformed zips, odd pickles, escaping shard names, symlink loops. ``expect`` says what each
command must answer: 2 (refused with one line) unless listed otherwise; the NaN file is valid.
``scan`` only judges code, so it accepts well-formed pickles that are not state dicts.

Run ``python tests/hostile_corpus.py OUT_DIR`` to write the corpus for manual poking.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    path: Path
    expect: dict[str, int] = field(default_factory=dict)  # command -> exit code; "*" = default

    def exit_code(self, command: str) -> int:
        return self.expect.get(command, self.expect.get("*", 2))


VALID = {"*": 0}
SCAN_OK = {"*": 2, "scan": 0}  # well-formed pickles that are not usable state dicts


# -- safetensors ----------------------------------------------------------------------------

def st_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _st_valid() -> tuple[dict, bytes]:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
    return header, bytes(range(40))


def _with(entry: str, **fields) -> bytes:
    header, data = _st_valid()
    header[entry] = {**header[entry], **fields}
    return st_bytes(header, data)


def safetensors_cases() -> dict[str, tuple[bytes, dict]]:
    header, data = _st_valid()
    good = st_bytes(header, data)
    cases = {f"st-truncated-at-{n}.safetensors": (good[:n], {}) for n in
             (0, 1, 7, 8, 9, 40, len(good) - 41, len(good) - 16, len(good) - 1)}
    dup = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, ' \
          b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}'
    nan = st_bytes({"nan": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
                   struct.pack("<4f", *[float("nan")] * 4))
    cases.update({
        "st-header-past-end.safetensors": (st_bytes(header, data, length=10_000), {}),
        "st-header-absurd.safetensors": (st_bytes(header, data, length=1 << 62), {}),
        "st-header-bad-utf8.safetensors": (st_bytes(b'{"a\xff\xfe": 1}', b""), {}),
        "st-header-bad-json.safetensors": (st_bytes(b'{"a": {"dtype": "F32",', b""), {}),
        "st-header-not-object.safetensors": (st_bytes(b'[1, 2, 3]   ', b""), {}),
        "st-overlapping.safetensors": (_with("b", data_offsets=[16, 32]), {}),
        "st-gapped.safetensors": (st_bytes({"a": header["a"], "b": {**header["b"], "data_offsets": [28, 44]}},
                                           bytes(44)), {}),
        "st-dtype-size-mismatch.safetensors": (_with("a", dtype="F16"), {}),
        "st-shape-size-mismatch.safetensors": (_with("a", shape=[3, 3]), {}),
        "st-unknown-dtype.safetensors": (_with("a", dtype="F31"), {}),
        "st-negative-shape.safetensors": (_with("a", shape=[-2, -3]), {}),
        "st-offsets-past-end.safetensors": (st_bytes({"a": {"dtype": "F32", "shape": [1 << 40],
                                                            "data_offsets": [0, 1 << 42]}}, b""), {}),
        "st-duplicate-keys.safetensors": (st_bytes(dup, bytes(32)), {}),
        "st-metadata-not-str.safetensors": (st_bytes({**header, "__metadata__": {"format": 1}}, data), {}),
        "st-nan-only.safetensors": (nan, VALID),
    })
    return cases


# -- torch zip / legacy / plain pickles -----------------------------------------------------

def _torch_save(obj, legacy: bool = False) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _rezip(data: bytes, edit: Callable[[str, bytes], tuple[str, bytes] | None],
           compression: int = zipfile.ZIP_STORED) -> bytes:
    """Copy a zip record by record through ``edit(name, bytes) -> (name, bytes) or None``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", compression=compression) as dst:
        for info in src.infolist():
            kept = edit(info.filename, src.read(info))
            if kept is not None:
                dst.writestr(kept[0], kept[1])
    return out.getvalue()


def _patch_record(data: bytes, name: str, *, local: dict | None = None, central: dict | None = None) -> bytes:
    """Rewrite fields of one record's local header and/or central-directory entry in place:
    ``flags`` (ORed in), ``crc``, ``name`` (same length)."""
    out = bytearray(data)
    for signature, fields, flags_at, crc_at, name_len_at, name_at in (
            (b"PK\x03\x04", local or {}, 6, 14, 26, 30), (b"PK\x01\x02", central or {}, 8, 16, 28, 46)):
        start = 0
        while (start := out.find(signature, start)) >= 0:
            (length,) = struct.unpack_from("<H", out, start + name_len_at)
            if bytes(out[start + name_at:start + name_at + length]).decode() .endswith(name) and fields:
                if "flags" in fields:
                    (flags,) = struct.unpack_from("<H", out, start + flags_at)
                    struct.pack_into("<H", out, start + flags_at, flags | fields["flags"])
                if "crc" in fields:
                    struct.pack_into("<I", out, start + crc_at, fields["crc"])
                if "name" in fields:
                    out[start + name_at:start + name_at + length] = fields["name"].encode()
            start += 4
    return bytes(out)


def _nested_pickle(depth: int) -> bytes:
    # {"a": {"a": ... {} ...}} written iteratively: pickle.dumps would hit the recursion limit
    return b"\x80\x02" + b"}X\x01\x00\x00\x00a" * depth + b"}" + b"s" * depth + b"."


def _renamed_pickle(data: bytes) -> str:
    """The pickle record's name with its last letters changed (same length)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
    return name[:-3] + "pkx"


def torch_cases() -> dict[str, tuple[bytes, dict]]:
    import torch

    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    good_zip, good_legacy = _torch_save(sd), _torch_save(sd, legacy=True)

    def swap_pickle(payload: bytes) -> bytes:
        return _rezip(good_zip, lambda n, b: (n, payload if n.endswith("data.pkl") else b))

    nan = {"nan": torch.full((2, 2), float("nan"))}
    cases = {f"zip-truncated-at-{n}.pt": (good_zip[:n], {}) for n in (2, 64, len(good_zip) // 2, len(good_zip) - 10)}
    cases.update({f"legacy-truncated-at-{n}.pt": (good_legacy[:n], {}) for n in (12, len(good_legacy) // 2)})
    cases.update({
        "zip-missing-record.pt": (_rezip(good_zip, lambda n, b: None if n.endswith("data/0") else (n, b)),
                                  {"*": 2, "scan": 0}),
        "zip-renamed-record.pt": (_rezip(good_zip, lambda n, b: (n.replace("data.pkl", "model.bin"), b)), {}),
        "zip-bomb.pt": (_rezip(good_zip, lambda n, b: (n, b"\x80\x02" + bytes(48 << 20) if n.endswith("data.pkl") else b),
                               compression=zipfile.ZIP_DEFLATED), {}),
        "zip-non-dict.pt": (_torch_save([sd["w"], sd["b"]]), SCAN_OK),
        "legacy-non-dict.pt": (_torch_save((sd["w"], 3), legacy=True), SCAN_OK),
        "zip-tensor-only.pt": (_torch_save(sd["w"]), SCAN_OK),
        "zip-deeply-nested.pt": (swap_pickle(_nested_pickle(100_000)), SCAN_OK),
        "zip-int-keys.pt": (_torch_save({1: sd["w"], 2: sd["b"]}), SCAN_OK),
        "zip-tuple-keys.pt": (_torch_save({("a", 1): sd["w"]}), SCAN_OK),
        "zip-no-tensors.pt": (_torch_save({"epoch": 3, "lr": 0.1}), SCAN_OK),
        "zip-garbage-pickle.pt": (swap_pickle(b"\x80\x02\xff\xfe garbage"), {}),
        # records a loader and a scanner could read differently (torch's reader ignores these bits)
        **{f"zip-pickle-flag-bit-{bit}.pt": (_patch_record(good_zip, "data.pkl", local={"flags": 1 << bit},
                                                           central={"flags": 1 << bit}), {})
           for bit in (0, 5, 6)},
        "zip-pickle-flag-bit-3-in-local-header-only.pt": (
            _patch_record(_rezip(good_zip, lambda n, b: (n, b)), "data.pkl", local={"flags": 1 << 3}), {}),
        "zip-local-header-names-another-record.pt": (
            _patch_record(good_zip, "data.pkl", local={"name": _renamed_pickle(good_zip)}), {}),
        "zip-pickle-bad-crc.pt": (_patch_record(good_zip, "data.pkl", local={"crc": 0}, central={"crc": 0}), {}),
        "plain-pickle.pkl": (pickle.dumps({"a": [1, 2, 3]}, protocol=4), SCAN_OK),
        "zip-nan-only.pt": (_torch_save(nan), VALID),
        "legacy-nan-only.pt": (_torch_save(nan, legacy=True), VALID),
        "random-bytes.bin": (bytes((i * 7919 + 13) % 251 for i in range(4096)), {}),
    })
    return cases


# -- folders and indexes --------------------------------------------------------------------

def _index(folder: Path, weight_map: dict) -> Path:
    folder.mkdir()
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def folder_cases(root: Path) -> list[Case]:
    header, data = _st_valid()
    cases = []
    escape = _index(root / "index-dotdot", {"a": "../outside.safetensors", "b": "../outside.safetensors"})
    (root / "outside.safetensors").write_bytes(st_bytes(header, data))
    cases.append(Case("index-dotdot", escape))
    cases.append(Case("index-absolute", _index(root / "index-absolute", {"a": str(root / "outside.safetensors")})))
    cases.append(Case("index-missing-shard", _index(root / "index-missing", {"a": "model-00001.safetensors"})))
    bad_json = root / "index-bad-json"
    bad_json.mkdir()
    (bad_json / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    cases.append(Case("index-bad-json", bad_json / "model.safetensors.index.json"))
    wrong = _index(root / "index-wrong-shard", {"a": "s.safetensors", "zzz": "s.safetensors"})
    (wrong.parent / "s.safetensors").write_bytes(st_bytes(header, data))
    cases.append(Case("index-key-not-in-shard", wrong, {"*": 2, "scan": 0}))  # the shard itself is clean
    loop = root / "symlink-loop"
    loop.mkdir()
    os.symlink("model.safetensors", loop / "model.safetensors")
    os.symlink("b.bin", loop / "a.bin")
    os.symlink("a.bin", loop / "b.bin")
    cases.append(Case("folder-symlink-loop", loop))
    cases.append(Case("file-symlink-loop", loop / "model.safetensors"))
    return cases


def build(root: Path) -> list[Case]:
    """Write every case under ``root`` and return them (>= 30)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (data, expect) in {**safetensors_cases(), **torch_cases()}.items():
        path = root / name
        path.write_bytes(data)
        cases.append(Case(name, path, dict(expect)))
    return cases + folder_cases(root)


if __name__ == "__main__":
    for case in build(Path(sys.argv[1] if len(sys.argv) > 1 else "hostile")):
        print(f"{case.name}\t{case.path}\t{case.expect or {'*': 2}}")
