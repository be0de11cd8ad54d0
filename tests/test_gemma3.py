"""Gemma 3: presets, parity with transformers (logits, greedy decoding), Hugging Face and official
weights in and out, the scanned layout of any layer pattern, LoRA, the sampler, a sharded forward.

The reference is transformers' Gemma3ForCausalLM (float32, eager attention), built from
transformers directly (helpers.make_hf_gemma3). Most tests share one module model: gemma3_test,
8 layers (one 5-local + 1-global period, then two local layers: the depth ends mid-cycle), 2 query
heads per kv head, query scalar 24 != head_dim 16, window 8 shorter than every sequence, global
RoPE positions scaled by 1/4.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from gemma_jax import sample as S, sharding, weights
from gemma_jax import model as M
from gemma_jax.config import DEFAULT_LORA_TARGETS
from gemma_jax.errors import UserError
from gemma_jax.model import ModelConfig, kv_cache, lora
from gemma_jax.weights import hf as hf_format, layout, official as official_format

CFG = ModelConfig.from_preset("gemma3_test")
# Published dims (gemma library Gemma3_* classes; the table): layers, width, MLP, heads,
# kv heads, head_dim, window, global RoPE scale, query scalar.
PUBLISHED = {
    "gemma3_270m": (18, 640, 2048, 4, 1, 256, 512, 1.0, 256),
    "gemma3_1b": (26, 1152, 6912, 4, 1, 256, 512, 1.0, 256),
    "gemma3_4b": (34, 2560, 10240, 8, 4, 256, 1024, 8.0, 256),
    "gemma3_12b": (48, 3840, 15360, 16, 8, 256, 1024, 8.0, 256),
    "gemma3_27b": (62, 5376, 21504, 32, 16, 128, 1024, 8.0, 168),
}


def tokens_and_mask(config, batch=2, length=24, seed=1):
    """Random tokens with the last row right-padded (pad id 0)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, config.vocab_size, (batch, length))
    mask = np.ones_like(tokens)
    mask[-1, length - 7:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def boost(hf_model, seed=1):
    """Post-norm scales around 30, so layer outputs outweigh the tied input embedding and greedy
    decoding of the random model writes varied tokens instead of echoing its input."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "post_" in name:
                p.normal_(30.0, 1.0)
    return hf_model


def same_tree(a, b):
    flat_a, flat_b = layout.flatten(a), layout.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(transformers model, its save_pretrained directory) of CFG."""
    path = tmp_path_factory.mktemp("gemma3_hf")
    model = boost(helpers.make_hf_gemma3(CFG))
    model.save_pretrained(str(path))
    return model, path


@pytest.fixture(scope="module")
def loaded(hf_model):
    return weights.load(hf_model[1])


# ----------------------------------------------------------------------------- config and presets


def test_presets_have_the_published_dims_and_parameter_counts():
    import torch
    import transformers

    for name, (layers, d, f, n, k, h, window, scale, scalar) in PUBLISHED.items():
        c = ModelConfig.from_preset(name)
        assert (c.num_layers, c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window,
                c.rope_scale, c.query_pre_attn_scalar) == (layers, d, f, n, k, h, window, scale, scalar), name
        assert (c.family, c.vocab_size, c.rope_base, c.local_rope_base, c.attn_softcap, c.final_softcap,
                c.qk_norm) == ("gemma3", 262144, 1e6, 1e4, 0.0, 0.0, True), name
        assert c.layer_types[:12] == ("local",) * 5 + ("global",) + ("local",) * 5 + ("global",)
    for name in ("gemma3_1b", "gemma3_27b"):  # transformers' model of these dims, built on the meta device
        c = ModelConfig.from_preset(name)
        with torch.device("meta"):
            ref = transformers.Gemma3ForCausalLM(helpers.hf_gemma3_config(c))
        assert c.num_params() == sum(p.numel() for p in ref.parameters()), name
    # transformers' count of the real 270M file (shared/environment_notes.md).
    assert ModelConfig.from_preset("gemma3_270m").num_params() == 268_098_176


def test_layer_pattern_and_scanned_layout():
    assert CFG.layer_types == ("local",) * 5 + ("global", "local", "local")
    assert CFG.block_names == ("local_0", "local_1", "local_2", "local_3", "local_4", "global")
    assert CFG.scanned_layers() == {**{f"local_{p}": [p] for p in range(5)}, "global": [5]}
    assert CFG.unscanned_layers() == [6, 7]
    deep = CFG.replace(num_layers=15)  # two periods and three layers
    assert deep.scanned_layers()["local_1"] == [1, 7] and deep.scanned_layers()["global"] == [5, 11]
    assert deep.unscanned_layers() == [12, 13, 14] and deep.layer_types[12:] == ("local",) * 3
    # Gemma 2's period keeps its historic names (existing checkpoints, adapters, tests).
    g2 = ModelConfig.from_preset("gemma2_test")
    assert g2.block_names == ("local", "global") and g2.unscanned_layers() == [2]
    shapes = M.param_shapes(CFG)
    assert sorted(shapes["layers"]) == sorted(CFG.block_names)
    assert shapes["layers"]["global"]["attn"]["query_norm"]["scale"].shape == (1, CFG.head_dim)
    assert shapes["layer_7"]["attn"]["key_norm"]["scale"].shape == (CFG.head_dim,)
    axes = M.param_axes(CFG)
    assert tuple(axes["layers"]["local_3"]["attn"]["key_norm"]["scale"]) == ("layers", "head_dim")
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == CFG.num_params()
    with pytest.raises(ValueError, match="attention_pattern"):
        CFG.replace(attention_pattern=("local", "sliding"))


def test_config_json_round_trip_and_old_gemma2_files():
    d = json.loads(json.dumps(CFG.to_dict()))  # the pattern comes back as a list
    again = ModelConfig.from_dict(d)
    assert again == CFG and hash(again) == hash(CFG)
    # A model.json written before Gemma 3 existed: no family/pattern/QK-norm/RoPE fields, and a
    # rope_base that applied to every layer.
    old = {k: v for k, v in ModelConfig.from_preset("gemma2_test").to_dict().items()
           if k not in ("family", "attention_pattern", "qk_norm", "local_rope_base", "rope_scale")}
    old["rope_base"] = 20000.0
    cfg = ModelConfig.from_dict(old)
    assert (cfg.family, cfg.attention_pattern, cfg.qk_norm, cfg.rope(True), cfg.rope(False)) == (
        "gemma2", ("local", "global"), False, (20000.0, 1.0), (20000.0, 1.0))


def test_flops_count_local_layers_by_the_pattern():
    c = ModelConfig.from_preset("gemma3_1b")
    t, w = 8192, c.sliding_window
    all_global = c.replace(attention_pattern=("global",))
    local_keys, global_keys = (w * (w + 1) / 2 + (t - w) * w) / t, (t + 1) / 2
    n_local = sum(x == "local" for x in c.layer_types)
    saved = n_local * 4 * c.num_heads * c.head_dim * (global_keys - local_keys)
    assert n_local == 22
    assert all_global.flops_per_token(t, training=False) - c.flops_per_token(t, training=False) == pytest.approx(saved)


# ----------------------------------------------------------------------------- parity with transformers


def _parity(config, hf_model, path):
    tokens, mask = tokens_and_mask(config)
    assert tokens.shape[1] > 2 * config.sliding_window
    ref = helpers.hf_logits(hf_model, tokens, mask)
    cfg, params = weights.load(path)
    out = np.asarray(M.logits(cfg, params, tokens))
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 5  # logits far from uniform, so an error would show
    assert np.abs(out - ref)[valid].max() < 1e-4 * max(1.0, np.abs(ref).max() / 10)
    return cfg, params, ref


def test_logits_match_transformers(hf_model, loaded):
    model, path = hf_model
    cfg, params, ref = _parity(CFG, model, path)
    assert cfg == CFG.replace(query_pre_attn_scalar=24.0)
    # Packed rows: each segment sees only itself, at positions restarting from 0.
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, CFG.vocab_size, 13), rng.integers(1, CFG.vocab_size, 11)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 13 + [2] * 11])
    out = np.asarray(M.logits(cfg, params, packed, segment_ids=seg))[0]
    np.testing.assert_allclose(out[:13], helpers.hf_logits(model, a[None])[0], atol=1e-4)
    np.testing.assert_allclose(out[13:], helpers.hf_logits(model, b[None])[0], atol=1e-4)


