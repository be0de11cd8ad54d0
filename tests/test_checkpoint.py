"""Weights in and out: parity with transformers, every format, round trips, sharded loads, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import helpers
from gemma_jax import model, sharding, weights
from gemma_jax.weights import hf as hf_format, layout, native, official as official_format
from gemma_jax.errors import UserError
from gemma_jax.model import ModelConfig

# Odd layer count, 2 query heads per kv head, query scale 24 != head_dim 16, window 8 < length.
CFG_A = ModelConfig(num_layers=3, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
                    query_pre_attn_scalar=24, vocab_size=512, sliding_window=8)
# 4 query heads per kv head, window 5.
CFG_B = ModelConfig(num_layers=4, embed_dim=32, hidden_dim=64, num_heads=8, num_kv_heads=2, head_dim=8,
                    query_pre_attn_scalar=8, vocab_size=256, sliding_window=5)
CAP_SCALE = 4.0  # weight scale that drives both soft-caps (checked in the parity test)
REPO = Path(__file__).resolve().parents[1]


def tokens_and_mask(config, batch=2, length=24, seed=1):
    """Random tokens with the last row right-padded (pad id 0)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, config.vocab_size, (batch, length))
    mask = np.ones_like(tokens)
    mask[-1, length - 7:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def same_tree(a, b, exact=True):
    flat_a, flat_b = layout.flatten(a), layout.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        x, y = np.asarray(flat_a[k]), np.asarray(flat_b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, k
        assert np.array_equal(x, y) if exact else np.allclose(x, y), k


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_a")
    helpers.make_hf_model(CFG_A, path, scale=CAP_SCALE)
    return path


@pytest.fixture(scope="module")
def loaded_a(hf_dir):
    return weights.load(hf_dir)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("config,scale,capped", [(CFG_A, CAP_SCALE, True), (CFG_B, CAP_SCALE, True),
                                                 (CFG_A, 0.25, False), (CFG_A.replace(num_layers=1), 0.25, False)],
                         ids=["gqa2-odd", "gqa4", "mild", "one-layer"])  # one layer: the scan over pairs is empty
def test_parity_with_transformers(tmp_path, config, scale, capped):
    hf_model = helpers.make_hf_model(config, tmp_path, scale=scale)
    tokens, mask = tokens_and_mask(config)
    assert tokens.shape[1] > config.sliding_window
    with helpers.record_attention_logits() as attn_raw:
        ref = helpers.hf_logits(hf_model, tokens, mask)
    cfg, params = weights.load(tmp_path)
    assert cfg == config.replace(query_pre_attn_scalar=float(config.query_pre_attn_scalar))
    out = np.asarray(model.logits(cfg, params, tokens))
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() < 1e-4
    if capped:  # the raw values really pass both caps, so a dropped or swapped cap would show
        assert max(attn_raw) > 55  # attention cap is 50
        assert np.abs(helpers.hf_raw_final_logits(hf_model, tokens)).max() > 60
        assert np.abs(ref).max() > 29.9
    else:
        assert np.abs(ref).max() < 25


def test_sharded_index_and_bf16(tmp_path, loaded_a):
    hf_model = helpers.make_hf_model(CFG_A, tmp_path / "shards", scale=CAP_SCALE, max_shard_size="40KB")
    assert (tmp_path / "shards" / hf_format.INDEX).is_file()
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 3
    cfg, params = weights.load(tmp_path / "shards")
    same_tree(params, loaded_a[1])  # same seed as the single-file fixture

    hf_model.to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "bf16")
    cfg16, p16 = weights.load(tmp_path / "bf16")
    assert cfg16.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p16))
    cfg32, p32 = weights.load(tmp_path / "bf16", dtype="float32")
    assert cfg32.param_dtype == "float32"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p32))
    same_tree(jax.tree.map(lambda x: x.astype(np.float32), p16), p32)
    stored = hf_model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(p32["embedder"]["input_embedding"]), stored)
    # bf16 is written back as BF16 and reads bit-exact.
    weights.save(tmp_path / "bf16_out", cfg16, p16, format="hf")
    header = hf_format.SafetensorsFile(tmp_path / "bf16_out" / "model.safetensors")
    assert header.tensors["model.embed_tokens.weight"]["dtype"] == "BF16"
    orig, back = helpers.read_safetensors_dir(tmp_path / "bf16"), helpers.read_safetensors_dir(tmp_path / "bf16_out")
    for k, v in back.items():
        assert v.dtype == orig[k].dtype and np.array_equal(v.view(np.uint16), orig[k].view(np.uint16)), k


