"""Head-aware pruning of Hugging Face models built from small configs."""

import copy

import pytest
import torch

import nnslim
from nnslim.graph.tp_compat import TraceError
from tests.zoo import bert_config, gpt2_config, llama_config

tf = pytest.importorskip("transformers")

T = 12


def ids():
    return {"input_ids": torch.randint(0, 300, (1, T))}


def llama(kv):
    cfg = llama_config(intermediate_size=176, num_attention_heads=8, num_key_value_heads=kv)
    return tf.LlamaForCausalLM(cfg), ids()


def qwen2():
    cfg = tf.Qwen2Config(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return tf.Qwen2ForCausalLM(cfg), ids()


def gpt2():
    cfg = gpt2_config()
    return tf.GPT2LMHeadModel(cfg), ids()


def bert():
    cfg = bert_config()
    return tf.BertModel(cfg), ids()  # with pooler


def vit():
    cfg = tf.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return tf.ViTForImageClassification(cfg), {"pixel_values": torch.randn(1, 3, 32, 32)}


def whisper():
    cfg = tf.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=300,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        num_mel_bins=16,
        max_source_positions=32,
        max_target_positions=32,
    )
    inputs = {
        "input_features": torch.randn(1, 16, 64),
        "decoder_input_ids": torch.randint(0, 300, (1, 6)),
    }
    return tf.WhisperForConditionalGeneration(cfg), inputs


MODELS = {
    "llama-mha": lambda: llama(8),
    "llama-gqa": lambda: llama(2),
    "qwen2-gqa": qwen2,
    "gpt2": gpt2,
    "bert-pooler": bert,
    "vit": vit,
    "whisper": whisper,
}
#: configs that state the head size, so from_pretrained rebuilds pruned heads
HEAD_DIM_CONFIGS = {"llama-mha", "llama-gqa", "qwen2-gqa", "vit"}


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def pruned(request):
    torch.manual_seed(0)
    model, x = MODELS[request.param]()
    model.eval()
    with torch.no_grad():
        shape = main_output(model(**x)).shape
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    return request.param, model, x, shape, report


def test_heads_pruned_and_forward_runs(pruned):
    name, model, x, shape, report = pruned
    with torch.no_grad():
        out = model(**x)
    assert main_output(out).shape == shape
    heads = [c.details["heads"] for c in report.changes if "heads" in c.details]
    assert heads, "no attention heads were pruned"
    before, after = (int(v) for v in heads[0].split("->"))
    assert after < before
    assert report.after.macs < 0.75 * report.before.macs


def test_gqa_stays_consistent():
    torch.manual_seed(0)
    model, x = llama(2)
    nnslim.Prune(ratio=0.5).apply(model.eval(), x)
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.k_proj.out_features == 2 * a.head_dim  # key/value heads kept
        assert a.q_proj.out_features == 4 * a.head_dim  # 2 of 4 query heads per group removed
        assert a.num_key_value_groups == 2
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    with torch.no_grad():
        model.generate(x["input_ids"], max_new_tokens=3, do_sample=False)  # KV cache path


def test_config_fields_updated(pruned):
    name, model, x, shape, report = pruned
    cfg = model.config
    if name.startswith(("llama", "qwen2")):
        assert cfg.intermediate_size == model.model.layers[0].mlp.up_proj.out_features == 88
    if name == "gpt2":
        assert cfg.n_inner == model.transformer.h[0].mlp.c_fc.nf == 128
        assert model.transformer.h[0].attn.split_size == 32
    if name == "whisper":
        assert cfg.encoder_ffn_dim == 64 and cfg.encoder_attention_heads == 2


#: models whose pruned hidden width (0.5 of 64) is their pruned heads x head size (2 x 16)
HIDDEN_FOLLOWS_HEADS = {"gpt2", "whisper"}