@pytest.mark.parametrize("config", [
    # 4 query heads per kv head, query scalar = head_dim, no RoPE scaling, a final soft-cap
    # (Gemma3TextConfig has one), a 3-layer pattern with a custom global base, 4 layers deep.
    ModelConfig.from_preset("gemma3_test", num_layers=4, embed_dim=32, hidden_dim=64, num_heads=8, head_dim=8,
                            query_pre_attn_scalar=8, sliding_window=5, rope_scale=1.0, rope_base=5000.0,
                            attention_pattern=("local", "local", "global"), final_softcap=15.0),
    # Shallower than one period: the scan is empty, every layer is a tail layer.
    ModelConfig.from_preset("gemma3_test", num_layers=2, num_kv_heads=1, rope_scale=8.0),
], ids=["gqa4-caps-period3", "shorter-than-a-period"])
def test_logits_match_transformers_other_shapes(tmp_path, config):
    model = helpers.make_hf_gemma3(config, tmp_path, scale=2.0, seed=3)
    cfg, _, ref = _parity(config, model, tmp_path)
    assert (cfg.attention_pattern, cfg.rope_scale, cfg.final_softcap) == (
        config.attention_pattern, config.rope_scale, config.final_softcap)
    if config.final_softcap:  # the cap was reached, so a dropped cap would show
        assert np.abs(ref).max() > 0.99 * config.final_softcap