# ----------------------------------------------------------------------------- round trips


def test_round_trip_hf_official_gemma_jax_hf(tmp_path, hf_dir, loaded_a):
    cfg, params = loaded_a
    weights.save(tmp_path / "official", cfg, params, format="official")
    assert weights.detect_format(tmp_path / "official") == "official"
    cfg1, p1 = weights.load(tmp_path / "official")
    assert cfg1 == cfg
    weights.save(tmp_path / "gj", cfg1, p1, format="gemma_jax")
    assert weights.detect_format(tmp_path / "gj") == "gemma_jax"
    cfg2, p2 = weights.load(tmp_path / "gj")
    assert cfg2 == cfg
    weights.save(tmp_path / "hf", cfg2, p2, format="hf", max_shard_bytes=60_000)
    assert (tmp_path / "hf" / hf_format.INDEX).is_file()
    orig, back = helpers.read_safetensors_dir(hf_dir), helpers.read_safetensors_dir(tmp_path / "hf")
    orig.pop("lm_head.weight", None)
    assert orig.keys() == back.keys()
    for k in orig:
        assert back[k].dtype == np.float32 and np.array_equal(orig[k], back[k]), k
    tokens, mask = tokens_and_mask(CFG_A)
    np.testing.assert_array_equal(helpers.hf_logits(tmp_path / "hf", tokens, mask),
                                  helpers.hf_logits(hf_dir, tokens, mask))
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["query_pre_attn_scalar"] == 24 and cfg_json["architectures"] == ["Gemma2ForCausalLM"]


def test_official_vocab_padding(tmp_path):
    cfg = ModelConfig(num_layers=2, embed_dim=8, hidden_dim=16, num_heads=2, num_kv_heads=1, head_dim=4,
                      vocab_size=256000)
    rng = np.random.RandomState(0)  # numpy: jax's RNG takes ~20 s for a 256000-row table on CPU
    params = jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape), np.float32),
                          model.param_shapes(cfg))
    weights.save(tmp_path / "official", cfg, params, format="official")
    meta = official_format.read_metadata(tmp_path / "official" / "gemma2-custom")  # the Kaggle layout
    assert meta["embedder/input_embedding"].shape == (256128, 8)
    assert meta["embedder/input_embedding"].path == ("transformer/embedder", "input_embedding")
    cfg1, p1 = weights.load(tmp_path / "official")
    assert cfg1.vocab_size == 256128
    table = np.asarray(p1["embedder"]["input_embedding"])
    assert not table[256000:].any()
    np.testing.assert_array_equal(table[:256000], np.asarray(params["embedder"]["input_embedding"]))
    weights.save(tmp_path / "hf", cfg1, p1, format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 256000
    cfg2, p2 = weights.load(tmp_path / "hf")
    assert cfg2.vocab_size == 256000
    same_tree(p2, params)


def official_tree(config, layout, seed=0):
    """Random weights in the official per-layer layout: {flat key: {leaf: array}}."""
    rng = np.random.RandomState(seed)
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    tree = {"transformer/embedder": {"input_embedding": r(config.vocab_size, d)},
            "transformer/final_norm": {"scale": r(d)}}
    for i in range(config.num_layers):
        p = f"transformer/layer_{i}/"
        tree.update({p + "attn/q_einsum": {"w": r(n, d, h)}, p + "attn/kv_einsum": {"w": r(2, k, d, h)},
                     p + "attn/attn_vec_einsum": {"w": r(n, h, d)},
                     p + "mlp/gating_einsum": {"w": r(2, d, f) if layout == "DF" else r(2, f, d)},
                     p + "mlp/linear": {"w": r(f, d)}})
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            tree[p + norm] = {"scale": r(d)}
    return tree


def write_orbax(path, tree, writer):
    import orbax.checkpoint as ocp

    if writer == "pytree":
        ocp.PyTreeCheckpointer().save(path, tree)
    else:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, tree)
            ckpt.wait_until_finished()


