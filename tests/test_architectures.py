"""Hugging Face architectures beyond the tiny Llama, BERT and GPT-2 of conftest: an encoder-decoder (T5), a model
whose output layer has another name than `lm_head` (Whisper's `proj_out`), a tied `lm_head` that is a target."""

import copy
import warnings

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration, WhisperConfig,
                          WhisperForConditionalGeneration)

from conftest import VOCAB
from unified_lora import setup_unified_lora
from unified_lora.model import lora_layers, merge_adapters, set_rank, unmerge_adapters
from unified_lora.peft_io import export_peft_adapter, merge_and_unload


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _random_b(model, seed=3):
    """Non-zero B blocks (B starts at 0, where every rank computes the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_t5_runs_trains_merges_and_generates_with_every_linear_wrapped(tmp_path):
    """T5's feed-forward casts its input to `self.wo.weight.dtype`, so with `wo` wrapped (any "all-linear" or `wo`
    target) the forward raised "'NestedLoRALayer' object has no attribute 'weight'" (MT5, LongT5, UMT5 and
    SwitchTransformers too). The layer now gives its base layer's `weight` and `bias`, as PEFT's LoRA layers do."""
    from peft import PeftModel

    model = tiny_t5()
    adapters, _ = setup_unified_lora(model, target_modules="all-linear", print_fn=None)
    assert {"encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.1.layer.1.EncDecAttention.k"} <= set(adapters)
    assert "lm_head" not in adapters
    layer = adapters["encoder.block.0.layer.1.DenseReluDense.wo"]
    assert layer.weight is layer.base_layer.weight and layer.bias is None
    _random_b(model)
    g = torch.Generator().manual_seed(1)
    x, dec = torch.randint(2, VOCAB, (2, 10), generator=g), torch.randint(2, VOCAB, (2, 6), generator=g)
    export_peft_adapter(model, adapters, tmp_path)  # PEFT gives the same logits (before fp32 merges round the base)
    with torch.no_grad():
        ours = model(input_ids=x, decoder_input_ids=dec).logits
        peft = PeftModel.from_pretrained(tiny_t5(), str(tmp_path)).eval()(input_ids=x, decoder_input_ids=dec).logits
    assert torch.equal(ours, peft)
    for r in (4, 8, 16):  # the nested path at every rank equals the merged weights
        set_rank(adapters, r)
        with torch.no_grad():
            out = model(input_ids=x, decoder_input_ids=dec).logits
            merge_adapters(model)
            merged = model(input_ids=x, decoder_input_ids=dec).logits
            unmerge_adapters(model)
        assert torch.allclose(out, merged, atol=1e-5)
    model.train()  # a backward reaches the encoder's wo blocks
    model(input_ids=x, labels=dec).loss.backward()
    assert layer.lora_A[0].grad is not None and layer.lora_A[2].grad is not None
    model.zero_grad()
    model.eval()

    set_rank(adapters, 4)  # generate after a rank switch: as the model merged at that rank
    got = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = merge_and_unload(copy.deepcopy(model))
    assert not lora_layers(plain)
    assert torch.equal(got, plain.generate(input_ids=x, max_new_tokens=5, do_sample=False))



def test_tie_weights_ties_the_base_weight_of_a_wrapped_lm_head():
    """transformers' `tie_weights` (resize_token_embeddings, the Trainer after loading a checkpoint without the tied
    key) sets `lm_head.weight = <the embedding>`. On a wrapped lm_head that registered a stray `weight` Parameter
    on the nested layer, which its forward never reads: the lm_head kept the old embedding and the state dict gained
    a key. It now ties the base layer's weight."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    adapters, _ = setup_unified_lora(model, target_modules=["q_proj", "lm_head"], print_fn=None)
    keys = set(model.state_dict())
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.detach() + 1.0, requires_grad=False)  # a new embedding
    model.tie_weights()
    lm_head = adapters["lm_head"]
    assert lm_head.base_layer.weight is emb.weight and lm_head.weight is emb.weight
    assert set(model.state_dict()) == keys
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        h = model.model(input_ids=x).last_hidden_state
        assert torch.allclose(model(input_ids=x).logits, lm_head(h), atol=0)
        assert torch.allclose(lm_head(h), h @ emb.weight.T, atol=1e-5)  # B = 0: the (new) embedding's logits