def test_attention_softcap_in_a_gemma3_config_is_ignored_as_transformers_does(tmp_path):
    """transformers' Gemma3Attention never passes attn_logit_softcapping to its attention
    functions; a checkpoint that sets it is computed without it, here too, and an export refuses a
    cap transformers would drop."""
    config = ModelConfig.from_preset("gemma3_test", num_layers=3)
    model = helpers.make_hf_gemma3(config, None, scale=4.0, seed=2)
    model.config.attn_logit_softcapping = 1.0  # tiny: applied, it would change every logit
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["attn_logit_softcapping"] == 1.0
    cfg, params, _ = _parity(config, model, tmp_path)
    assert cfg.attn_softcap == 0.0
    with pytest.raises(UserError, match="cannot hold attn_softcap=1.0: Gemma3ForCausalLM ignores"):
        weights.save(tmp_path / "out", cfg.replace(attn_softcap=1.0), params, format="hf")


def test_greedy_decoding_past_the_window_matches_transformers_generate(hf_model, loaded):
    import torch

    model, _ = hf_model
    cfg, params = loaded
    rng = np.random.default_rng(4)
    prompts = [[2] + [int(t) for t in rng.integers(4, CFG.vocab_size, n - 1)] for n in (3, 13, 7)]
    new = 24  # every row runs well past the 8-token window and through the global layers' cache
    width = max(map(len, prompts))
    ids, mask = np.zeros((3, width), np.int64), np.zeros((3, width), np.int64)
    for i, p in enumerate(prompts):  # HF batches with left padding
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=[1]).numpy()[:, width:].tolist()
    ref = [row[:row.index(1) + 1] if 1 in row else row for row in out]
    assert all(len(set(row)) > 5 for row in ref)  # varied text, not a repeated token
    assert S.generate_ids(cfg, params, prompts, max_new_tokens=new, stop_ids=(1,)).tokens == ref


# ----------------------------------------------------------------------------- Hugging Face layouts