# What the official files do not store, for CFG_A-shaped checkpoints written by hand.
HPARAMS = dict(query_pre_attn_scalar=24, sliding_window=8, attn_softcap=50.0, final_softcap=30.0)


def nested_tree(flat, wrapper=None):
    """The `gemma` library's own tree (gm.ckpts.save_params) of a flat official tree: nested
    modules, MLP weights as bare arrays, optionally under a 'transformer' or 'params' key."""
    out = {}
    for key, leaves in flat.items():
        parts = key.split("/")[1:]  # without "transformer"
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaves["w"] if parts[-2:-1] == ["mlp"] else dict(leaves)
    return {wrapper: out} if wrapper else out


def layer_of(params, i, num_layers):
    if num_layers % 2 and i == num_layers - 1:
        return params[f"layer_{i}"]
    return jax.tree.map(lambda x: x[i // 2], params["layers"]["local" if i % 2 == 0 else "global"])


@pytest.mark.parametrize("layout,writer", [("DF", "pytree"), ("FD", "standard")])
def test_official_checkpoint_written_by_hand(tmp_path, layout, writer):
    cfg = CFG_A.replace(vocab_size=512 + 128)  # padded like 256000 + 128
    tree = official_tree(cfg, layout)
    kaggle = tmp_path / "kaggle"
    write_orbax(kaggle / "gemma2-test", tree, writer)
    (kaggle / "tokenizer.model").write_bytes(b"spm")
    assert weights.detect_format(kaggle) == "official"
    assert weights.find_tokenizer(kaggle / "gemma2-test") == str(kaggle / "tokenizer.model")
    # No published size and no hyperparameters: refused, naming what to give and where.
    with pytest.raises(UserError, match=r"match no published Gemma 2 size .*query_pre_attn_scalar, sliding_window, "
                                        r"attn_softcap, final_softcap must be given.*gemma_jax_config\.json.*"
                                        r"config=.*--model_config"):
        weights.load(kaggle)
    with pytest.raises(UserError, match=r"so attn_softcap, final_softcap must be given"):
        weights.load(kaggle, config=dict(query_pre_attn_scalar=24, sliding_window=8))
    with pytest.raises(ValueError, match=r"config= says num_heads=8 but the weights .* imply 4"):
        weights.load(kaggle, config={**HPARAMS, "num_heads": 8})
    for where, given in ((kaggle, HPARAMS), (kaggle / "gemma2-test", cfg), (kaggle, None)):
        if given is None:  # the sidecar beside the arrays, as `write` leaves it
            (kaggle / "gemma2-test" / official_format.SIDECAR).write_text(json.dumps(HPARAMS))
        loaded_cfg, params = weights.load(where, config=given)
        assert loaded_cfg == cfg
        for i in range(cfg.num_layers):
            layer = layer_of(params, i, cfg.num_layers)
            p = f"transformer/layer_{i}/"
            np.testing.assert_array_equal(layer["attn"]["q_einsum"]["w"], tree[p + "attn/q_einsum"]["w"])
            np.testing.assert_array_equal(layer["attn"]["kv_einsum"]["w"], tree[p + "attn/kv_einsum"]["w"])
            np.testing.assert_array_equal(layer["attn"]["attn_vec_einsum"]["w"], tree[p + "attn/attn_vec_einsum"]["w"])
            gating = tree[p + "mlp/gating_einsum"]["w"]
            np.testing.assert_array_equal(layer["mlp"]["gating_einsum"]["w"],
                                          gating.transpose(0, 2, 1) if layout == "DF" else gating)
            np.testing.assert_array_equal(layer["mlp"]["linear"]["w"], tree[p + "mlp/linear"]["w"])
            np.testing.assert_array_equal(layer["post_ffw_norm"]["scale"], tree[p + "post_ffw_norm"]["scale"])
        np.testing.assert_array_equal(params["embedder"]["input_embedding"],
                                      tree["transformer/embedder"]["input_embedding"])
    # Written back in the same gating layout, the arrays are unchanged; tokenizer.model sits
    # beside the weights folder, as in a Kaggle download.
    weights.save(tmp_path / "again", loaded_cfg, params, format="official", gating_layout=layout,
                 tokenizer=str(kaggle / "tokenizer.model"))
    assert sorted(x.name for x in (tmp_path / "again").iterdir()) == ["gemma2-custom", "tokenizer.model"]
    import orbax.checkpoint as ocp
    again_dir = tmp_path / "again" / "gemma2-custom"
    meta = ocp.PyTreeCheckpointer().metadata(again_dir).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(meta))
    again = ocp.PyTreeCheckpointer().restore(again_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    for key in tree:
        for name in tree[key]:
            np.testing.assert_array_equal(np.asarray(again[key][name]), tree[key][name])
    assert weights.load(tmp_path / "again")[0] == cfg  # its sidecar holds the hyperparameters


@pytest.mark.parametrize("layout,wrapper,writer", [("FD", None, "standard"), ("DF", "transformer", "standard"),
                                                   ("FD", "params", "pytree")])
def test_official_nested_tree(tmp_path, layout, wrapper, writer):
    """The gemma library's gm.ckpts.save_params tree loads like the flat Kaggle one: same params, same logits."""
    cfg = CFG_A.replace(vocab_size=640)
    flat = official_tree(cfg, layout, seed=3)
    write_orbax(tmp_path / "flat", flat, "pytree")
    write_orbax(tmp_path / "nested", nested_tree(flat, wrapper), writer)
    meta = official_format.read_metadata(tmp_path / "nested")
    assert meta["layer_1/mlp/linear/w"].path == ((wrapper,) if wrapper else ()) + ("layer_1", "mlp", "linear")
    assert weights.detect_format(tmp_path / "nested") == "official"
    cfg_flat, p_flat = weights.load(tmp_path / "flat", config=HPARAMS)
    cfg_nested, p_nested = weights.load(tmp_path / "nested", config=HPARAMS)
    assert cfg_nested == cfg_flat == cfg
    same_tree(p_nested, p_flat)
    tokens, _ = tokens_and_mask(cfg)
    np.testing.assert_array_equal(np.asarray(model.logits(cfg_nested, p_nested, tokens)),
                                  np.asarray(model.logits(cfg_flat, p_flat, tokens)))
    gating = flat["transformer/layer_1/mlp/gating_einsum"]["w"]
    np.testing.assert_array_equal(layer_of(p_nested, 1, cfg.num_layers)["mlp"]["gating_einsum"]["w"],
                                  gating.transpose(0, 2, 1) if layout == "DF" else gating)
    # The old error: AttributeError: 'dict' object has no attribute 'shape'. Now a missing leaf is named.
    broken = nested_tree(flat, wrapper)
    del (broken[wrapper] if wrapper else broken)["layer_2"]["mlp"]["linear"]
    write_orbax(tmp_path / "broken", broken, writer)
    with pytest.raises(ValueError, match=r"missing " + (wrapper + "/" if wrapper else "") + r"layer_2/mlp/linear/w"):
        weights.load(tmp_path / "broken", config=HPARAMS)


# ----------------------------------------------------------------------------- sharded, own formats


def test_sharded_load_on_mesh(tmp_path, hf_dir, loaded_a):
    cfg, params = loaded_a
    mesh = sharding.make_mesh(1, 4, 2)
    weights.save(tmp_path / "official", cfg, params, format="official")
    weights.save(tmp_path / "gj", cfg, params, format="gemma_jax")
    tokens, _ = tokens_and_mask(CFG_A)
    expected_logits = np.asarray(model.logits(cfg, params, tokens))
    for path in (hf_dir, tmp_path / "official", tmp_path / "gj"):
        scfg, sparams = weights.load(path, mesh=mesh)
        assert scfg == cfg
        want = layout.flatten(sharding.param_shardings(cfg, mesh))
        for k, x in layout.flatten(sparams).items():
            assert x.sharding.is_equivalent_to(want[k], x.ndim), (path, k, x.sharding, want[k])
        assert not sparams["layers"]["local"]["mlp"]["gating_einsum"]["w"].sharding.is_fully_replicated
        same_tree(sparams, params)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            out = np.asarray(model.logits(scfg, sparams, tokens))
        np.testing.assert_allclose(out, expected_logits, atol=1e-4)  # sharded sums reorder


def test_gemma_jax_and_workdir(tmp_path, loaded_a):
    import orbax.checkpoint as ocp

    cfg, params = loaded_a
    later = jax.tree.map(lambda x: x * 2, params)
    workdir = tmp_path / "workdir"
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        for step, p in ((10, params), (20, later)):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(p)))
        manager.wait_until_finished()
    native.write_model_json(workdir, cfg, fmt="workdir")
    assert weights.detect_format(workdir) == "workdir"
    wcfg, wparams = weights.load(workdir)
    assert wcfg == cfg
    same_tree(wparams, later)
    _, first = weights.load(workdir / "checkpoints" / "10")
    same_tree(first, params)
    _, bf16 = weights.load(workdir, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(bf16))
    path = weights.save(tmp_path / "gj", cfg, later, format="gemma_jax", tokenizer=__file__)
    assert json.loads((Path(path) / "model.json").read_text())["format"] == "gemma_jax"
    assert (Path(path) / "tokenizer.model").is_file()
    same_tree(weights.load(path)[1], later)
    assert weights.detect_format(Path(path) / "params") == "gemma_jax"