def test_save_pretrained_round_trip(pruned, tmp_path):
    name, model, x, shape, report = pruned
    with torch.no_grad():
        ref = main_output(model(**x))
    cannot = any("from_pretrained cannot rebuild" in n for n in report.notes)
    if name in HEAD_DIM_CONFIGS or name in HIDDEN_FOLLOWS_HEADS:
        # a config naming head_dim, or a hidden width of exactly heads x head size (0.5 of 64
        # channels and of 4 heads): the config derives the pruned heads' size correctly
        assert not cannot, report.notes
        model.save_pretrained(tmp_path)
        back = type(model).from_pretrained(tmp_path).eval()
    else:
        # the config derives the head size from hidden_size / heads: plain from_pretrained
        # cannot describe pruned heads, and the report says so
        assert cannot
        nnslim.hf.save_pretrained(model, tmp_path)
        back = nnslim.hf.from_pretrained(type(model), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(main_output(back(**x)), ref, atol=1e-5)


def test_nnslim_save_load_round_trip(pruned, tmp_path):
    name, model, x, shape, report = pruned
    nnslim.save(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    base, _ = MODELS[name]()
    back = nnslim.load(tmp_path / "m.safetensors", base).eval()
    with torch.no_grad():
        assert torch.allclose(main_output(back(**x)), main_output(model(**x)), atol=1e-6)


def test_select_only_mlp_keeps_heads():
    torch.manual_seed(0)
    model, x = llama(8)
    report = nnslim.Prune(ratio=0.5, select="re:.*mlp.*").apply(model.eval(), x)
    assert model.model.layers[0].self_attn.q_proj.out_features == 64
    assert model.model.layers[0].mlp.up_proj.out_features == 88
    assert "model.layers.0.self_attn" in [s.path for s in report.skips]


def test_per_attention_ratio_through_select():
    torch.manual_seed(0)
    model, x = llama(8)
    nnslim.Prune(select={"model.layers.0.self_attn.q_proj": 0.25}).apply(model.eval(), x)
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert a0.q_proj.out_features == 6 * a0.head_dim  # 2 of 8 heads
    assert a1.q_proj.out_features == 8 * a1.head_dim  # untouched


def _slow_groups(monkeypatch):
    """Each member added to a pruning group takes 50 ms."""
    import time

    import torch_pruning as tp

    add = tp.dependency.Group.add_dep

    def slow(self, dep, idxs):
        time.sleep(0.05)
        add(self, dep, idxs)

    monkeypatch.setattr(tp.dependency.Group, "add_dep", slow)


def test_trace_time_limit_names_the_module(monkeypatch):
    model, x = llama(8)
    g = nnslim.trace(model.eval(), x, time_limit=1.0)
    _slow_groups(monkeypatch)
    with pytest.raises(TraceError, match=r"did not finish within 1 s \(at model\.layers\.\d"):
        g.groups()


def test_prune_exposes_the_trace_time_limit(monkeypatch):
    model, x = llama(8)
    model.eval()
    _slow_groups(monkeypatch)
    with pytest.raises(TraceError, match=r"did not finish within 1 s"):
        nnslim.Prune(ratio=0.3, time_limit=1.0).apply(model, x)


def test_plan_on_meta_matches_apply():
    cfg = llama_config(intermediate_size=176, num_attention_heads=8)
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(cfg).eval()
    t = nnslim.Prune(ratio=0.5, round_to=8)
    plan = t.plan(meta, {"input_ids": torch.zeros(1, 4, dtype=torch.long, device="meta")})
    assert meta.model.layers[0].mlp.up_proj.weight.device.type == "meta"  # nothing allocated
    assert [h[1:] for h in plan.heads] == [(8, 4, 2), (8, 4, 2)]
    assert [c[:3] for c in plan.channels] == [
        ("model.layers.0.self_attn.o_proj", 64, 32),  # the hidden width (residual stream)
        ("model.layers.0.mlp.gate_proj", 176, 88),
        ("model.layers.1.mlp.gate_proj", 176, 88),
    ]
    assert "model.layers.0.mlp.up_proj" in plan.channels[1][3]
    assert "model.embed_tokens" in plan.channels[0][3]
    assert "lm_head" in [p for p, _ in plan.skips]
    torch.manual_seed(0)
    real = tf.LlamaForCausalLM(cfg).eval()
    t.apply(real, ids())
    assert real.model.layers[0].mlp.gate_proj.out_features == 88
    assert real.model.layers[0].self_attn.q_proj.out_features == 4 * 8
    assert real.model.embed_tokens.embedding_dim == real.config.hidden_size == 32
    assert "gate_proj" in str(plan)


def test_hidden_width_is_pruned_and_the_config_follows(tmp_path):
    # the residual stream the output projections write is a group like a ResNet's residual
    # channels: embeddings, norms, q/k/v and MLP inputs and the LM head's input follow it
    torch.manual_seed(0)
    model, x = llama(2)
    model.eval()
    with torch.no_grad():
        shape = model(**x).logits.shape
    rep = nnslim.Prune(ratio=0.5).apply(model, x)
    cfg = model.config
    assert model.model.embed_tokens.embedding_dim == cfg.hidden_size == 32
    assert model.model.norm.weight.shape == (32,)
    assert model.lm_head.in_features == 32 and model.lm_head.out_features == 300
    assert model.model.layers[0].self_attn.head_dim == cfg.head_dim == 8  # kept, not 32 // 4
    with torch.no_grad():
        ref = model(**x).logits
    assert ref.shape == shape
    assert rep.after.macs < 0.4 * rep.before.macs
    model.save_pretrained(tmp_path)  # the config rebuilds every tensor
    back = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, ref, atol=1e-5)


def test_a_layer_whose_output_the_model_drops_follows_the_hidden_width():
    # CLIPForImageClassification computes pooler_output = post_layernorm(class token) and
    # drops it (the classifier pools the tokens itself): torch-pruning, walking back from the
    # outputs only, never reaches post_layernorm. nnslim traces from every layer's output too,
    # so the norm follows the hidden width instead of breaking the forward
    cfg = tf.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(0)
    model = tf.CLIPForImageClassification(cfg).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    with torch.no_grad():
        shape = model(**x).logits.shape
    rep = nnslim.Prune(ratio=0.5).apply(model, x)
    assert not any(n.startswith("the hidden width") for n in rep.notes), rep.notes
    layer = model.vision_model.encoder.layers[0]
    width = layer.self_attn.out_proj.out_features
    assert width == 32  # the residual width
    assert model.vision_model.post_layernorm.weight.shape == (width,)
    assert layer.self_attn.q_proj.out_features == 32  # 2 of 4 heads
    assert layer.mlp.fc1.out_features == 64
    with torch.no_grad():
        assert model(**x).logits.shape == shape


def test_hidden_width_through_a_weight_normed_conv_is_kept_and_the_rest_pruned():
    # Wav2Vec2's positional convolution is weight-normed (a parametrized weight torch-pruning
    # cannot set): the hidden width stays, with the reason, and heads and MLP units go
    cfg = tf.Wav2Vec2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=32,
    )
    torch.manual_seed(0)
    model = tf.Wav2Vec2ForCTC(cfg).eval()
    x = {"input_values": torch.randn(1, 4000)}
    with torch.no_grad():
        shape = model(**x).logits.shape
    rep = nnslim.Prune(ratio=0.5).apply(model, x)
    assert any(n.startswith("the hidden width") for n in rep.notes)
    layer = model.wav2vec2.encoder.layers[0]
    assert layer.attention.out_proj.out_features == 64
    assert layer.attention.q_proj.out_features == 32
    with torch.no_grad():
        assert model(**x).logits.shape == shape


