"""Gemma 4: presets, parity with transformers (logits, greedy decoding) on each of the three released
shapes, Hugging Face and official weights in and out, the scanned layout with KV-shared layers,
the sampler's cache, the mixture of experts sharded over a mesh, LoRA on the experts, training.

The reference is transformers' Gemma4ForCausalLM (float32, eager attention), built from
transformers directly (helpers.make_hf_gemma4). One module model per shape:
  gemma4_e_test      E2B/E4B-style: per-layer embeddings, the last 5 of 12 layers reuse the KV of
                     the last earlier layer of their type (the shared region starts mid-period, so
                     both scans, unrolled producers and unrolled consumers occur), double-wide
                     MLPs on the shared layers, global head_dim 32 != 16
  gemma4_dense_test  31B-style: global layers with their own head_dim, 1 kv head, K = V
  gemma4_moe_test    26B-A4B-style: 8 experts, 2 per token, beside the dense MLP, K = V globals
All have windows (8) shorter than the test sequences, QK-norm with unscaled queries, value norm,
partial RoPE on global layers, the per-layer scale and the final cap.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from gemma_jax import sample as S, sharding, weights
from gemma_jax import model as M
from gemma_jax.config import GEMMA4_LORA_TARGETS
from gemma_jax.errors import UserError
from gemma_jax.model import ModelConfig, kv_cache, lora, moe
from gemma_jax.weights import hf as hf_format, layout

SHAPES = ("gemma4_e_test", "gemma4_dense_test", "gemma4_moe_test")
# Published dims (gemma library 4.0.1 Gemma4_*; transformers Gemma4TextConfig): layers, width, MLP,
# heads, kv heads, global kv heads, head_dim, global head_dim, window, PLE width, KV-shared layers,
# experts / per token / width, local pattern period.
PUBLISHED = {
    "gemma4_e2b": (35, 1536, 6144, 8, 1, 1, 256, 512, 512, 256, 20, (0, 0, 0), 5),
    "gemma4_e4b": (42, 2560, 10240, 8, 2, 2, 256, 512, 512, 256, 18, (0, 0, 0), 6),
    "gemma4_31b": (60, 5376, 21504, 32, 16, 4, 256, 512, 1024, 0, 0, (0, 0, 0), 6),
    "gemma4_26b_a4b": (30, 2816, 2112, 16, 8, 2, 256, 512, 1024, 0, 0, (128, 8, 704), 6),
}


def tokens_and_mask(config, batch=2, length=24, seed=1):
    """Random tokens with the last row right-padded (pad id 0)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, config.vocab_size, (batch, length))
    mask = np.ones_like(tokens)
    mask[-1, length - 7:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def same_tree(a, b):
    flat_a, flat_b = layout.flatten(a), layout.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


def boost(hf_model, seed=1):
    """Post-norm scales around 10, so layer outputs outweigh the tied input embedding and greedy
    decoding of the random model writes varied tokens instead of echoing its input. (Such a model
    is ill-conditioned: transformers' own float32 logits move by up to 1e-3 in float64, so the
    logit comparisons use the models as randomize_gemma4 makes them.)"""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "post_" in name:
                p.normal_(10.0, 1.0)
    return hf_model


def _reference(name, tmp_path_factory):
    """(config, transformers model, its save_pretrained directory, our load of it)."""
    config = ModelConfig.from_preset(name)
    path = tmp_path_factory.mktemp(name)
    model = helpers.make_hf_gemma4(config, path)
    return config, model, path, weights.load(path)


@pytest.fixture(scope="module")
def e_model(tmp_path_factory):
    return _reference("gemma4_e_test", tmp_path_factory)


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    return _reference("gemma4_dense_test", tmp_path_factory)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return _reference("gemma4_moe_test", tmp_path_factory)


@pytest.fixture(params=SHAPES)
def reference(request):
    return request.getfixturevalue({"gemma4_e_test": "e_model", "gemma4_dense_test": "dense_model",
                                    "gemma4_moe_test": "moe_model"}[request.param])


# ----------------------------------------------------------------------------- presets and layout


def test_presets_have_the_published_dims_and_parameter_counts():
    import torch
    import transformers

    for name, (layers, d, f, n, k, gk, h, gh, window, ple, shared, experts, period) in PUBLISHED.items():
        c = ModelConfig.from_preset(name)
        assert (c.num_layers, c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.kv_heads_of("global"),
                c.head_dim, c.head_dim_of("global"), c.sliding_window, c.per_layer_dim, c.num_kv_shared_layers,
                (c.num_experts, c.experts_per_token, c.expert_dim), c.period) == (
            layers, d, f, n, k, gk, h, gh, window, ple, shared, experts, period), name
        assert (c.family, c.vocab_size, c.final_softcap, c.attn_softcap, c.query_pre_attn_scalar, c.qk_norm,
                c.value_norm, c.layer_scale, c.norm_scale_offset, c.rope(False), c.rope(True),
                c.rope_fraction(False)) == ("gemma4", 262144, 30.0, 0.0, 1.0, True, True, True, 0.0,
                                            (1e6, 1.0), (1e4, 1.0), 0.25), name
        assert c.layer_types[-1] == "global" and c.attention_k_eq_v == (name in ("gemma4_31b", "gemma4_26b_a4b"))
        # transformers' model of these dims, built on the meta device; its per-layer scale is a
        # buffer there (one value per layer), a parameter here.
        with torch.device("meta"):
            ref = transformers.Gemma4ForCausalLM(helpers.hf_gemma4_config(c))
        assert c.num_params() == sum(p.numel() for p in ref.parameters()) + c.num_layers, name
    assert ModelConfig.from_preset("gemma4_e2b").double_wide_mlp
    # 26B-A4B: 25.2B parameters of which 3.8B are active per token (8 of 128 experts).
    moe_cfg = ModelConfig.from_preset("gemma4_26b_a4b")
    assert round(moe_cfg.num_params() / 1e9, 1) == 25.2 and round(moe_cfg.num_active_params() / 1e9, 1) == 3.8
    # E2B: "2B effective" is the model without its per-layer embedding table.
    e2b = ModelConfig.from_preset("gemma4_e2b")
    assert round((e2b.num_params() - 262144 * 35 * 256) / 1e9, 1) == 2.3


def test_scanned_layout_with_kv_sharing():
    c = ModelConfig.from_preset("gemma4_e_test")
    assert c.layer_types == ("local", "local", "global") * 4 and c.first_kv_shared == 7
    assert (c.kv_producer("local"), c.kv_producer("global")) == (6, 5)
    assert c.scan_groups() == {"layers": (0, 1), "shared_layers": (9, 1)}
    assert c.unscanned_layers() == [3, 4, 5, 6, 7, 8]
    assert [c.mlp_dim(i) for i in (6, 7)] == [128, 256]
    shapes = M.param_shapes(c)
    assert sorted(shapes) == ["embedder", "final_norm", "layer_3", "layer_4", "layer_5", "layer_6", "layer_7",
                              "layer_8", "layers", "shared_layers"]
    assert shapes["embedder"]["per_layer_embedding"].shape == (512, 12, 8)
    shared = shapes["shared_layers"]["global"]
    assert "kv_einsum" not in shared["attn"] and "key_norm" not in shared["attn"]
    assert shared["attn"]["q_einsum"]["w"].shape == (1, 4, 64, 32) and shared["mlp"]["linear"]["w"].shape == (1, 256, 64)
    assert "kv_einsum" not in shapes["layer_7"]["attn"] and shapes["layer_6"]["attn"]["kv_einsum"]["w"].shape == (
        2, 2, 64, 16)
    assert shapes["layers"]["local_0"]["layer_scale"].shape == (1, 1)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == c.num_params()
    dense = M.param_shapes(ModelConfig.from_preset("gemma4_dense_test"))
    assert dense["layers"]["global"]["attn"]["k_einsum"]["w"].shape == (2, 1, 64, 32)
    assert "kv_einsum" not in dense["layers"]["global"]["attn"]
    moe_shapes = M.param_shapes(ModelConfig.from_preset("gemma4_moe_test"))["layers"]["global"]["moe"]
    assert moe_shapes["expert_gating"]["w"].shape == (2, 2, 8, 64, 32)
    assert moe_shapes["expert_linear"]["w"].shape == (2, 8, 32, 64)
    axes = M.param_axes(ModelConfig.from_preset("gemma4_moe_test"))["layers"]["local"]["moe"]
    assert tuple(axes["expert_gating"]["w"]) == ("layers", None, "expert", "embed", "mlp")
    with pytest.raises(ValueError, match="no earlier local layer"):
        c.replace(num_layers=4, num_kv_shared_layers=3, attention_pattern=("global", "local"))


# ----------------------------------------------------------------------------- parity with transformers


def test_logits_match_transformers(reference):
    config, model, path, (cfg, params) = reference
    assert cfg == config
    tokens, mask = tokens_and_mask(config)
    assert tokens.shape[1] > 2 * config.sliding_window
    ref = helpers.hf_logits(model, tokens, mask)
    out = np.asarray(M.logits(cfg, params, tokens))
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 5  # logits far from uniform, so an error would show
    assert np.abs(out - ref)[valid].max() < 1e-4
    if config.per_layer_dim:  # packed rows: each segment sees only itself, at positions from 0
        rng = np.random.default_rng(5)
        a, b = rng.integers(1, config.vocab_size, 13), rng.integers(1, config.vocab_size, 11)
        out = np.asarray(M.logits(cfg, params, np.concatenate([a, b])[None],
                                  segment_ids=np.array([[1] * 13 + [2] * 11])))[0]
        np.testing.assert_allclose(out[:13], helpers.hf_logits(model, a[None])[0], atol=1e-4)
        np.testing.assert_allclose(out[13:], helpers.hf_logits(model, b[None])[0], atol=1e-4)


def test_logits_match_transformers_with_every_feature_at_once(tmp_path):
    """PLE, KV sharing, experts and K = V together, RoPE scaled by 2 on half the global dims, global
    head_dim = head_dim (transformers then saves an empty per_layer_config), and an odd depth whose
    last layer transformers makes global: the pattern read back has no whole period to scan."""
    config = ModelConfig.from_preset(
        "gemma4_e_test", num_layers=11, attention_pattern=("local", "global"), num_kv_shared_layers=4,
        num_experts=4, experts_per_token=2, expert_dim=16, attention_k_eq_v=True, global_head_dim=0,
        rope_scale=2.0, global_rope_fraction=0.5)
    model = helpers.make_hf_gemma4(config, tmp_path, seed=2)
    assert json.loads((tmp_path / "config.json").read_text())["per_layer_config"] == {}
    cfg, params = weights.load(tmp_path)
    assert cfg.layer_types == config.layer_types[:-1] + ("global",) and cfg.scan_groups() == {"layers": (0, 0)}
    assert (cfg.head_dim_of("global"), cfg.rope_scale, cfg.global_rope_fraction) == (16, 2.0, 0.5)
    tokens, mask = tokens_and_mask(cfg)
    ref = helpers.hf_logits(model, tokens, mask)
    out = np.asarray(M.logits(cfg, params, tokens))
    assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("name", SHAPES)
def test_greedy_decoding_past_the_window_matches_transformers_generate(tmp_path, name):
    import torch

    config = ModelConfig.from_preset(name)
    model = boost(helpers.make_hf_gemma4(config))
    model.save_pretrained(str(tmp_path))
    cfg, params = weights.load(tmp_path)
    rng = np.random.default_rng(4)
    prompts = [[2] + [int(t) for t in rng.integers(4, config.vocab_size, n - 1)] for n in (3, 13, 7)]
    new = 24  # every row runs well past the 8-token window and through the KV-shared layers
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


def test_sampler_cache_has_no_entries_for_kv_shared_layers(e_model):
    config, _, _, (cfg, params) = e_model
    cache = kv_cache.init_cache(cfg, batch=2, length=40)
    assert sorted(cache) == ["layer_3", "layer_4", "layer_5", "layer_6", "layers", "positions"]
    assert cache["layers"]["global"]["k"].shape == (1, 2, 2, 40, 32)  # the global type's kv heads, head_dim
    assert cache["layer_4"]["v"].shape == (2, 2, 8, 16)  # a local ring buffer
    # Decoding with the scanned layers (the greedy test decodes unrolled, as CPUs do by default)
    # gives the full forward's logits at every step.
    prompt = [2, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    S.UNROLL_LAYERS_ON_CPU = False
    try:
        gen = S.generate_ids(cfg, params, [prompt], max_new_tokens=14, return_logits=True)
    finally:
        S.UNROLL_LAYERS_ON_CPU = True
    new, logits = gen.tokens[0], np.asarray(gen.logits[0])
    full = np.asarray(M.logits(cfg, params, np.asarray([prompt + new])))[0]
    np.testing.assert_allclose(logits[:len(new)], full[len(prompt) - 1:len(prompt) + len(new) - 1], atol=1e-4)
    # The unrolled tree of both scans stacks back; the attention analysis reads both scans in
    # layer order: local layers give no weight to keys a window or more behind.
    same_tree(M.stack_layers(cfg, M.unstack_layers(cfg, params)), params)
    from gemma_jax.eval import attention as analysis

    tokens, _ = tokens_and_mask(config)
    probs = np.asarray(analysis.attention_probs(cfg, params, tokens))
    far = np.tril(np.ones((24, 24), bool), -config.sliding_window)
    assert [probs[i][..., far].max() == 0 for i in range(12)] == [t == "local" for t in config.layer_types]


# ----------------------------------------------------------------------------- Hugging Face layouts


def test_hf_export_is_a_checkpoint_transformers_loads(tmp_path, reference):
    import transformers

    config, model, _, (cfg, params) = reference
    weights.save(tmp_path / "out", cfg, params, format="hf")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (c["model_type"], c["architectures"], c["global_head_dim"]) == ("gemma4_text", ["Gemma4ForCausalLM"], 32)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(back).__name__ == "Gemma4ForCausalLM"
    tokens, mask = tokens_and_mask(config)
    np.testing.assert_array_equal(helpers.hf_logits(back.eval(), tokens, mask), helpers.hf_logits(model, tokens, mask))
    again_cfg, again = weights.load(tmp_path / "out")
    assert again_cfg == cfg
    same_tree(again, params)


def test_google_config_keys_and_the_multimodal_checkpoint(tmp_path, e_model, dense_model):
    """Google's config.json files name the global layers' attention global_head_dim and
    num_global_key_value_heads (transformers 5.25 saves per_layer_config instead); Google ships
    every Gemma 4 as Gemma4ForConditionalGeneration, the text model under model.language_model.*."""
    import shutil

    import transformers

    config, _, path, (cfg, params) = dense_model
    shutil.copytree(path, tmp_path / "google")
    c = json.loads((path / "config.json").read_text())
    c.pop("per_layer_config")
    c.update(global_head_dim=32, num_global_key_value_heads=1)
    (tmp_path / "google" / "config.json").write_text(json.dumps(c))
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path / "google"))
    assert theirs.per_layer_config[3].num_key_value_heads == 1
    assert weights.load(tmp_path / "google")[0] == cfg
    c["attention_k_eq_v"] = False  # transformers applies the kv override only with K = V
    (tmp_path / "google" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"config/weights disagree: .*config.json implies shape \(64, 64\) for "
                                         r"model\.layers\.3\.self_attn\.k_proj\.weight, which has \(32, 64\)"):
        weights.load(tmp_path / "google")

    config, model, _, (cfg, params) = e_model
    mm = helpers.hf_gemma4_multimodal(model, config)
    mm.save_pretrained(str(tmp_path / "mm"))
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "gemma4"
    mm_cfg, mm_params = weights.load(tmp_path / "mm")
    assert mm_cfg == cfg
    same_tree(mm_params, params)


