"""Sharding presets on 8 fake CPU devices: param PartitionSpecs, and sharded == single-device math."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import load_config
from jaxllm.language_model import build
from jaxllm.sharding import logical_to_spec, make_mesh, make_rules

TOL = dict(atol=1e-5, rtol=1e-5)  # f32; sharded reductions only reorder sums


def test_eight_devices_available():
    assert jax.device_count() == 8


def test_fsdp_tp_param_specs_by_name():
    cfg = load_config(["tiny", "mesh/fsdp_tp"])
    lm = build(cfg)
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}
    sh = lm.param_shardings(mesh)
    specs = jax.tree.map(lambda s: s.spec, sh)
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["blocks"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, head_dim)
    assert specs["blocks"]["attn"]["k"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["blocks"]["attn"]["o"]["kernel"] == P(None, "tensor", None, "fsdp")  # (layers, heads, head_dim, embed)
    assert specs["blocks"]["mlp"]["gate"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks"]["attn_norm"]["scale"] == P(None, None)
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    # actually placed that way: each device holds 1/8 of the q kernel
    params = jax.jit(lm.init, out_shardings=sh)(jax.random.key(0))
    q = params["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)


def test_dp_and_fsdp_presets_specs():
    for preset, embed_spec in (("mesh/dp", P(None, None)), ("mesh/fsdp", P(None, "fsdp"))):
        cfg = load_config(["tiny", preset])
        specs = jax.tree.map(lambda s: s.spec, build(cfg).param_shardings(make_mesh(cfg.mesh)))
        assert specs["embed"]["embedding"] == embed_spec, preset


def test_logical_to_spec_skips_axes_already_used():
    rules = make_rules({"batch": ["data", "fsdp"], "embed": ["fsdp"], "mlp": ["tensor"]})
    assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp", None), rules) == P("fsdp", "tensor", None)
    assert logical_to_spec(("batch", "mlp"), rules, {"data": 1, "fsdp": 4, "tensor": 2}) == P("fsdp", "tensor")


# data parallelism alone (batch split only) is what most training tests run on 8 devices: in the slow set here
# fsdp_tp shards over fsdp and tensor axes at once: the dp and fsdp-only cells are in the slow set
@pytest.mark.parametrize("preset", [pytest.param("mesh/dp", marks=pytest.mark.slow),
                                    pytest.param("mesh/fsdp", marks=pytest.mark.slow), "mesh/fsdp_tp"])
def test_sharded_forward_and_grad_equal_single_device(preset):
    cfg = load_config(["tiny", preset])
    lm = build(cfg)
    params = lm.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.model.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}

    def loss_and_grad(p, b):
        return jax.value_and_grad(lambda p: lm.loss(p, b)[0])(p)

    ref_logits = jax.jit(lm.apply)(params, tokens)
    ref_loss, ref_grad = jax.jit(loss_and_grad)(params, batch)

    mesh = make_mesh(cfg.mesh)
    p_sh = lm.param_shardings(mesh)
    batch_sh = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert")))
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, p_sh)
        sharded_batch = jax.device_put(batch, batch_sh)
        logits = jax.jit(lm.apply)(sharded_params, sharded_batch["inputs"])
        loss, grad = jax.jit(loss_and_grad, out_shardings=(None, p_sh))(sharded_params, sharded_batch)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    chex.assert_trees_all_close(grad, ref_grad, **TOL)
    assert grad["blocks"]["attn"]["q"]["kernel"].sharding.spec == p_sh["blocks"]["attn"]["q"]["kernel"].spec