def test_both_multimodal_layouts_load_the_text_weights(tmp_path, hf_model, loaded, caplog):
    """Gemma3ForConditionalGeneration checkpoints (Google's 4B-27B): transformers 5 saves the text
    model as language_model.model.*, its in-memory layout (and newer files) is
    model.language_model.*; both load as the same text model, the image side skipped."""
    import torch
    from safetensors.torch import load_file, save_file

    model, _ = hf_model
    mm = helpers.hf_gemma3_multimodal(model, CFG)
    mm.save_pretrained(str(tmp_path / "saved"))
    stored = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert any(k.startswith("language_model.model.layers.0.self_attn.q_norm") for k in stored)
    renamed = {("model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.")
                else "model." + k): v for k, v in stored.items()}
    (tmp_path / "renamed").mkdir()
    save_file(renamed, str(tmp_path / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "renamed" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    tokens, _ = tokens_and_mask(CFG)
    text_ref = helpers.hf_logits(model, tokens)
    import transformers
    for name in ("saved", "renamed"):
        # transformers reads both as the same model: the renamed file is a real layout.
        back = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            str(tmp_path / name), attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = back(input_ids=torch.tensor(tokens)).logits.float().numpy()
        np.testing.assert_allclose(theirs, text_ref, atol=1e-5)
        caplog.clear()
        with caplog.at_level("INFO"):
            cfg, params = weights.load(tmp_path / name)
        assert cfg == loaded[0]
        same_tree(params, loaded[1])
        skipped = [r.getMessage() for r in caplog.records if "vision_tower" in r.getMessage()]
        assert len(skipped) == 1 and "multi_modal_projector" in skipped[0], skipped


def test_transformers_4_style_config_json(tmp_path, hf_model, loaded):
    """Google's released config.json files predate rope_parameters and layer_types: rope_theta,
    rope_local_base_freq, rope_scaling (global layers) and sliding_window_pattern. transformers 5
    reads them into the same model, and so do we."""
    import shutil

    import transformers

    _, path = hf_model
    shutil.copytree(path, tmp_path / "old")
    c = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        c.pop(key)
    c.update(rope_theta=CFG.rope_base, rope_local_base_freq=CFG.local_rope_base, sliding_window_pattern=6,
             rope_scaling={"rope_type": "linear", "factor": CFG.rope_scale})
    (tmp_path / "old" / "config.json").write_text(json.dumps(c))
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path / "old"))
    assert theirs.layer_types == helpers.hf_gemma3_config(CFG).layer_types
    assert theirs.rope_parameters["full_attention"]["factor"] == CFG.rope_scale
    cfg, params = weights.load(tmp_path / "old")
    assert cfg == loaded[0]