def test_a_norm_over_the_concatenated_heads_loses_the_pruned_heads(tmp_path):
    # BitNet normalizes the attention output (all heads) with attn_sub_norm before o_proj; the
    # forward broke when heads went and the norm kept its width
    cfg = tf.BitNetConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = tf.BitNetForCausalLM(copy.deepcopy(cfg)).eval()
    x = ids()
    nnslim.Prune(ratio=0.5).apply(model, x)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features < 64
    assert attn.attn_sub_norm.weight.shape == (attn.q_proj.out_features,)
    assert attn.o_proj.in_features == attn.q_proj.out_features
    with torch.no_grad():
        assert torch.isfinite(model(**x).logits).all()
    nnslim.save(model, tmp_path / "m.safetensors")
    loaded = nnslim.load(tmp_path / "m.safetensors", tf.BitNetForCausalLM(cfg).eval())
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_norms_without_parameters_follow_the_pruned_width():
    # OLMo's LayerNorm (and nn.LayerNorm(elementwise_affine=False)) stores the width it
    # normalizes over but holds no vector that pruning shortens
    cfg = tf.OlmoConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = tf.OlmoForCausalLM(cfg).eval()
    report = nnslim.Prune(ratio=0.3).apply(model, ids())
    width = model.model.embed_tokens.weight.shape[1]
    assert width < 64, report.notes  # the hidden width went, not kept by the fallback
    assert tuple(model.model.layers[0].input_layernorm.normalized_shape) == (width,)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 32)
            self.norm = torch.nn.LayerNorm(32, elementwise_affine=False)
            self.b = torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.b(self.norm(torch.relu(self.a(x))))

    net = Net()
    nnslim.Prune(ratio=0.5).apply(net, torch.randn(2, 8))
    assert net.norm.normalized_shape == (16,) and net.a.out_features == 16