def _lm(kind: str):
    from conftest import tiny_gpt2, tiny_llama

    if kind == "gpt2":
        return tiny_gpt2(), ["c_attn", "lm_head"]
    if kind == "llama_untied":
        return tiny_llama(), ["q_proj", "lm_head"]
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval(), ["q_proj", "lm_head"]


@pytest.mark.parametrize("kind", ["gpt2", "llama_tied", "llama_untied"])
def test_resize_token_embeddings_after_setup_grows_a_wrapped_lm_head(kind):
    """Adding tokens after setup (a chat template's special tokens): transformers' `resize_token_embeddings` of a
    model whose targeted lm_head is a nested layer raised a TypeError ("Old language model head is of type
    NestedLoRALayer ...") after resizing the input embedding (untied), or resized the tied base weight and left B
    at the old vocabulary, so the next forward failed with a bare shape error (tied). Now the base layer is resized
    (and still tied), B gets zero rows for the new tokens (old tokens' logits unchanged), A is unchanged, and each
    block stays the Parameter an optimizer holds."""
    model, targets = _lm(kind)
    tied = model.config.tie_word_embeddings
    adapters, _ = setup_unified_lora(model, target_modules=targets, print_fn=None)
    head = adapters["lm_head"]
    with torch.no_grad():
        for b in head.lora_B:
            b.normal_()  # a trained head: a delta on every token
    A = [a.detach().clone() for a in head.lora_A]
    B_params = list(head.lora_B)
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        before = model(input_ids=x).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.resize_token_embeddings(VOCAB + 6)
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings() is head and emb.weight.shape[0] == VOCAB + 6
    assert head.base_layer.weight.shape == (VOCAB + 6, 32) and head.out_features == VOCAB + 6
    assert (head.base_layer.weight is emb.weight) == tied
    assert list(head.lora_B) == B_params and all(b.shape[0] == VOCAB + 6 and not b[VOCAB:].any() for b in head.lora_B)
    assert all(torch.equal(a, a0) for a, a0 in zip(head.lora_A, A))
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert after.shape[-1] == VOCAB + 6
    assert torch.allclose(after[..., :VOCAB], before, atol=1e-6)
    model(input_ids=torch.tensor([[VOCAB + 5, 1, 2]]), labels=torch.tensor([[VOCAB + 5, 1, 2]])).loss.backward()
    opt.step()  # the optimizer built before the resize (it has not stepped) still holds and trains the blocks
    assert head.lora_B[0][VOCAB:].abs().sum() > 0