def test_hf_export_round_trip_is_a_gemma3_checkpoint_transformers_loads(tmp_path, hf_model, loaded):
    import transformers

    from gemma_jax.tokenizer import Tokenizer

    model, _ = hf_model
    cfg, params = loaded
    tokenizer = "data/tokenizer.model"
    weights.save(tmp_path / "out", cfg, params, format="hf", tokenizer=tokenizer)
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config_json["model_type"], config_json["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(back).__name__ == "Gemma3ForCausalLM"
    tokens, mask = tokens_and_mask(CFG)
    np.testing.assert_array_equal(helpers.hf_logits(back.eval(), tokens, mask),
                                  helpers.hf_logits(model, tokens, mask))
    again_cfg, again = weights.load(tmp_path / "out")
    assert again_cfg == cfg
    same_tree(again, params)
    # The tokenizer files and the chat template: transformers formats chats as we do, including
    # a system message and content given as a list of text parts (transformers' message format).
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = Tokenizer(tokenizer)
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Define "}, {"type": "text", "text": "tort."}]},
            {"role": "assistant", "content": "A civil wrong."}, {"role": "user", "content": "Example?"}]
    plain = [chat[0], {"role": "user", "content": "Define tort."}, *chat[2:]]
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ours.format_chat(plain, add_generation_prompt=True)
    assert "<start_of_turn>user\nBe brief.\n\nDefine tort.<end_of_turn>" in text and text.endswith(
        "<start_of_turn>model\n")
    with pytest.raises(Exception, match="text parts only"):
        hf_tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], tokenize=False)
    # Without a tokenizer, generation stops on Gemma 3's own <end_of_turn> id (106, not Gemma 2's 107).
    real = ModelConfig.from_preset("gemma3_270m")
    assert hf_format.generation_config(real, None)["eos_token_id"] == [1, 106]
    assert hf_format.hf_config(real, real.vocab_size)["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4


def test_hf_export_refuses_what_the_family_cannot_express(tmp_path, loaded):
    cfg, params = loaded
    with pytest.raises(UserError, match="family=gemma3 model needs qk_norm"):
        hf_format.check_exportable(cfg.replace(qk_norm=False))
    with pytest.raises(UserError, match=r"family=gemma2 model cannot hold qk_norm=True.*rope_scale=4.0"):
        weights.save(tmp_path / "g2", cfg.replace(family="gemma2"), params, format="hf")
    with pytest.raises(UserError, match=r"keras format writes Gemma 2 .* family=gemma3"):
        weights.save(tmp_path / "keras", cfg, params, format="keras")


# ----------------------------------------------------------------------------- official layouts


def test_official_flat_and_nested_round_trip(tmp_path, loaded):
    import orbax.checkpoint as ocp

    cfg, params = loaded
    tokens, _ = tokens_and_mask(CFG)
    ref = np.asarray(M.logits(cfg, params, tokens))
    for tree in ("flat", "nested"):
        weights.save(tmp_path / tree, cfg, params, format="official", tree=tree)
        folder = tmp_path / tree / "gemma3-custom"
        stored = ocp.PyTreeCheckpointer().metadata(folder).item_metadata.tree
        if tree == "flat":  # the Kaggle release's keys
            assert stored["transformer/layer_0/attn/_query_norm"]["scale"].shape == (CFG.head_dim,)
            assert stored["transformer/layer_7/mlp/gating_einsum"]["w"].shape == (2, CFG.hidden_dim, CFG.embed_dim)
        else:  # gm.ckpts.save_params: nested, MLP weights bare arrays
            assert stored["layer_0"]["attn"]["_key_norm"]["scale"].shape == (CFG.head_dim,)
            assert stored["layer_7"]["mlp"]["gating_einsum"].shape == (2, CFG.hidden_dim, CFG.embed_dim)
        back_cfg, back = weights.load(tmp_path / tree)
        assert back_cfg == cfg
        same_tree(back, params)
        np.testing.assert_array_equal(np.asarray(M.logits(back_cfg, back, tokens)), ref)


def _official_gemma3_tree(config, seed=0):
    """Random weights in the gemma library's FLAT Gemma 3 layout, multimodal: a SigLIP tower and
    the embedder's image projection beside the text weights."""
    rng = np.random.RandomState(seed)
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    tree = {"transformer/embedder": {"input_embedding": r(config.vocab_size, d)},
            "transformer/embedder/mm_input_projection": {"w": r(8, d)},
            "transformer/embedder/mm_soft_embedding_norm": {"scale": r(8)},
            "SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": r(4, 4, 3, 8), "bias": r(8)},
            "transformer/final_norm": {"scale": r(d)}}
    for i in range(config.num_layers):
        p = f"transformer/layer_{i}/"
        tree.update({p + "attn/q_einsum": {"w": r(n, d, h)}, p + "attn/kv_einsum": {"w": r(2, k, d, h)},
                     p + "attn/attn_vec_einsum": {"w": r(n, h, d)},
                     p + "attn/_query_norm": {"scale": r(h)}, p + "attn/_key_norm": {"scale": r(h)},
                     p + "mlp/gating_einsum": {"w": r(2, f, d)}, p + "mlp/linear": {"w": r(f, d)}})
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            tree[p + norm] = {"scale": r(d)}
    return tree