def _cvt():
    # transformers indexes each stage's drop-path rates by the stage number: depth[i] > i
    cfg = tf.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=3)
    torch.manual_seed(0)
    return tf.CvtForImageClassification(cfg).eval(), torch.randn(1, 3, 64, 64)


def test_a_cat_whose_inputs_torch_pruning_cannot_size_is_left_unmapped():
    # CvT splits its class token off on the token dim and concatenates it back; torch-pruning
    # 1.6 raised IndexError/TypeError from inside (it sums the channels before checking them)
    model, x = _cvt()
    report = nnslim.Prune(ratio=0.3).apply(model, x)
    assert report.after.macs <= 0.85 * report.before.macs
    with torch.no_grad():
        assert model(x).logits.shape == (1, 3)


def test_upstream_concat_mapping_still_raises_on_cvt():
    # when this fails, torch-pruning sizes such cats itself: drop the wrapper in
    # nnslim.graph.tp_compat._fixed_concat
    import torch_pruning as tp

    model, x = _cvt()
    with pytest.raises((IndexError, TypeError)):
        tp.DependencyGraph().build_dependency(model, example_inputs=x)


def _falcon_mamba():
    cfg = tf.FalconMambaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=300,
        state_size=8,
        intermediate_size=64,
        time_step_rank=4,
    )
    torch.manual_seed(0)
    return tf.FalconMambaForCausalLM(cfg).eval(), ids()


def test_a_group_torch_pruning_cannot_build_is_skipped_with_the_reason():
    # FalconMamba's in_proj: an IndexError from inside torch-pruning's index mapping failed the
    # whole transform; now that root keeps its channels, named, and the rest is pruned
    model, x = _falcon_mamba()
    report = nnslim.Prune(ratio=0.3).apply(model, x)
    reasons = {s.path: s.reason for s in report.skips}
    assert (
        "torch-pruning cannot build its channel group (IndexError"
        in (reasons["backbone.layers.0.mixer.in_proj"])
    )
    assert model.backbone.layers[0].mixer.in_proj.out_features == 128  # kept: 2 x 64
    assert report.after.macs < 0.85 * report.before.macs
    with torch.no_grad():
        assert torch.isfinite(model(**x).logits).all()


def test_upstream_index_mapping_still_raises_on_falcon_mamba():
    # when this fails, torch-pruning builds the group itself and the per-root catch in
    # Graph.dynamic_split_roots is no longer exercised by this model
    import torch_pruning as tp

    from nnslim.graph.tp_compat import DependencyGraph

    model, x = _falcon_mamba()
    dg = DependencyGraph().build_dependency(
        model, example_inputs=x, forward_fn=lambda m, i: m(**i, use_cache=False)
    )
    m = model.backbone.layers[0].mixer.in_proj
    with pytest.raises(IndexError):
        dg.get_pruning_group(m, tp.prune_linear_out_channels, list(range(m.out_features)))