def test_hf_export_with_a_gemma4_tokenizer_and_its_chat_template(tmp_path, moe_model):
    import io

    import sentencepiece as spm
    import transformers

    from gemma_jax.tokenizer import Tokenizer

    _, _, _, (cfg, params) = moe_model
    texts = [line for line in open("data/general/eval.txt").read().splitlines() if line.strip()][:300]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=400, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<|turn>", "<turn|>"], byte_fallback=True, character_coverage=1.0,
        hard_vocab_limit=False, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    ours = Tokenizer(str(tmp_path / "tokenizer.model"))
    assert ours.turn_markers == ("<|turn>", "<turn|>")
    weights.save(tmp_path / "out", cfg, params, format="hf", tokenizer=str(tmp_path / "tokenizer.model"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define tort."},
            {"role": "assistant", "content": "A civil wrong."}, {"role": "user", "content": "Example?"}]
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ours.format_chat(chat, add_generation_prompt=True)
    assert text.startswith("<bos><|turn>user\nBe brief.\n\nDefine tort.<turn|>\n") and text.endswith("<|turn>model\n")
    ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == ours.encode_chat(chat, add_generation_prompt=True)[0].tolist()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, ours.end_of_turn_id]
    # Without a tokenizer, generation stops on Gemma 4's <turn|> (id 106).
    assert hf_format.generation_config(ModelConfig.from_preset("gemma4_e2b"), None)["eos_token_id"] == [1, 106]