def test_resize_token_embeddings_in_the_middle_of_a_run_trains_on():
    """A resize after training steps, as the README says (build the optimizer again, attach it): the last step's
    loss, still referenced, keeps the graph whose gradient accumulators hold each B block's old shape, and the next
    backward reused them ("invalid gradient at index 4 - got [70, 4] but expected shape compatible with [64, 4]");
    with that fixed, the composite signal's stored gradients of the old shape made the next ctrl.step fail ("The
    size of tensor a (70) must match the size of tensor b (64)"). Now the run goes on: the resized adapter's cosine
    starts again (None for one step) and the new tokens' rows train."""
    model, targets = _lm("llama_untied")
    adapters, ctrl = setup_unified_lora(model, target_modules=targets, print_fn=None)
    head = adapters["lm_head"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 6))
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
    model.resize_token_embeddings(VOCAB + 6, mean_resizing=False)  # `loss` and its graph still live
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x = torch.tensor([[VOCAB + 5, 1, 2, VOCAB + 1]])
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert all(b.grad.shape == (VOCAB + 6, b.shape[1]) for b in head.lora_B[:ctrl.rank // 4])
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
    assert head.lora_B[0][VOCAB:].abs().sum() > 0
    assert all(g.shape[0] == VOCAB + 6 for g in ctrl.grad_stats.prev[-1][len(ctrl.grad_stats.prev[-1]) // 2:])


def test_resize_token_embeddings_during_mirror_leaves_mirror_with_a_snapshot_of_the_new_shapes():
    """A resize while a Mirror snapshot is held (MIRROR): its B entries kept the old vocabulary, so the exit could
    neither compare nor restore, and every ctrl.step from the exit on raised ("has shape (70, 4), but its snapshot
    has (64, 4)"): the run never left MIRROR. Attaching the new optimizer (as the README says after a resize) now
    drops that snapshot with a warning; the next step takes one of the resized weights, and the exit rolls back
    to it."""
    from unified_lora import MachineConfig, MirrorConfig
    from unified_lora.model import lora_state_dict

    model, targets = _lm("llama_untied")
    adapters, ctrl = setup_unified_lora(model, target_modules=targets, print_fn=None, signal="loss",
                                        machine=MachineConfig(initial_mode=2, warmup_steps=6),
                                        mirror=MirrorConfig(policy="always"))

    def train(steps):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctrl.attach_optimizer(opt)
        for _ in range(steps):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            ctrl.step(loss=0.5)  # φ = 0.5 < θ1: the machine leaves MIRROR at its first decision, step 6
            opt.step()
            opt.zero_grad()

    x = torch.randint(0, VOCAB, (2, 6))
    train(2)
    assert ctrl.mirror.held
    model.resize_token_embeddings(VOCAB + 6, mean_resizing=False)
    x = torch.tensor([[VOCAB + 5, 1, 2, VOCAB + 1]])
    with pytest.warns(UserWarning, match="other shapes"):
        train(0)
    assert not ctrl.mirror.held
    start = {k: v.clone() for k, v in lora_state_dict(model).items() if not k.endswith("._extra_state")}
    train(5)  # the first step takes the new snapshot, of the resized blocks
    assert [(r.step, r.transition, r.snapshot) for r in ctrl.trace if r.transition or r.snapshot] == [
        (0, None, "saved"), (2, None, "saved"), (6, "MIRROR->MULTI", "restored")]
    after = lora_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in start.items()) and not ctrl.mirror.held


def test_resize_token_embeddings_of_a_merged_lm_head_is_refused_before_anything_changes():
    model, targets = _lm("llama_untied")
    adapters, _ = setup_unified_lora(model, target_modules=targets, print_fn=None)
    adapters["lm_head"].merge()
    with pytest.raises(ValueError, match="unmerge it first"):
        model.resize_token_embeddings(VOCAB + 6)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB and model.config.vocab_size == VOCAB
    assert model.get_output_embeddings() is adapters["lm_head"]

def test_all_linear_leaves_out_an_output_layer_whatever_its_name_as_peft_does():
    """PEFT's "all-linear" leaves out the model's output layer (`get_output_embeddings()`); ours left out only
    modules named lm_head, classifier, ..., so Whisper's `proj_out` (tied to the decoder's embedding) was wrapped:
    a vocabulary-sized LoRA pair PEFT's "all-linear" does not train, and `merge_adapters` refused the model."""
    from peft import LoraConfig, get_peft_model

    def whisper():
        torch.manual_seed(0)
        return WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
            max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)).eval()

    model = whisper()
    adapters, _ = setup_unified_lora(model, target_modules="all-linear", print_fn=None)
    peft = get_peft_model(whisper(), LoraConfig(target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft.named_modules()
                    if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert "proj_out" not in adapters
    assert set(adapters) == peft_targets
    _random_b(model)
    feats, dec = torch.randn(1, 16, 64), torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=dec).logits
        merge_adapters(model)  # no tied weight among the targets now
        assert torch.allclose(model(input_features=feats, decoder_input_ids=dec).logits, out, atol=1e-5)
    # named, it is still a target
    named, _ = setup_unified_lora(whisper(), target_modules=["q_proj", "proj_out"], print_fn=None)
    assert "proj_out" in named


def test_the_exported_task_type_is_the_one_peft_expects_for_the_class(tmp_path):
    """`infer_task_type` took every `...ForConditionalGeneration` for a seq2seq LM and every `...Model` for a feature
    extractor. A decoder-only vision-language model (Llava; Gemma 3, which transformers maps to AutoModelForCausalLM)
    was exported as SEQ_2_SEQ_LM, and MarianMTModel as FEATURE_EXTRACTION, so PEFT's `AutoPeftModelForCausalLM` /
    `...ForSeq2SeqLM` refused the adapter ("Expected target PEFT class ..."). The task now comes from transformers'
    causal-LM and seq2seq-LM mappings, then from the config's `is_encoder_decoder`."""
    from peft import PeftModel, PeftModelForCausalLM
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MarianConfig,
                              MarianMTModel)

    from unified_lora.peft_io import infer_task_type

    def llava():
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
            text_config=LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
            image_token_id=70, vision_feature_layer=-1)).eval()

    marian = MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                                        decoder_start_token_id=0))
    assert infer_task_type(marian) == "SEQ_2_SEQ_LM"
    assert infer_task_type(tiny_t5()) == "SEQ_2_SEQ_LM"  # an encoder-decoder ...ForConditionalGeneration

    model = llava()
    adapters, _ = setup_unified_lora(model, target_modules=["q_proj", "v_proj"], print_fn=None)
    _random_b(model)
    assert export_peft_adapter(model, adapters, tmp_path)["task_type"] == "CAUSAL_LM"
    ids, px = torch.tensor([[1, 70, 70, 70, 70, 5, 6, 7]]), torch.randn(1, 3, 16, 16)
    peft = PeftModel.from_pretrained(llava(), str(tmp_path)).eval()
    assert isinstance(peft, PeftModelForCausalLM)
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids, pixel_values=px).logits, model(input_ids=ids, pixel_values=px).logits)