def test_heads_listed_per_stage_in_the_config_get_a_note_not_a_crash():
    # SegFormer's config lists heads per stage: writing one int raised a strict-dataclass
    # validation error from inside huggingface_hub. Its sequence reduction (conv, reshape,
    # LayerNorm) is a link the graph misses: the norm was pruned and its conv was not, and the
    # transform failed; now the groups reaching that norm keep their channels in every stage
    cfg = tf.SegformerConfig(
        hidden_sizes=[16, 32, 48, 64],
        num_attention_heads=[2, 2, 4, 4],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = tf.SegformerForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert list(model.config.num_attention_heads) == [2, 2, 4, 4]
    assert any("config.num_attention_heads" in n for n in report.notes)
    heads = [c for c in report.changes if "heads" in c.details]
    assert len(heads) == 4
    kept = {s.path: s.reason for s in report.skips}
    for stage in (0, 1, 2):  # sr_ratios 8, 4, 2; the last stage has no reduction
        path = f"segformer.stages.{stage}.blocks.0.attention.sequence_reduction.sequence_reduction"
        assert "dependency graph misses a link" in kept[path]
    assert report.after.macs < 0.8 * report.before.macs
    with torch.no_grad():
        assert model(x).logits.shape == (1, 3)


def test_attention_sinks_follow_the_pruned_heads_exactly():
    """gpt-oss (and the sliding-window Granite variants) keep one learned sink logit per query
    head on the attention module: it loses the pruned heads' entries, so the kept heads keep
    their own sinks and the output is the original's with the removed heads' columns zeroed."""
    cfg = tf.GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=128,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg).eval()
    for layer in model.model.layers:
        a = layer.self_attn
        with torch.no_grad():
            a.sinks.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
            for h in (1, 3):  # one query head per key/value group, nothing reaches the output
                a.q_proj.weight[h * 16 : (h + 1) * 16] = 0
                a.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    x = {"input_ids": torch.randint(0, 128, (1, 12))}
    with torch.no_grad():
        ref = model(**x).logits
    select = {f"model.layers.{i}.self_attn.q_proj": 0.5 for i in range(2)}
    nnslim.Prune(select=select).apply(model, x)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features == 32
        assert layer.self_attn.sinks.tolist() == [0.5, 2.0]
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, ref, atol=1e-5)


def _t5():
    cfg = tf.T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(cfg).eval()