def test_hf_export_refuses_what_transformers_cannot_express(tmp_path, dense_model):
    _, _, _, (cfg, params) = dense_model
    with pytest.raises(UserError, match=r"family=gemma4 model needs value_norm=True"):
        hf_format.check_exportable(cfg.replace(value_norm=False))
    with pytest.raises(UserError, match="needs a global last layer"):
        hf_format.check_exportable(cfg.replace(num_layers=7))
    with pytest.raises(UserError, match="global_kv_heads=1 only with attention_k_eq_v=True"):
        hf_format.check_exportable(cfg.replace(attention_k_eq_v=False))
    with pytest.raises(UserError, match=r"family=gemma3 model cannot hold norm_scale_offset=0.0, value_norm=True, "
                                        r"layer_scale=True, attention_k_eq_v=True.*set family='gemma4'"):
        weights.save(tmp_path / "g3", cfg.replace(family="gemma3"), params, format="hf")


# ----------------------------------------------------------------------------- official layouts


def test_official_round_trips(tmp_path, e_model, moe_model):
    import orbax.checkpoint as ocp

    for config, _, _, (cfg, params) in (e_model, moe_model):
        tokens, _ = tokens_and_mask(config)
        ref = np.asarray(M.logits(cfg, params, tokens))
        for tree in ("nested",) if config.per_layer_dim else ("flat",):
            out = tmp_path / f"{config.num_experts}_{tree}"
            weights.save(out, cfg, params, format="official", tree=tree)
            stored = ocp.PyTreeCheckpointer().metadata(out / "gemma4-custom").item_metadata.tree
            if tree == "nested":  # a shared layer holds the kv weights the library declares but never reads
                layer = stored["layer_11"]
                assert layer["skip_scale"].shape == (1,) and layer["mlp"]["gating_einsum"].shape == (2, 256, 64)
                assert layer["attn"]["kv_einsum"]["w"].shape == (2, 2, 64, 32)
                assert stored["embedder"]["per_layer_embeddings"].shape == (512, 12, 8)
            else:  # the library's MoE names: mlp2 the dense MLP, mlp the experts
                assert stored["transformer/layer_1"]["skip_scale"].shape == (1,)
                assert stored["transformer/layer_1/mlp2/gating_einsum"]["w"].shape == (2, 64, 64)
                assert stored["transformer/layer_1/mlp/gating_einsum"]["w"].shape == (8, 2, 32, 64)
                assert stored["transformer/layer_1/mlp/router_logits"]["w"].shape == (64, 8)
                assert "transformer/layer_1/post_ffw1_norm" in stored and "transformer/layer_1/pre_ffw2_norm" in stored
            back_cfg, back = weights.load(out)
            assert back_cfg == cfg
            same_tree(back, params)
            np.testing.assert_array_equal(np.asarray(M.logits(back_cfg, back, tokens)), ref)