# ----------------------------------------------------------------------------- errors


def rewrite_tensors(directory, edit):
    """Applies `edit` to the tensors of a single-file HF dir and writes them back."""
    from safetensors.numpy import load_file, save_file

    f = Path(directory) / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_config(directory, **changes):
    f = Path(directory) / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def test_errors(tmp_path, hf_dir, loaded_a):
    def copy(name):
        shutil.copytree(hf_dir, tmp_path / name)
        return tmp_path / name

    bad = copy("missing")
    rewrite_tensors(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight in .*model\.safetensors"):
        weights.load(bad)

    bad = copy("shape")
    rewrite_tensors(bad, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": np.zeros((64, 127), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*expected shape \(64, 128\), found \(64, 127\)"):
        weights.load(bad)

    bad = copy("layers")
    edit_config(bad, num_hidden_layers=4, layer_types=None)
    with pytest.raises(ValueError, match=r"num_hidden_layers=4 but the weights have 3 layers"):
        weights.load(bad)

    bad = copy("heads")
    edit_config(bad, num_attention_heads=5)
    with pytest.raises(ValueError, match=r"num_attention_heads\*head_dim = 5\*16 = 80 .* has 64 rows"):
        weights.load(bad)

    with pytest.raises(ValueError, match=r"config=\.\.\.\) is only for official checkpoints"):
        weights.load(hf_dir, config=HPARAMS)

    bad = copy("model_type")
    edit_config(bad, model_type="gemma")
    with pytest.raises(ValueError, match=r"model_type='gemma'"):
        weights.load(bad)

    bad = copy("no_weights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"config\.json but no model\.safetensors"):
        weights.load(bad)

    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"could not detect the checkpoint format .*weights\.bin.*config\.json"):
        weights.load(tmp_path / "unknown")
    with pytest.raises(ValueError, match="does not exist"):
        weights.load(tmp_path / "nowhere")

    cfg = CFG_A.replace(vocab_size=640)
    tree = official_tree(cfg, "FD")
    tree["transformer/layer_1/mlp/linear"]["w"] = np.zeros((128, 63), np.float32)
    write_orbax(tmp_path / "off_shape", tree, "pytree")
    with pytest.raises(ValueError, match=r"transformer/layer_1/mlp/linear/w .*expected shape \(128, 64\), found \(128, 63\)"):
        weights.load(tmp_path / "off_shape", config=HPARAMS)
    tree = official_tree(cfg, "FD")
    del tree["transformer/layer_2/pre_ffw_norm"]
    write_orbax(tmp_path / "off_missing", tree, "pytree")
    with pytest.raises(ValueError, match=r"missing transformer/layer_2/pre_ffw_norm/scale"):
        weights.load(tmp_path / "off_missing", config=HPARAMS)

    gj = weights.save(tmp_path / "gj", *loaded_a, format="gemma_jax")
    native.write_model_json(gj, CFG_A.replace(embed_dim=32))
    with pytest.raises(ValueError, match=r"embedder/input_embedding: expected shape \(512, 32\) .*found \(512, 64\)"):
        weights.load(gj)
    with pytest.raises(ValueError, match="not empty"):
        weights.save(gj, *loaded_a, format="gemma_jax")
    with pytest.raises(ValueError, match="unknown save format 'safetensors'"):
        weights.save(tmp_path / "k", *loaded_a, format="safetensors")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from gemma_jax.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    return train_sentencepiece(["the quick brown fox jumps over the lazy dog 42\n"] * 20, str(path), vocab_size=300)


def test_convert_cli(tmp_path, hf_dir, spm_model):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    shutil.copy(spm_model, src / "tokenizer.model")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def convert(*args, rc=0):
        run = subprocess.run([sys.executable, "-m", "gemma_jax.convert", *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == rc, run.stderr[-3000:]
        return run.stdout if rc == 0 else run.stderr

    out = convert(f"--input={src}", f"--output={tmp_path / 'off'}", "--to=official")
    assert "official" in out and "tokenizer.model" in out
    assert weights.detect_format(tmp_path / "off") == "official"
    assert (tmp_path / "off" / "tokenizer.model").is_file()  # beside the weights folder, as on Kaggle
    convert(f"--input={tmp_path / 'off'}", f"--output={tmp_path / 'back'}", "--to=hf")
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()
    orig, back = helpers.read_safetensors_dir(src), helpers.read_safetensors_dir(tmp_path / "back")
    orig.pop("lm_head.weight", None)
    assert orig.keys() == back.keys() and all(np.array_equal(orig[k], back[k]) for k in orig)

    # A non-empty output is refused in one line that names the CLI's flag; nothing is touched.
    before = {f.name: f.read_bytes() for f in (tmp_path / "back").iterdir()}
    err = convert(f"--input={src}", f"--output={tmp_path / 'back'}", "--to=hf", rc=2)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--overwrite" in lines[0] and "overwrite=True" not in lines[0], err
    assert "Traceback" not in err
    assert {f.name: f.read_bytes() for f in (tmp_path / "back").iterdir()} == before
    # --overwrite replaces the model files (a stale shard index included) and keeps the rest.
    (tmp_path / "back" / "NOTES.md").write_text("mine")
    shutil.copy(tmp_path / "back" / "model.safetensors", tmp_path / "back" / "model-00001-of-00002.safetensors")
    (tmp_path / "back" / hf_format.INDEX).write_text('{"weight_map": {}}')
    convert(f"--input={src}", f"--output={tmp_path / 'back'}", "--to=hf", "--overwrite")
    assert (tmp_path / "back" / "NOTES.md").read_text() == "mine"
    assert not (tmp_path / "back" / hf_format.INDEX).exists()
    assert not (tmp_path / "back" / "model-00001-of-00002.safetensors").exists()
    assert weights.load(tmp_path / "back")[0] == weights.load(src)[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_convert_official_custom_shape_needs_model_config(tmp_path, capsys):
    from gemma_jax import convert

    cfg = CFG_A.replace(vocab_size=640)
    write_orbax(tmp_path / "custom", official_tree(cfg, "FD"), "pytree")
    args = [f"--input={tmp_path / 'custom'}", f"--output={tmp_path / 'hf'}", "--to=hf"]
    with pytest.raises(SystemExit) as exit_info:
        convert.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "match no published Gemma 2 size" in err and "--model_config" in err
    assert not (tmp_path / "hf").exists()
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    assert convert.main(args + [f"--model_config={tmp_path / 'hparams.json'}"]) == 0
    assert weights.load(tmp_path / "hf")[0] == cfg


# ----------------------------------------------------------------------------- overwrite, atomic writes


@pytest.mark.parametrize("fmt", ["hf", "official", "gemma_jax"])
def test_save_refuses_a_non_empty_directory(tmp_path, loaded_a, fmt):
    cfg, params = loaded_a
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(weights.api.OutputExistsError, match=r"not empty .*config\.json.*pass overwrite=True"):
        weights.save(out, cfg, params, format=fmt)
    # Before: hf deleted the shard and rewrote config.json without being asked.
    assert (out / "config.json").read_text() == '{"mine": 1}'
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"someone else's shard"
    weights.save(out, cfg, params, format=fmt, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"  # not a model file: kept
    assert not (out / "model-00001-of-00002.safetensors").exists()  # a stale shard: replaced
    assert weights.detect_format(out) == fmt
    same_tree(weights.load(out)[1], params)
    weights.save(out, cfg, params, format=fmt, overwrite=True)  # again, onto its own output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    workdir = tmp_path / "wd"
    (workdir / "checkpoints").mkdir(parents=True)
    native.write_model_json(workdir, cfg, fmt="workdir")
    with pytest.raises(UserError, match="is a training workdir"):
        weights.save(workdir, cfg, params, format=fmt, overwrite=True)


def test_kill_during_export_leaves_the_old_export(tmp_path, hf_dir, loaded_a, monkeypatch):
    """kill -9 while model.safetensors is half written: the final name still holds the previous
    complete export, and the next save (the trainer's re-run) completes."""
    cfg, params = loaded_a
    out = tmp_path / "export"
    weights.save(out, cfg, params, format="hf")
    before = (out / "model.safetensors").read_bytes()
    script = f"""
import os, signal
from gemma_jax import weights
from gemma_jax.weights import hf
real = hf.write_safetensors
def dying(path, entries, metadata=None):
    real(path, entries[:len(entries) // 2], metadata)  # half the tensors on disk, then SIGKILL
    os.kill(os.getpid(), signal.SIGKILL)
hf.write_safetensors = dying
cfg, params = weights.load({str(hf_dir)!r})
weights.save({str(out)!r}, cfg, params, format="hf", overwrite=True)
"""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == before
    stage = tmp_path / ".export.gemma_jax-partial"
    assert stage.is_dir()  # the half-written copy, under another name
    weights.save(out, cfg, params, format="hf", overwrite=True)
    assert not stage.exists()
    same_tree(weights.load(out)[1], params)
    # An error while writing leaves no staging directory and the old export in place.
    def failing(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_format, "write_safetensors", failing)
    with pytest.raises(OSError, match="No space left"):
        weights.save(out, cfg, params, format="hf", overwrite=True)
    assert not stage.exists() and (out / "model.safetensors").read_bytes() == before


def test_workdir_without_a_checkpoint_loads_its_export_or_says_why(tmp_path):
    """A train.steps=0 run (a baseline) saves no checkpoint, only its export: load reads that;
    a workdir with neither is one UserError, not a raw ValueError."""
    params = model.init_params(CFG_B, jax.random.key(3))
    workdir = tmp_path / "baseline"
    (workdir / "checkpoints").mkdir(parents=True)
    native.write_model_json(workdir, CFG_B)
    with pytest.raises(UserError, match="no finished checkpoint"):
        weights.load(workdir)
    weights.save(workdir / "export", CFG_B, params, format="hf")
    _, loaded = weights.load(workdir)
    same_tree(jax.device_get(params), jax.device_get(loaded), exact=True)