def test_t5_heads_leave_every_layer_of_a_stack_and_the_position_bias_exactly(tmp_path):
    """T5's first layer builds one ``[1, heads, q, k]`` position bias that every later layer of
    its stack adds (cross-attention: zeros of its head count): the same heads leave every
    layer of a stack and the bias table's columns; the output is the original's."""
    model = _t5()
    attns = [m for n, m in model.named_modules() if type(m).__name__ == "T5Attention"]
    assert len(attns) == 6  # 2 encoder self, 2 decoder self, 2 decoder cross
    with torch.no_grad():
        for a in attns:
            for lin in (a.q, a.k, a.v):
                lin.weight[8:16] = 0  # head 1 contributes nothing anywhere
            a.o.weight[:, 8:16] = 0
        # the second encoder layer alone would rather drop head 2 (small but not silent) and
        # keep head 1 (large q/k/v, silent output): the stack's choice is made once, together
        a = model.encoder.block[1].layer[0].SelfAttention
        for lin in (a.q, a.k, a.v):
            lin.weight[8:16] = lin.weight[0:8]
        for lin in (a.q, a.k, a.v):
            lin.weight[16:24] *= 0.05
        a.o.weight[:, 16:24] *= 0.05
    x = {
        "input_ids": torch.randint(0, 128, (1, 10)),
        "decoder_input_ids": torch.randint(0, 128, (1, 6)),
    }
    with torch.no_grad():
        ref = model(**x).logits
    select = {n + ".q": 0.25 for n, m in model.named_modules() if type(m).__name__ == "T5Attention"}
    nnslim.Prune(select=select).apply(model, x)
    for a in attns:
        assert a.n_heads == 3 and a.q.out_features == 24 and a.o.in_features == 24
    enc_bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert enc_bias.weight.shape == (8, 3)
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    nnslim.save(model, tmp_path / "t5.safetensors")
    loaded = nnslim.load(tmp_path / "t5.safetensors", _t5())
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_t5_heads_of_a_stack_selected_in_part_are_kept_with_the_reason():
    model = _t5()
    x = {"input_ids": torch.randint(0, 128, (1, 10)), "decoder_input_ids": torch.zeros(1, 4).long()}
    select = {
        "encoder.block.0.layer.0.SelfAttention.q": 0.5,
        "encoder.block.0.layer.1.DenseReluDense.wi": 0.5,
    }
    report = nnslim.Prune(select=select).apply(model, x)
    assert model.encoder.block[0].layer[0].SelfAttention.n_heads == 4
    assert model.encoder.block[0].layer[1].DenseReluDense.wi.out_features == 32
    reasons = {s.path: s.reason for s in report.skips}
    assert reasons["encoder.block.0.layer.0.SelfAttention"] == (
        "its heads index one position bias with 1 other attention layers, not all of them selected"
    )


def _mixtral():
    cfg = tf.MixtralConfig(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).eval()


def _gpt_oss():
    cfg = tf.GptOssConfig(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_()  # a bias per gate/up unit, pruned too
    return model


def _llama4():
    cfg = tf.Llama4TextConfig(
        hidden_size=32,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return tf.Llama4ForCausalLM(cfg).eval()


#: builder, the experts module under each layer, transposed ([E, H, 2I]), interleaved gate/up
BANKS = {
    "mixtral": (_mixtral, "mlp.experts", False, False),
    "gpt-oss": (_gpt_oss, "mlp.experts", True, True),
    "llama4": (_llama4, "feed_forward.experts", True, False),
}


@pytest.mark.parametrize("bank", list(BANKS))
def test_each_expert_of_a_moe_bank_loses_its_own_least_important_units_exactly(bank, tmp_path):
    """transformers stores a layer's experts as 3-D parameters (gate/up ``[E, 2I, H]`` and
    down ``[E, H, I]``, or both transposed; gate and up as halves or interleaved) that
    torch-pruning cannot see: every expert loses the same number of hidden units, each its
    own; units that contribute nothing leave the output as it was."""
    build, where, transposed, interleaved = BANKS[bank]
    model = build()
    for layer in model.model.layers:
        ex = layer.get_submodule(where)
        with torch.no_grad():
            for e in range(4):
                dead = torch.arange(e * 8, e * 8 + 8)  # another 8 units in every expert
                pair = torch.cat([2 * dead, 2 * dead + 1] if interleaved else [dead, dead + 32])
                ex.gate_up_proj[e].index_fill_(1 if transposed else 0, pair, 0.0)
                ex.down_proj[e].index_fill_(0 if transposed else 1, dead, 0.0)
                bias = getattr(ex, "gate_up_proj_bias", None)
                if bias is not None:
                    bias[e, pair] = 0
    x = {"input_ids": torch.randint(0, 128, (1, 12))}
    with torch.no_grad():
        ref = model(**x).logits
    paths = [f"model.layers.{i}.{where}" for i in range(2)]
    report = nnslim.Prune(select=dict.fromkeys(paths, 0.25)).apply(model, x)
    gu_shape, down_shape = ((4, 32, 48), (4, 24, 32)) if transposed else ((4, 48, 32), (4, 32, 24))
    for layer in model.model.layers:
        ex = layer.get_submodule(where)
        assert ex.gate_up_proj.shape == gu_shape and ex.down_proj.shape == down_shape
    assert model.config.intermediate_size == 24
    assert {c.path for c in report.changes} == set(paths)
    assert report.after.macs < report.before.macs  # the profiler counts the expert matmuls
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    nnslim.save(model, tmp_path / "moe.safetensors")
    loaded = nnslim.load(tmp_path / "moe.safetensors", build())
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_an_expert_bank_whose_gate_up_pairing_is_neither_layout_keeps_its_units():
    from nnslim.graph.fused_mlp import find_expert_banks

    model = _mixtral()
    ex = model.model.layers[0].mlp.experts
    forward = type(ex).forward

    def swapped(self, hidden, idx, weights):  # gate/up read as [up | gate] halves, reversed
        with torch.no_grad():
            saved = self.gate_up_proj.data
            self.gate_up_proj.data = saved.flip(1)
        try:
            return forward(self, hidden, idx, weights)
        finally:
            self.gate_up_proj.data = saved

    ex.forward = swapped.__get__(ex)
    banks, left = find_expert_banks(model)
    assert [b.path for b in banks] == ["model.layers.1.mlp.experts"]
    assert "neither as halves nor interleaved" in left["model.layers.0.mlp.experts"]


def test_an_expert_bank_keeps_a_multiple_of_8_units_for_grouped_mm():
    from nnslim.graph.fused_mlp import find_expert_banks

    banks, _ = find_expert_banks(_mixtral())
    bank = banks[0]
    assert len(banks) == 2 and bank.units == 32 and bank.experts == 4
    assert [bank.removable(r) for r in (0.1, 0.3, 0.5, 0.9)] == [0, 8, 16, 24]


def test_an_expert_bank_ranked_by_magnitude_under_another_importance_says_so():
    model = _mixtral()
    x = {"input_ids": torch.randint(0, 128, (1, 12))}
    select = {"model.layers.0.mlp.experts": 0.25}
    report = nnslim.Prune(select=select, importance="l1").apply(model, x)
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 24)
    assert any(
        "ranked by their L2 weight magnitude, not by importance='l1'" in n for n in report.notes
    )


def _phi4_multimodal():
    cfg = tf.Phi4MultimodalConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=200,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        audio_config=dict(
            hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2
        ),
    )
    torch.manual_seed(0)
    return tf.Phi4MultimodalForCausalLM(cfg).eval()