def test_official_gemma4_checkpoint_written_by_hand(tmp_path, moe_model):
    """A FLAT tree in the library's own names and layouts, no sidecar: the custom shape needs its
    pattern, window, KV sharing and top-k; the rest comes from the shapes."""
    import orbax.checkpoint as ocp

    config, _, _, (cfg, params) = moe_model
    src = layout.flatten(M.unstack_layers(cfg, params))
    tree = {}
    for path, x in src.items():
        x = np.asarray(x)
        name, perm = weights.official.official_name(cfg, path)
        if perm:
            x = np.transpose(x, np.argsort(perm))
        *mod, leaf = name.split("/")
        tree.setdefault("transformer/" + "/".join(mod), {})[leaf] = x
    assert tree["transformer/layer_0/mlp/gating_einsum"]["w"].shape == (8, 2, 32, 64)
    ocp.PyTreeCheckpointer().save(tmp_path / "kaggle" / "gemma4-x", tree)
    with pytest.raises(UserError, match=r"no published Gemma 4 size .*attention_pattern, sliding_window, "
                                        r"num_kv_shared_layers, experts_per_token must be given"):
        weights.load(tmp_path / "kaggle")
    hparams = dict(attention_pattern=["local", "global"], sliding_window=8, num_kv_shared_layers=0,
                   experts_per_token=2)
    loaded_cfg, loaded = weights.load(tmp_path / "kaggle", config=hparams)
    assert loaded_cfg == cfg
    same_tree(loaded, params)


