"""Config loading, overrides and the errors each bad value gets (before anything compiles)."""

import re

import jax
import pytest

from jaxllm.config import Config, ConfigError, load_config, to_yaml, validate
from jaxllm.language_model import LanguageModel
from jaxllm.sharding import make_mesh


def test_preset_and_overrides_merge_with_types():
    cfg = load_config(["tiny"], ["model.num_layers=3", "train.learning_rate=0.01", "model.attention.sliding_window=8"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_layers == 3 and isinstance(cfg.model.num_layers, int)
    assert cfg.model.d_model == 64  # from configs/tiny.yaml
    assert cfg.train.learning_rate == pytest.approx(0.01)
    assert cfg.model.attention.sliding_window == 8
    assert cfg.model.vocab_size == 320
    # later files override earlier ones; YAML round trip is lossless
    cfg2 = load_config(["tiny", "mesh/fsdp_tp"])
    assert (cfg2.mesh.fsdp, cfg2.mesh.tensor, cfg2.mesh.data) == (-1, 2, 1)
    assert "num_layers: 2" in to_yaml(cfg2)


def test_every_preset_loads():
    from jaxllm.config import CONFIGS_DIR

    presets = sorted(CONFIGS_DIR.rglob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        load_config([path])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.num_layerz=3", r"unknown config key 'model.num_layerz'.*allowed here: \[.*'num_layers'"),
        ("trainer.steps=3", r"unknown config key 'trainer'.*allowed here: \[.*'train'"),
        ("model.attention.window=3", r"unknown config key 'model.attention.window'.*'sliding_window'"),
    ],
)
def test_unknown_keys_name_the_key_and_allowed_keys(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(["tiny"], [override])


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle' \(from .*bad.yaml\)"):
        load_config([f])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.num_layers=abc", r"'model.num_layers'.*'abc'.*Integer"),
        ("model.num_layers=2.5", r"'model.num_layers'.*'2.5'.*Integer"),
        ("train.learning_rate=fast", r"'train.learning_rate'.*'fast'.*Float"),
        ("model.tie_embeddings=maybe", r"'model.tie_embeddings'.*'maybe' is not a valid bool"),
    ],
)
def test_wrong_types_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(["tiny"], [override])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.norm=batchnorm", r"model.norm='batchnorm' is not allowed; choose one of \['rmsnorm', 'layernorm'\]"),
        ("model.mlp.activation=swish", r"model.mlp.activation='swish'.*\['silu', 'gelu', 'gelu_tanh', 'relu'\]"),
        ("model.remat=some", r"model.remat='some'.*\['none', 'full', 'dots', 'dots_no_batch'\]"),
        ("model.attention.impl=magic", r"model.attention.impl='magic'"),
        ("model.dtype=float8", r"model.dtype='float8'.*'bfloat16'"),
        ("model.num_layers=0", r"model.num_layers=0 must be > 0"),
    ],
)
def test_bad_choices_list_allowed_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(["tiny"], [override])


def test_heads_not_divisible_by_kv_heads():
    msg = "model.num_heads=4 is not divisible by model.num_kv_heads=3; allowed num_kv_heads: [1, 2, 4]"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(["tiny"], ["model.num_kv_heads=3"])


def test_heads_not_divisible_by_tensor_axis():
    # tiny: 4 heads, 2 kv heads; tensor=4 splits heads but not kv heads
    with pytest.raises(ConfigError, match=re.escape("model.num_kv_heads=2 is not divisible by the tensor mesh axis (mesh.tensor=4); allowed mesh.tensor: [1, 2]")):
        load_config(["tiny"], ["mesh.tensor=4"])
    # a filled (-1) tensor axis is checked once the device count is known
    cfg = load_config(["tiny"], ["mesh.data=1", "mesh.tensor=-1"])
    with pytest.raises(ConfigError, match=r"model.num_heads=4 is not divisible by the tensor mesh axis \(mesh.tensor=8\)"):
        validate(cfg, num_devices=8)


def test_mesh_product_must_equal_device_count():
    cfg = load_config(["tiny"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"])
    with pytest.raises(ConfigError, match=r"multiply to 4 but there are 8 devices"):
        validate(cfg, num_devices=8)
    cfg = load_config(["tiny"], ["mesh.data=-1", "mesh.fsdp=3"])
    with pytest.raises(ConfigError, match=r"multiply to 3, which does not divide the 8 devices for mesh.data=-1"):
        validate(cfg, num_devices=8)
    with pytest.raises(ConfigError, match=r"at most one mesh axis may be -1"):
        load_config(["tiny"], ["mesh.fsdp=-1"])
    assert validate(load_config(["tiny", "mesh/fsdp_tp"]), 8) == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}


def test_seq_len_beyond_max_positions():
    with pytest.raises(ConfigError, match=re.escape("data.seq_len=256 exceeds model.max_seq_len=128; allowed: data.seq_len <= 128")):
        load_config(["tiny"], ["data.seq_len=256"])


def test_batch_must_split_over_data_axes():
    cfg = load_config(["tiny", "mesh/dp"], ["train.batch_size=12"])
    with pytest.raises(ConfigError, match=r"train.batch_size=12 .* not divisible by the data\*fsdp\*expert mesh axes \(8\)"):
        validate(cfg, 8)
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by train.microbatches=3"):
        load_config(["tiny"], ["train.microbatches=3"])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match=r"key=value"):
        load_config(["tiny"], ["model.num_layers"])
    with pytest.raises(ConfigError, match=r"config file 'nope' not found; presets: \[.*'tiny'"):
        load_config(["nope"])
    with pytest.raises(ConfigError, match=r"mesh.rules.embed names unknown mesh axes \['fdsp'\]"):
        load_config(["tiny"], ["mesh.rules.embed=[fdsp]"])


def test_param_dim_not_divisible_by_mesh_axes_names_the_param():
    cfg = load_config(["tiny", "mesh/fsdp_tp"], ["model.mlp.d_ff=129"])
    lm = LanguageModel(cfg.model, cfg.mesh.rules)
    mesh = make_mesh(cfg.mesh, jax.devices())
    with pytest.raises(ConfigError, match=r"param blocks.mlp.down.kernel dim 1 \(mlp=129\) is not divisible by mesh axes \('tensor',\)"):
        lm.param_shardings(mesh)


def test_hybrid_dcn_mesh_sizes():
    from jaxllm.config import MeshConfig, mesh_shape

    cfg = MeshConfig(data=-1, fsdp=2, dcn_data=2)  # 2 granules (processes) x 4 devices: data 1x2, fsdp 2
    assert mesh_shape(cfg, 8) == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    assert mesh_shape(cfg, 8, per_granule=True) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    with pytest.raises(ConfigError, match=r"mesh.dcn_\* multiply to 3 granules, which does not divide 8 devices"):
        mesh_shape(MeshConfig(dcn_data=3), 8)
    with pytest.raises(ConfigError, match=r"multiply to 3, which does not divide the 4 devices of each of 2 granules"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, dcn_data=2), 8)