def test_a_towers_heads_do_not_write_the_text_config(tmp_path):
    # Phi-4-multimodal's text attention reads config.num_attention_heads; its vision and audio
    # towers have configs of their own. Their pruned head counts used to be written into the
    # text config, breaking the text attention (Prune failed and restored the model)
    model = _phi4_multimodal()
    x = {"input_ids": torch.randint(0, 200, (1, 10))}
    nnslim.Prune(ratio=0.5).apply(model, x)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.out_features == (2 + 2 * 2) * attn.head_dim  # 2 of 4 query heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert model.config.vision_config.num_attention_heads == 2  # not the text model's
    nnslim.save(model, tmp_path / "m")
    back = nnslim.load(tmp_path / "m", _phi4_multimodal())
    with torch.no_grad():
        assert torch.equal(back(**x).logits, model(**x).logits)


def _bert_mlm():
    cfg = tf.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
    )
    torch.manual_seed(0)
    return tf.BertForMaskedLM(cfg).eval()


def test_a_weight_tied_across_a_head_of_its_own_prunes_as_one_group(tmp_path):
    # BertForMaskedLM's decoder shares the word embeddings, but reads the output of a dense
    # layer of its own: torch-pruning saw two channel groups over one tensor, and pruning the
    # hidden width split the tie (so it was kept). Linked, they cut the same channels
    model = _bert_mlm()
    x = {"input_ids": torch.randint(0, 200, (1, 12))}
    report = nnslim.Prune(ratio=0.3).apply(model, x)
    emb, dec = model.bert.embeddings.word_embeddings, model.cls.predictions.decoder
    width = model.bert.encoder.layer[0].output.dense.out_features
    assert width < 64, report.notes
    assert emb.weight is dec.weight and emb.weight.shape == (200, width)
    assert model.cls.predictions.transform.dense.out_features == width
    assert not any(n.startswith("the hidden width") for n in report.notes)
    nnslim.save(model, tmp_path / "m")
    back = nnslim.load(tmp_path / "m", _bert_mlm())
    assert back.bert.embeddings.word_embeddings.weight is back.cls.predictions.decoder.weight
    with torch.no_grad():
        assert torch.equal(back(**x).logits, model(**x).logits)