# ----------------------------------------------------------------------------- experts


def _moe_loss(cfg, params, tokens):
    """Mean next-token cross-entropy of the model on `tokens`."""
    logits = M.Transformer(cfg).apply({"params": params}, tokens)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_experts_sharded_over_8_devices_equal_one_device(moe_model):
    """Expert parallelism: with 'expert' -> fsdp, each of 8 devices holds one of the 8 experts and
    runs it on every token; logits and gradients of the model equal one device's."""
    _, _, _, (cfg, params) = moe_model
    tokens = np.random.default_rng(5).integers(1, cfg.vocab_size, (8, 24))
    grad = jax.jit(jax.value_and_grad(_moe_loss, argnums=1), static_argnums=0)
    ref_logits, (ref_loss, ref_grads) = np.asarray(M.logits(cfg, params, tokens)), grad(cfg, params, tokens)
    mesh = sharding.make_mesh(1, 8, 1)
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    w = sharded["layers"]["global"]["moe"]["expert_gating"]["w"]
    assert w.sharding.spec[2] == "fsdp" and w.addressable_shards[0].data.shape[2] == 1  # one expert each
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert moe.expert_axis(cfg.num_experts) == "fsdp"
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        out = M.logits(cfg, sharded, batch)
        loss, grads = grad(cfg, sharded, batch)
    np.testing.assert_allclose(np.asarray(out), ref_logits, atol=1e-4)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