def test_an_image_classifiers_export_carries_its_head_and_reloads_on_a_fresh_head(tmp_path):
    """ViT takes `pixel_values` (no input_ids) and its head is `classifier`, which `from_pretrained` initialises
    afresh for new labels. PEFT has no task type for image classification, so the export's "auto" saved no head
    (a text classifier's it does save), without a warning: PEFT's reload on a base with a fresh head gave other
    logits. The head is now carried, and the reload gives this model's logits."""
    from peft import PeftModel
    from transformers import ViTConfig, ViTForImageClassification

    def vit():
        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
            patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()

    model = vit()
    adapters, _ = setup_unified_lora(model, target_modules="all-linear", print_fn=None)  # the head left frozen
    assert not any(n.startswith("classifier") for n in adapters)
    _random_b(model)
    assert export_peft_adapter(model, adapters, tmp_path)["modules_to_save"] == ["classifier"]
    fresh = vit()
    torch.manual_seed(9)
    fresh.classifier.reset_parameters()  # as from_pretrained gives it for new labels
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (fresh(pixel_values=px).logits - model(pixel_values=px).logits).abs().max() > 1e-2  # the check can fail
        theirs = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()(pixel_values=px).logits
        assert torch.equal(theirs, model(pixel_values=px).logits)


def test_a_forward_that_computes_with_a_wrapped_layers_weight_instead_of_calling_it_is_an_error():
    """A wrapped layer's `.weight` is its base weight (as on PEFT's layers), so model code that computes with it
    instead of calling the layer would run without the LoRA delta, silently (it raised AttributeError before the
    layer had `.weight`): WavLM's attention passes q/k/v/out_proj's weights to F.multi_head_attention_forward,
    Mamba's mixer computes `dt_proj.weight @ x`, BLOOM's attention with `slow_but_exact` slices `dense.weight`. That
    forward is now a RuntimeError naming the layer (PEFT runs it without the delta). Layers the model calls, and code
    that only reads the weight's dtype before calling (T5's `wo`), run as before."""
    from transformers import MambaConfig, MambaForCausalLM, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, num_buckets=32, max_bucket_distance=64)
    wav = torch.randn(1, 400)
    model = WavLMModel(cfg).eval()
    setup_unified_lora(model, target_modules=["q_proj", "intermediate_dense"], print_fn=None)
    with pytest.raises(RuntimeError, match=r"WavLMAttention.forward computed with its 'q_proj.weight' directly"):
        model(input_values=wav)
    model = WavLMModel(cfg).eval()
    adapters, _ = setup_unified_lora(model, target_modules=["intermediate_dense"], print_fn=None)
    _random_b(model)
    with torch.no_grad():
        out = model(input_values=wav).last_hidden_state
        merge_adapters(model)  # the delta is in the output
        assert torch.allclose(model(input_values=wav).last_hidden_state, out, atol=1e-5)

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=1,
                                         intermediate_size=64, time_step_rank=4)).eval()
    setup_unified_lora(mamba, target_modules="all-linear", print_fn=None)
    with pytest.raises(RuntimeError, match=r"MambaMixer.forward computed with its 'dt_proj.weight' directly"):
        mamba(input_ids=torch.randint(0, VOCAB, (1, 6)))