def test_official_multimodal_checkpoint_written_by_hand(tmp_path, caplog):
    import orbax.checkpoint as ocp

    tree = _official_gemma3_tree(CFG)
    ocp.PyTreeCheckpointer().save(tmp_path / "kaggle" / "gemma3-x", tree)
    hparams = dict(query_pre_attn_scalar=24, sliding_window=8, rope_scale=4.0)
    with pytest.raises(UserError, match=r"no published Gemma 3 size .*query_pre_attn_scalar, sliding_window, "
                                        r"rope_scale must be given"):
        weights.load(tmp_path / "kaggle")
    with pytest.raises(ValueError, match=r"family=gemma2 but the weights .* are gemma3"):
        weights.load(tmp_path / "kaggle", config={**hparams, "family": "gemma2"})
    with caplog.at_level("INFO"):
        cfg, params = weights.load(tmp_path / "kaggle", config=hparams)
    assert sum("skipping the image side" in r.getMessage() for r in caplog.records) == 1
    assert cfg == CFG.replace(query_pre_attn_scalar=24)
    layer6 = params["layer_6"]["attn"]
    np.testing.assert_array_equal(layer6["query_norm"]["scale"], tree["transformer/layer_6/attn/_query_norm"]["scale"])
    np.testing.assert_array_equal(params["layers"]["global"]["attn"]["key_norm"]["scale"][0],
                                  tree["transformer/layer_5/attn/_key_norm"]["scale"])
    np.testing.assert_array_equal(params["layers"]["local_3"]["mlp"]["gating_einsum"]["w"][0],
                                  tree["transformer/layer_3/mlp/gating_einsum"]["w"])


# ----------------------------------------------------------------------------- the rest on Gemma 3


def test_scanned_equals_unrolled_and_compiles_once_per_period(loaded):
    cfg, params = loaded
    tokens, _ = tokens_and_mask(CFG)
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled = M.unstack_layers(cfg, params)
    assert sorted(k for k in unrolled if k.startswith("layer_")) == sorted(f"layer_{i}" for i in range(8))
    np.testing.assert_allclose(np.asarray(M.logits(unrolled_cfg, unrolled, tokens)),
                               np.asarray(M.logits(cfg, params, tokens)), atol=1e-5)
    same_tree(M.stack_layers(cfg, unrolled), params)
    # Attention analysis puts the sown probabilities in layer order either way; local layers
    # give no weight to keys a window or more behind.
    from gemma_jax.eval import attention as analysis

    probs = np.asarray(analysis.attention_probs(cfg, params, tokens))
    np.testing.assert_allclose(np.asarray(analysis.attention_probs(unrolled_cfg, unrolled, tokens)), probs, atol=1e-6)
    t = tokens.shape[1]
    far = np.tril(np.ones((t, t), bool), -CFG.sliding_window)
    for i, kind in enumerate(CFG.layer_types):
        assert (probs[i][..., far].max() == 0) == (kind == "local"), i
    # The traced program does not grow with depth: one period is the scan body, whatever the
    # number of periods (here 2 vs 5, each with the same two-layer tail).

    def size(layers):
        c = CFG.replace(num_layers=layers)
        shapes = M.param_shapes(c)
        return len(jax.make_jaxpr(lambda p: M.Transformer(c).apply({"params": p}, tokens))(shapes).jaxpr.eqns)

    assert size(14) == size(32)