def _expert_inputs(seed=0, t=40, e=8, k=2, d=16, f=12, rank=3):
    """Random routing and expert weights (with LoRA pairs) for moe.expert_ffn."""
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(r.uniform(0.1, 1.0, (t, k)), jnp.float32)
    n = lambda *s: jnp.asarray(r.normal(size=s) / np.sqrt(s[-2]), jnp.float32)  # noqa: E731
    gating = (n(2, e, d, f), (n(2, e, d, rank), n(2, e, rank, f)))
    linear = (n(e, f, d), (n(e, f, rank), n(e, rank, d)))
    return x, idx, w, gating, linear


def test_both_dispatches_compute_the_routed_experts_on_one_device_and_on_a_mesh():
    """dense and ragged dispatch (LoRA pairs included) equal a per-token loop over the chosen
    experts; split over the 8 devices of an expert axis, the psum of their shares equals it too."""
    x, idx, w, gating, linear = _expert_inputs()
    (gw, (ga, gb)), (lw, (la, lb)) = gating, linear
    expect = np.zeros(x.shape, np.float32)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = [x[t] @ gw[c, e] + 0.5 * (x[t] @ ga[c, e]) @ gb[c, e] for c in range(2)]
            h = jax.nn.gelu(gate, approximate=True) * up
            expect[t] += float(w[t, j]) * np.asarray(h @ lw[e] + 0.5 * (h @ la[e]) @ lb[e])
    mesh = sharding.make_mesh(1, 8, 1)
    for impl in ("dense", "ragged"):
        out = moe.expert_ffn(x, idx, w, gating, linear, impl=impl, lora_scale=0.5)
        np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5, rtol=1e-5)
        run = jax.jit(lambda *a, impl=impl: moe.experts(*a, impl=impl, lora_scale=0.5))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            assert "psum" in str(jax.make_jaxpr(run)(x, idx, w, gating, linear))
            np.testing.assert_allclose(np.asarray(run(x, idx, w, gating, linear)), expect, atol=1e-5, rtol=1e-5)
    # Experts of another device add nothing: the shares of two halves sum to the whole.
    half = lambda tree, lo: jax.tree.map(lambda a: a[:, lo:lo + 4] if a.ndim == 4 and a.shape[0] == 2 else a[lo:lo + 4],  # noqa: E731
                                        tree)
    parts = [moe.expert_ffn(x, idx, w, half(gating, lo), half(linear, lo), first=lo, impl="ragged", lora_scale=0.5)
             for lo in (0, 4)]
    np.testing.assert_allclose(np.asarray(parts[0] + parts[1]), expect, atol=1e-5, rtol=1e-5)