def test_all_linear_leaves_out_a_linear_subclass_whose_forward_is_not_a_linear_map():
    """Llama 4's and PhiMoE's routers subclass nn.Linear with a forward that returns a tuple (scores, logits), so
    "all-linear" wrapped them and every forward raised "'tuple' object has no attribute 'reshape'" (DeepSeek-V4's
    grouped o_a_proj, a block-diagonal product of another width, raised a shape error). "all-linear" now leaves out
    a Linear subclass whose own forward does not return a Linear's output, and naming one is a ValueError; a subclass
    that computes a Linear's output its own way (Falcon's FalconLinear) is still wrapped."""
    from transformers import (FalconConfig, FalconForCausalLM, Llama4ForCausalLM, Llama4TextConfig, PhimoeConfig,
                              PhimoeForCausalLM)

    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    llama4 = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        moe_layers=[0], pad_token_id=0, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    phimoe = PhimoeForCausalLM(PhimoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))
    for model in (llama4, phimoe):
        fresh = copy.deepcopy(model).eval()
        adapters, _ = setup_unified_lora(model.train(), target_modules="all-linear", print_fn=None)
        router = next(m for n, m in model.named_modules() if n.endswith(".router"))
        assert type(router).__name__ in ("Llama4Router", "PhimoeTopKRouter") and router.training  # left as it was
        assert "model.layers.0.self_attn.q_proj" in adapters and not any(n.endswith("router") for n in adapters)
        _random_b(model)
        model(input_ids=ids).logits.square().mean().backward()
        assert adapters["model.layers.0.self_attn.q_proj"].lora_B[0].grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits
            assert (out - fresh(input_ids=ids).logits).abs().max() > 1e-3  # the delta is in the output
            merge_adapters(model)
            torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-4, atol=1e-5)
        named = r"'model.layers.0.(feed_forward|mlp).router' \((Llama4Router|PhimoeTopKRouter)\)"
        with pytest.raises(ValueError, match=named):
            setup_unified_lora(fresh, target_modules=["q_proj", "router"], print_fn=None)
    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4))
    adapters, _ = setup_unified_lora(falcon, target_modules="all-linear", print_fn=None)
    assert {n.rsplit(".", 1)[-1] for n in adapters} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