def test_lora_and_qlora_on_every_layer_type(loaded):
    cfg, params = loaded
    tokens, _ = tokens_and_mask(CFG)
    paths = {"/".join(p) for p in lora.target_paths(params, DEFAULT_LORA_TARGETS)}
    for block in (*(f"layers/{n}" for n in CFG.block_names), "layer_6", "layer_7"):
        assert any(p.startswith(block + "/attn/q_einsum") for p in paths), block
        assert any(p.startswith(block + "/mlp/linear") for p in paths), block
    assert not any("norm" in p for p in paths)  # QK-norm scales are not einsum weights
    adapters = lora.init(params, 4, DEFAULT_LORA_TARGETS, jax.random.key(2))
    keys = iter(jax.random.split(jax.random.key(3), 200))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    apply = jax.jit(lambda v: M.Transformer(cfg).apply(v, tokens))
    with_adapters, base = apply({"params": params, "lora": adapters}), M.logits(cfg, params, tokens)
    assert float(jnp.abs(with_adapters - base).max()) > 0.1
    np.testing.assert_allclose(M.logits(cfg, lora.merge(cfg, params, adapters), tokens), with_adapters,
                               atol=2e-4, rtol=1e-4)
    qparams, scales = lora.quantize(params, "int8")
    assert qparams["layers"]["local_2"]["attn"]["q_einsum"]["w"].dtype == jnp.int8
    assert qparams["layers"]["global"]["attn"]["query_norm"]["scale"].dtype == jnp.float32
    quantised = apply({"params": qparams, "quant": scales})
    assert 0 < float(jnp.abs(quantised - base).max()) < 0.05 * float(jnp.abs(base).max())


def test_sampler_cache_keeps_ring_buffers_on_local_layers_only(loaded):
    cfg, params = loaded
    cache = kv_cache.init_cache(CFG, batch=2, length=40)
    k, h, w = CFG.num_kv_heads, CFG.head_dim, CFG.sliding_window
    for name in CFG.block_names:
        slots = 40 if name == "global" else w
        assert cache["layers"][name]["k"].shape == (1, 2, k, slots, h), name
    assert cache["layer_6"]["v"].shape == cache["layer_7"]["k"].shape == (2, k, w, h)
    assert cache["positions"]["local"].shape == (2, w) and cache["positions"]["global"].shape == (2, 40)
    # Decoding through the ring buffers gives the full forward's logits at every step; here with
    # the scanned layers (the greedy test above decodes unrolled, as CPUs do by default).
    prompts = [[2, 5, 9], [2, 7, 11, 13, 17, 19, 23, 29, 31, 37]]
    S.UNROLL_LAYERS_ON_CPU = False
    try:
        gen = S.generate_ids(cfg, params, prompts, max_new_tokens=20, return_logits=True)
    finally:
        S.UNROLL_LAYERS_ON_CPU = True
    for prompt, new, logits in zip(prompts, gen.tokens, gen.logits):
        full = np.asarray(M.logits(cfg, params, np.asarray([prompt + new])))[0]
        np.testing.assert_allclose(np.asarray(logits)[:len(new)], full[len(prompt) - 1:len(prompt) + len(new) - 1],
                                   atol=1e-4)


def test_sharded_forward_on_a_2x2x2_mesh_equals_one_device(loaded):
    cfg, params = loaded
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (4, 24))
    ref = np.asarray(M.logits(cfg, params, tokens))
    mesh = sharding.make_mesh(2, 2, 2)
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    q = sharded["layers"]["local_0"]["attn"]["q_einsum"]["w"]
    assert len({s.device for s in q.addressable_shards}) == 8 and not q.sharding.is_fully_replicated
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = M.logits(cfg, sharded, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_gemma3_checkpoint_with_a_gemma2_preset_is_refused(loaded):
    from gemma_jax import config as config_lib
    from gemma_jax.train import model_setup
    from gemma_jax.tokenizer import Tokenizer

    cfg = config_lib.load("configs/legal.py:tiny")
    cfg.model.preset, cfg.model.init_checkpoint = "gemma2_2b", "/ckpt/gemma-3-270m"
    tok = Tokenizer("data/tokenizer.model")
    checkpoint = loaded[0].replace(vocab_size=tok.vocab_size)
    with pytest.raises(UserError, match=r"model.preset=gemma2_2b is a Gemma 2 model but model.init_checkpoint="
                                        r"/ckpt/gemma-3-270m holds Gemma 3 weights"):
        model_setup.model_config(cfg, tok, checkpoint)
    for preset in ("gemma3_1b", ""):  # a Gemma 3 preset, or none: the checkpoint's config trains
        cfg.model.preset = preset
        assert model_setup.model_config(cfg, tok, checkpoint).attention_pattern == CFG.attention_pattern
