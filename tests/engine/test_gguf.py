"""GGUF import: a file written as llama.cpp's converter writes it, from a checkpoint and a
tokenizer made here, comes back as the same model (the same logits) and the same tokenizer
(the same ids); a bad file gets an error naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.gguf_files import CHAT_TEMPLATE, train_tokenizer, write_gguf

from engine import LLM, EngineConfig
from engine.gguf import GGUFError, GGUFFile, import_gguf
from engine.gguf.reader import permute_rows, unpermute_rows
from engine.model_zoo import make_checkpoint, shape_config
from engine.serving.chat_template import ChatTemplate

gguf = pytest.importorskip("gguf")

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
PROMPT = list(range(3, 60))
TEXTS = ["def f(x):\n    return os.path.join(x, 'a')  # comment\n\n\tif x: pass",
         "你好，世界！日本語のテキスト。한국어 문장입니다.", "emoji 😀🎉👍🏽 and digits 12345 67.89",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "  spaces   and\n\n\nnewlines",
         "don't won't I'm we'll", "café naïve résumé", ""]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    cfg = {**shape_config("tiny"), "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
           "num_key_value_heads": 2}
    shape = root / "gqa.json"
    shape.write_text(json.dumps(cfg))
    model = make_checkpoint(shape, root / "model", seed=3, dtype="float32", init_std=0.1)
    tokenizer = train_tokenizer(cfg["vocab_size"], root)
    shutil.copy(tokenizer, model / "tokenizer.json")
    return model, tokenizer


def _logits(model_dir: Path) -> torch.Tensor:
    with LLM(EngineConfig(model=str(model_dir), dtype="float32", num_threads=1)) as llm:
        return llm.score(PROMPT)


@pytest.fixture(scope="module")
def reference_logits(source) -> torch.Tensor:
    return _logits(source[0])


def test_the_row_order_round_trips():
    for rows, heads in ((64, 4), (32, 2), (8, 1)):
        order = permute_rows(rows, heads)
        assert sorted(order) == list(range(rows)) and list(order) != list(range(rows))
        assert np.array_equal(order[unpermute_rows(rows, heads)], np.arange(rows))


def _as_stored(model: Path, out: Path, qtype: str) -> Path:
    """A copy of `model` whose weights went through `qtype` and back, as write_gguf stores them."""
    from safetensors.numpy import load_file, save_file

    kind = gguf.GGMLQuantizationType[qtype]
    tensors = {name: (gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).astype(np.float32)
                      if w.ndim == 2 else w) for name, w in load_file(str(model / "model.safetensors")).items()}
    shutil.copytree(model, out)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_an_imported_gguf_gives_the_logits_of_its_weights(source, reference_logits, tmp_path, qtype):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / f"m.{qtype}.gguf", qtype)
    out = import_gguf(path, tmp_path / "imported", dtype="float32")
    logits = _logits(out)
    expected = reference_logits if qtype == "F32" else _logits(_as_stored(model, tmp_path / "stored", qtype))
    error = float((logits - expected).abs().max() / expected.abs().max())
    assert error <= 1e-5, f"{qtype}: relative logit error {error:.2e}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gguf_source"]["tensor_types"].get(qtype, 0) > 0


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_weights_are_imported_exactly_as_gguf_dequantizes_them(source, tmp_path, qtype):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    expected = gguf.quants.dequantize(raw.data, raw.tensor_type)
    out = import_gguf(path, tmp_path / "imported", dtype="float32")
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_are_kept_as_int4_without_rounding(source, tmp_path, request, qtype):
    """keep_quantized: every Q4 matrix becomes the engine's int4 (groups of 32) holding exactly
    the values the file holds, and the engine runs the same model as the dequantized import."""
    from safetensors.torch import load_file

    from engine.model_config import ModelConfig
    from engine.models.llama import linear_shapes
    from engine.quantization import QuantizedWeight

    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / f"m.{qtype}.gguf", qtype)
    kept = import_gguf(path, tmp_path / "kept", dtype="float32", keep_quantized=True)
    plain = import_gguf(path, tmp_path / "plain", dtype="float32")
    cfg = json.loads((kept / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "pilot", "bits": 4, "group_size": 32}
    stored, floats = load_file(str(kept / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    linears = linear_shapes(ModelConfig.from_dir(kept))
    for prefix in linears:
        weight = QuantizedWeight.from_checkpoint(stored[f"{prefix}.qweight"], stored[f"{prefix}.scales"],
                                                 stored[f"{prefix}.mins"], 4, 32)
        assert torch.equal(weight.dequantize(), floats[f"{prefix}.weight"]), prefix
    assert torch.equal(stored["model.embed_tokens.weight"], floats["model.embed_tokens.weight"])
    request.getfixturevalue("pytorch_paths")  # int4 dequantized per call: the same float weights
    error = float((_logits(kept) - _logits(plain)).abs().max() / _logits(plain).abs().max())
    assert error <= 1e-5


def test_keeping_blocks_the_engine_cannot_hold_is_refused(source, tmp_path):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / "m.Q8_0.gguf", "Q8_0")
    with pytest.raises(GGUFError, match="keeps Q4_0 and Q4_1 matrices as int4; this file's matrices are also Q8_0"):
        import_gguf(path, tmp_path / "kept", keep_quantized=True)
    assert not (tmp_path / "kept" / "config.json").exists()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_blocks_are_read_as_gguf_dequantizes_them(tmp_path, qtype):
    # gguf's Python code dequantizes K-quants but cannot write them: random blocks stand in.
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = np.random.default_rng(0).integers(0, 256, size=(6, 512 // block * size), dtype=np.uint8)
    blocks.view(np.uint16)[:] &= 0x3BFF  # every 16-bit scale a finite half float
    source = GGUFFile.open(_one_tensor_file(tmp_path / "k.gguf", "llama", "blk.0.ffn_up.weight", blocks, kind))
    tensor = source.tensors["blk.0.ffn_up.weight"]
    values = source.dequantize("blk.0.ffn_up.weight", tensor)
    assert values.shape == (6, 512) and np.isfinite(values).all()
    assert np.array_equal(values, gguf.quants.dequantize(blocks, kind))


def test_a_qwen2_file_keeps_its_row_order_and_biases(tmp_path):
    cfg_path = tmp_path / "qwen2.json"
    cfg_path.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                    "tie_word_embeddings": True, "attention_bias": True,
                                    "use_sliding_window": False}))
    model = make_checkpoint(cfg_path, tmp_path / "model", seed=1, dtype="float32", init_std=0.1)
    tokenizer = train_tokenizer(512, tmp_path)
    shutil.copy(tokenizer, model / "tokenizer.json")
    path = write_gguf(model, tokenizer, tmp_path / "q.gguf", "F32")
    out = import_gguf(path, tmp_path / "imported", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] and cfg["attention_bias"]
    torch.testing.assert_close(_logits(out), _logits(model), rtol=0, atol=1e-5)


def test_the_tokenizer_gives_the_original_ids(source, tmp_path):
    from tokenizers import Tokenizer

    model, tokenizer = source
    out = import_gguf(write_gguf(model, tokenizer, tmp_path / "m.gguf"), tmp_path / "imported")
    original, imported = Tokenizer.from_file(str(tokenizer)), Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        ids = original.encode(text).ids
        assert imported.encode(text).ids == ids, text
        assert imported.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    assert len(imported.encode("<|im_start|>").ids) == 1  # control tokens are not split


def test_the_chat_template_and_special_tokens_come_along(source, tmp_path):
    model, tokenizer = source
    out = import_gguf(write_gguf(model, tokenizer, tmp_path / "m.gguf"), tmp_path / "imported")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    cfg = json.loads((out / "config.json").read_text())
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    assert cfg["eos_token_id"] == vocab["<|im_end|>"]
    prompt = ChatTemplate.for_model(out).render([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- bad files ------------------------------------------------------------------------------


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match=r"model.gguf: not a GGUF file \(starts with b'PK"):
        GGUFFile.open(path)
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile.open(tmp_path / "missing.gguf")


def test_a_truncated_file_is_named(source, tmp_path):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="m.gguf: (truncated: tensor .* ends at byte|unreadable GGUF)"):
        GGUFFile.open(path)
    path.write_bytes(data[:20])  # not even the header
    with pytest.raises(GGUFError, match="unreadable GGUF"):
        GGUFFile.open(path)


def _one_tensor_file(path: Path, architecture: str, name: str, values: np.ndarray, kind=None) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor(name, values, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_quantization_type_is_named(tmp_path):
    _one_tensor_file(tmp_path / "iq.gguf", "llama", "blk.0.attn_q.weight", np.zeros((4, 66), dtype=np.uint8),
                     gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(GGUFError, match=r"tensor blk.0.attn_q.weight is IQ2_XXS, not supported; supported: F32"):
        GGUFFile.open(tmp_path / "iq.gguf")


def test_an_unknown_architecture_is_named(tmp_path):
    _one_tensor_file(tmp_path / "mamba.gguf", "mamba", "token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(GGUFError, match=r"general.architecture='mamba' is not supported; supported: llama, qwen2"):
        GGUFFile.open(tmp_path / "mamba.gguf")


def test_missing_metadata_is_named(source, tmp_path):
    model, tokenizer = source
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    source_file = GGUFFile.open(path)
    del source_file.metadata["llama.feed_forward_length"]
    with pytest.raises(GGUFError, match="metadata llama.feed_forward_length is missing"):
        source_file.config()


def test_an_unsupported_tokenizer_is_named(source, tmp_path):
    from engine.gguf.tokenizer import build_tokenizer

    model, tokenizer = source
    metadata = dict(GGUFFile.open(write_gguf(model, tokenizer, tmp_path / "m.gguf")).metadata)
    metadata["tokenizer.ggml.model"] = "llama"
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.model='llama' is not supported"):
        build_tokenizer(metadata, tmp_path / "m.gguf")
    metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"] = "gpt2", "falcon"
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.pre='falcon' is not supported"):
        build_tokenizer(metadata, tmp_path / "m.gguf")


# -- export ----------------------------------------------------------------------------------


def test_an_export_imports_back_to_the_same_weights(source, tmp_path):
    from safetensors.numpy import load_file

    model, tokenizer = source
    out = import_gguf(write_gguf(model, tokenizer, tmp_path / "m.gguf", "F32"), tmp_path / "back", "float32")
    original, back = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == back.keys()
    assert all(np.array_equal(original[name], back[name]) for name in original)


def test_what_cannot_be_exported_is_named(source, tmp_path):
    from engine.gguf.writer import export_gguf
    from engine.quantize_checkpoint import quantize_checkpoint

    model, _ = source
    with pytest.raises(GGUFError, match="qtype: 'Q4_K' is not one of F32"):
        export_gguf(model, tmp_path / "x.gguf", "Q4_K")
    quantized = quantize_checkpoint(model, tmp_path / "int8", "int8")
    with pytest.raises(GGUFError, match="only float llama and qwen2 checkpoints are exported"):
        export_gguf(quantized, tmp_path / "x.gguf")
    bare = make_checkpoint("tiny", tmp_path / "bare", seed=0, dtype="float32")
    with pytest.raises(GGUFError, match="no tokenizer.json to export"):
        export_gguf(bare, tmp_path / "x.gguf")