def test_an_encoder_decoder_whose_decoder_alone_is_narrowed_keeps_cross_attention():
    # the encoder excluded, its width stays. The decoder's shrinks; EncoderDecoderModel would
    # then look for an enc_to_dec_proj it never built, unless the decoder config names the
    # encoder's width for cross-attention
    def bert(decoder):
        return tf.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=200,
            is_decoder=decoder,
            add_cross_attention=decoder,
        )

    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(bert(False), bert(True))
    torch.manual_seed(0)
    model = tf.EncoderDecoderModel(cfg).eval()
    x = {
        "input_ids": torch.randint(0, 200, (1, 12)),
        "decoder_input_ids": torch.randint(0, 200, (1, 7)),
    }
    with torch.no_grad():
        shape = model(**x).logits.shape
    report = nnslim.Prune(ratio=0.3, exclude=["re:encoder\\..*"]).apply(model, x)
    assert model.encoder.config.hidden_size == 64
    assert model.decoder.config.hidden_size < 64, report.notes
    assert model.decoder.config.cross_attention_hidden_size == 64
    with torch.no_grad():
        assert model(**x).logits.shape == shape


def test_selecting_one_of_a_groups_producers_prunes_the_group_with_its_partners():
    """A Llama MLP's hidden units are produced by gate_proj and up_proj together: selecting
    the gate alone prunes both and down_proj's inputs (it left the group whole before: the
    partner was frozen, a silent no-op); excluding the partner by name is refused with the
    reason (it would change nothing)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config(num_hidden_layers=2)).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    mlp = "model.layers.0.mlp"
    m = copy.deepcopy(model)
    report = nnslim.Prune(select={f"{mlp}.gate_proj": 0.5}).apply(m, x)
    assert m.model.layers[0].mlp.gate_proj.out_features == 64
    assert m.model.layers[0].mlp.up_proj.out_features == 64
    assert m.model.layers[0].mlp.down_proj.in_features == 64
    assert m.model.layers[1].mlp.gate_proj.out_features == 128  # not selected
    assert f"{mlp}.up_proj" not in {s.path for s in report.skips}
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="writes its channels together with.*up_proj"):
        nnslim.Prune(select={f"{mlp}.gate_proj": 0.5}, exclude=[f"{mlp}.up_proj"]).apply(m, x)
    assert m.model.layers[0].mlp.gate_proj.out_features == 128
    # a block's down projection writes the residual stream with every other block: selecting
    # the MLPs prunes their units, not the stream, and says so
    m = copy.deepcopy(model)
    report = nnslim.Prune(ratio=0.5, select="re:.*mlp.*").apply(m, x)
    assert m.model.layers[0].mlp.gate_proj.out_features == 64
    assert m.model.layers[0].mlp.down_proj.out_features == 64  # the hidden width, kept
    assert m.model.embed_tokens.embedding_dim == 64
    why = next(s.reason for s in report.skips if s.path == f"{mlp}.down_proj")
    assert "residual stream" in why


def test_a_per_layer_ratio_on_a_conv1d_layer_is_applied():
    """GPT-2's MLP layers are Hugging Face Conv1D (a customized torch-pruning pruner): a ratio
    given per layer in select prunes them (it was dropped, a silent no-op)."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(gpt2_config()).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    width = model.transformer.h[0].mlp.c_fc.nf
    nnslim.Prune(select={"transformer.h.0.mlp.c_fc": 0.25}).apply(model, x)
    assert model.transformer.h[0].mlp.c_fc.nf == width - width // 4
    assert model.transformer.h[1].mlp.c_fc.nf == width