def test_lora_on_the_experts(moe_model):
    _, _, _, (cfg, params) = moe_model
    tokens, _ = tokens_and_mask(cfg)
    paths = {"/".join(p) for p in lora.target_paths(params, GEMMA4_LORA_TARGETS)}
    assert {"layers/local/moe/expert_gating/w", "layers/global/moe/expert_linear/w",
            "layers/global/attn/k_einsum/w"} <= paths
    assert not any("router" in p for p in paths)
    adapters = lora.init(params, 4, GEMMA4_LORA_TARGETS, jax.random.key(2))
    a = adapters["layers"]["global"]["moe"]["expert_gating"]["a"]
    b = adapters["layers"]["global"]["moe"]["expert_gating"]["b"]
    assert a.shape == (2, 2, 8, 64, 4) and b.shape == (2, 2, 8, 4, 32)  # per layer, gate/up, expert
    keys = iter(jax.random.split(jax.random.key(3), 200))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    only_experts = jax.tree_util.tree_map_with_path(
        lambda p, x: x if "moe" in jax.tree_util.keystr(p) else jnp.zeros_like(x), adapters)
    base = np.asarray(M.logits(cfg, params, tokens))
    apply = jax.jit(lambda v: M.Transformer(cfg).apply(v, tokens))
    assert float(jnp.abs(apply({"params": params, "lora": only_experts}) - base).max()) > 0.05
    with_adapters = apply({"params": params, "lora": adapters})
    np.testing.assert_allclose(M.logits(cfg, lora.merge(cfg, params, adapters), tokens), with_adapters,
                               atol=2e-4, rtol=1e-4)
    qparams, scales = lora.quantize(params, "int8")
    assert qparams["layers"]["local"]["moe"]["expert_linear"]["w"].dtype == jnp.int8
    # one scale per layer, expert and output channel (the expert axis is not summed over)
    assert scales["layers"]["local"]["moe"]["expert_linear"]["scale"].shape == (2, 8, 1, 64)
    quantised = apply({"params": qparams, "quant": scales})
    assert 0 < float(jnp.abs(quantised - base).max()) < 0.05 * float(np.abs(base).max())


def test_lora_training_moves_the_expert_adapters_and_the_planner_counts_active_params():
    """configs/legal.py:gemma4_tiny with LoRA: adapters on the experts (and k_einsum) train, the
    frozen base does not move; the memory planner's estimate follows the compiled step."""
    from gemma_jax import config as config_lib, memory, train
    from test_train import leaves, legal_examples, one_device_mesh, random_params, rows_of, tokenizer

    cfg = config_lib.load("configs/legal.py:gemma4_tiny")
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = 4, 8.0, "float32"
    cfg.train.batch_size, cfg.opt.lr, cfg.opt.warmup_steps = 4, 1e-2, 1
    config = train.lora_model_config(cfg, train.model_config(cfg, tokenizer()))
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    state = trainer.init_state(jax.device_put(random_params(config, seed=3, scale=0.3)))
    before, base = leaves(state["params"]), leaves(trainer.frozen)
    assert any("expert_gating" in k for k in before) and any("k_einsum" in k for k in before)
    batch = trainer.put_batch(rows_of(legal_examples()[:4], 256, packing=False))
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    moved = {k for k, v in leaves(state["params"]).items() if not np.array_equal(v, before[k])}
    assert {k for k in before if "expert" in k} <= moved
    for k, v in leaves(trainer.frozen).items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)
    # The planner: active < total, and its estimate within 25% of XLA's compiled step on 8 devices.
    cfg.lora.rank, cfg.train.batch_size = 0, 8
    config = memory.model_config_for(cfg)
    assert config.num_active_params() < config.num_params()
    plan = memory.plan(cfg, config, sharding.make_mesh(1, 8, 1), mode="full", compile=True)
    assert abs(plan.estimate / plan.compiled["peak"] - 1) < 0.25


def test_grpo_with_lora_on_a_mesh_equals_one_device(tmp_path):
    """GRPO on a Gemma 4 with PLE, KV sharing, experts and K = V at once (LoRA with adapters on the
    experts and the K=V projections; the reference is the base): rollouts from the sampler (KV-shared
    layers read their producer's cache, experts split over the mesh), rewards, the reference pass and
    two steps on the 2x2x2 mesh give what one device gives; the adapters move, the base does not."""
    from gemma_jax import train
    from gemma_jax.train import rollout
    from test_grpo import run_config
    from test_train import assert_trees_close, leaves, one_device_mesh, random_params, tokenizer

    out = {}
    for name, mesh in (("1", one_device_mesh()), ("8", sharding.make_mesh(2, 2, 2, devices=jax.devices()))):
        cfg = run_config(tmp_path, beta=0.1)
        m = cfg.model
        m.preset = "gemma4_e_test"
        for k in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
                  "query_pre_attn_scalar", "sliding_window"):
            m[k] = None
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = 4, 8.0, "float32"
        cfg.lora.targets = GEMMA4_LORA_TARGETS
        cfg.opt.warmup_steps = 0  # the first step moves the adapters: the second one's KL is > 0
        # Adam's first steps move a weight by ~lr whatever its gradient's size: an eps well above the
        # near-zero gradients (A's, while B is still ~0) keeps summation-order noise from being scaled up.
        cfg.opt.eps = 1e-3
        # 6 layers (local, global): 0-3 compute their KV (2, 3 hand it on), 4-5 reuse it.
        config = train.model_config(cfg, tokenizer()).replace(
            num_layers=6, attention_pattern=("local", "global"), num_kv_shared_layers=2, num_experts=8,
            experts_per_token=2, expert_dim=16, attention_k_eq_v=True)
        config = train.lora_model_config(cfg, config)
        trainer = train.Trainer.create(cfg, config, mesh)
        state = trainer.init_state(jax.device_put(random_params(config, seed=5, scale=0.5)))
        frozen, before = leaves(trainer.frozen), leaves(state["params"])
        assert any("shared" in k or "per_layer" in k for k in frozen) and any("expert" in k for k in before)
        ro = rollout.build(cfg, tokenizer(), trainer, str(tmp_path / name)).train
        metrics = []
        for _ in range(2):
            state, m_ = ro.step(state)
            metrics.append({k: float(v) for k, v in jax.device_get(m_).items() if not k.endswith("per_second")})
        after = leaves(state["params"])
        for k, v in leaves(trainer.frozen).items():
            np.testing.assert_array_equal(v, frozen[k], err_msg=k)
        moved = {k for k, v in after.items() if not np.array_equal(v, before[k])}
        assert all(k.endswith(("['a']", "['b']")) for k in after), sorted(after)[:5]  # adapters only
        assert any("expert" in k for k in moved) and any("k_einsum" in k for k in moved), sorted(moved)
        out[name] = metrics, jax.device_get(state["params"])
    for a, b in zip(out["8"][0], out["1"][0]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert out["1"][0][-1]["kl"] > 0 and out["1"][0][0]["reward_std"] > 0
    assert_trees_close(out["8"][1], out["1"][1], rtol=1e-3, atol=1e-5, what="params")
