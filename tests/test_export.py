"""GGUF export: files llama.cpp loads and runs like the HF model, and one error per bad input."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest

from lowrank.cli import main
from lowrank.errors import UserError
from lowrank.export.gguf import export_gguf
from lowrank.export.tensors import gguf_tensor_name, permute_qk_for_llama_cpp, unpermute_qk_from_llama_cpp
from lowrank.export.verify import verify_gguf
from lowrank.templates import BUILTIN_TEMPLATES


def test_permutation_interleaves_rotary_halves():
    # One head of dim 4: HF rows [a0 a1 | b0 b1] pair (a_i, b_i); llama.cpp pairs adjacent rows.
    w = np.arange(8).reshape(8, 1)
    assert permute_qk_for_llama_cpp(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_qk_for_llama_cpp(w, 4, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # k: kv heads win
    assert (unpermute_qk_from_llama_cpp(permute_qk_for_llama_cpp(w, 2), 2) == w).all()
    assert gguf_tensor_name("model.layers.7.self_attn.k_proj.bias") == "blk.7.attn_k.bias"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"


Case = namedtuple("Case", "kwargs types template")
CASES = {
    "llama-bpe-gqa-untied": Case(dict(tokenizer="bpe"), ["f32", "q8_0"], None),
    "mistral-spm-tied-mha": Case(dict(tokenizer="spm", arch="mistral", tie_word_embeddings=True, num_kv_heads=4),
                                 ["f16", "q4_k_m"], "llama2"),
    # Qwen2: NEOX rope (no q/k permutation), q/k/v biases, the Qwen2 pre-tokenizer, ChatML, no BOS.
    "qwen2-bpe-tied": Case(dict(tokenizer="bpe", arch="qwen2", tie_word_embeddings=True), ["f32", "q5_0"], None),
    # Qwen3: no biases, an RMSNorm over each head's q and k (random here, so a mis-wired one shows), and a
    # head_dim twice hidden / heads (key_length / value_length in the GGUF).
    "qwen3-bpe-qknorm": Case(dict(tokenizer="bpe", arch="qwen3", random_norms=True), ["f32", "q8_0"], None),
    # Phi-3: q|k|v in one qkv_proj and gate|up in one gate_up_proj, written fused; Phi-4-mini's partial rope.
    "phi3-spm-fused": Case(dict(tokenizer="spm", arch="phi3", random_norms=True), ["f32", "q8_0"], "phi3"),
    "phi4mini-bpe-partial-rope": Case(dict(tokenizer="bpe", arch="phi3", partial_rotary=0.75,
                                           tie_word_embeddings=True), ["f16", "q4_k_m"], "phi3"),
    # Gemma 2: norms + 1, four per layer, soft-capped attention and logits, a 16-token window on every other
    # layer; Gemma 3: q/k norms, global and local ropes (6 layers: five sliding, one global). Gemma's tokenizer
    # and its own (gemma) template.
    "gemma2-spm-softcap-swa": Case(dict(tokenizer="spm", arch="gemma2", random_norms=True), ["f32", "q8_0"], None),
    "gemma3-spm-qknorm-swa": Case(dict(tokenizer="spm", arch="gemma3", random_norms=True, num_layers=6),
                                  ["f16", "q4_k_m"], None),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tiny_model_factory, tmp_path_factory):
    case = CASES[request.param]
    src = tiny_model_factory(**case.kwargs)
    work = tmp_path_factory.mktemp(request.param)
    template = BUILTIN_TEMPLATES[case.template] if case.template else None
    paths = export_gguf(src, work / "out", case.types, chat_template=template)
    return src, paths, template


def test_export_writes_one_file_per_type_and_no_temp_files(exported):
    src, paths, _ = exported
    assert [p.exists() for p in paths] == [True, True]
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]


def test_float_file_matches_transformers_logits_and_greedy(exported):
    src, paths, template = exported
    report = verify_gguf(paths[0], src, chat_template=template)
    assert report.tokenization_mismatches == []
    # Gemma's float files are held to 1e-2: llama.cpp rounds GELU activations to fp16 (export.verify).
    assert report.max_logit_diff < report.logit_tolerance <= (1e-2 if report.architecture.startswith("gemma") else 5e-3)
    assert report.greedy_identical_tokens == 32
    assert report.chat_template_checked and report.chat_template_problem is None
    assert report.passed, report.problems


def test_quantized_file_loads_and_reports_kl(exported):
    src, paths, template = exported
    report = verify_gguf(paths[1], src, reference_gguf=paths[0], chat_template=template)
    assert report.file_type in ("Q8_0", "Q4_K_M", "Q5_0")
    assert 0 <= report.kl_divergence < 0.05
    assert report.top1_agreement > 0.6
    assert report.perplexity == pytest.approx(report.perplexity_hf, rel=0.05)
    assert report.passed, report.problems


def test_gguf_tensors_are_permuted_hf_weights(tiny_bpe, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    path = export_gguf(tiny_bpe, tmp_path, ["f32"])[0]
    hf = load_file(str(tiny_bpe / "model.safetensors"))
    by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    q = np.asarray(by_name["blk.1.attn_q.weight"].data)
    assert np.array_equal(unpermute_qk_from_llama_cpp(q, 4), hf["model.layers.1.self_attn.q_proj.weight"])
    assert not np.array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_norms_are_written_plus_one_under_llama_cpp_names(tiny_model_factory, tmp_path, arch):
    import gguf
    from safetensors.numpy import load_file

    src = tiny_model_factory(tokenizer="spm", arch=arch, random_norms=True)
    path = export_gguf(src, tmp_path, ["f32"], name="m")[0]
    hf = load_file(str(src / "model.safetensors"))
    reader = gguf.GGUFReader(str(path))
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    # HF scales by (1 + w), llama.cpp by w: every norm is written + 1. Gemma's post_attention_layernorm follows
    # attention (llama.cpp's post_attention_norm); its pre_feedforward_layernorm is llama.cpp's ffn_norm.
    norms = {"model.norm.weight": "output_norm.weight",
             "model.layers.1.input_layernorm.weight": "blk.1.attn_norm.weight",
             "model.layers.1.post_attention_layernorm.weight": "blk.1.post_attention_norm.weight",
             "model.layers.1.pre_feedforward_layernorm.weight": "blk.1.ffn_norm.weight",
             "model.layers.1.post_feedforward_layernorm.weight": "blk.1.post_ffw_norm.weight"}
    if arch == "gemma3":
        norms.update({"model.layers.1.self_attn.q_norm.weight": "blk.1.attn_q_norm.weight",
                      "model.layers.1.self_attn.k_norm.weight": "blk.1.attn_k_norm.weight"})
    for hf_name, name in norms.items():
        np.testing.assert_allclose(got[name], hf[hf_name] + 1, rtol=0, atol=1e-7, err_msg=name)
    # q/k as they are (llama.cpp runs Gemma with NEOX rope); the embedding unscaled (llama.cpp multiplies by
    # sqrt(hidden) itself) and tied: no output.weight.
    assert np.array_equal(got["blk.1.attn_q.weight"], hf["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(got["token_embd.weight"], hf["model.embed_tokens.weight"]) and "output.weight" not in got
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields[f"{arch}.attention.sliding_window"] == 16 and fields[f"{arch}.attention.key_length"] == 32
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    turn = [tokens.index("<start_of_turn>"), tokens.index("<end_of_turn>")]
    assert [types[i] for i in turn] == [gguf.TokenType.CONTROL] * 2 and fields["tokenizer.ggml.eot_token_id"] == turn[1]
    if arch == "gemma2":
        assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"]) == (1.0, 0.5)
    else:
        assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
        assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0


def test_cli_export_prints_fit_and_writes_modelfile(tiny_bpe, tmp_path, capsys):
    rc = main(["export", str(tiny_bpe), "--type", "q8_0", "--out", str(tmp_path), "--fit", "4GiB", "--no-verify",
               "--name", "m"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Raspberry Pi 4 (4 GB): fits" in out and "4 GiB budget: fits" in out
    modelfile = (tmp_path / "m-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./m-q8_0.gguf") and 'PARAMETER stop "<|eot_id|>"' in modelfile


# ----------------------------------------------------------------------------- every type

# Max |logit - F32 logit| / max |F32 logit| and KL (nats) against the F32 file on held-out text, measured on
# the model below: f16 8.2e-4 / 2e-8, bf16 5.1e-3 / 1.2e-6, q8_0 1.8e-2 / 1.2e-5, q6_k 4.6e-2 / 9e-5,
# q5_k_m 7.1e-2 / 2.3e-4, q5_0 0.12 / 4.8e-4, q4_k_m 0.14 / 8.4e-4, q4_0 0.24 / 2e-3, q4_k_s 0.15 / 1e-3,
# iq4_xs 0.16 / 1.2e-3, q3_k_m 0.31 / 3.3e-3, q3_k_s 0.34 / 5.1e-3, q2_k 0.62 / 1.1e-2, q5_k_s 7.6e-2 / 2.7e-4,
# iq4_nl 0.16 / 1.2e-3, q3_k_l 0.27 / 3e-3. Bounds are ~3x that
# (the 3- and 2-bit types' logit bound less, as 3x would pass anything); a tensor in the wrong layout gives > 1.
TYPE_BOUNDS = {"f32": (1e-6, 1e-9), "f16": (3e-3, 1e-6), "bf16": (2e-2, 1e-5), "q8_0": (6e-2, 1e-4),
               "q6_k": (0.15, 5e-4), "q5_k_m": (0.25, 1e-3), "q5_0": (0.35, 2e-3), "q4_k_m": (0.45, 4e-3),
               "q4_0": (0.7, 1e-2), "q4_k_s": (0.45, 3e-3), "iq4_xs": (0.5, 4e-3), "q3_k_m": (0.8, 1e-2),
               "q3_k_s": (0.85, 1.5e-2), "q2_k": (0.95, 3.5e-2), "q5_k_s": (0.25, 1e-3), "iq4_nl": (0.5, 4e-3),
               "q3_k_l": (0.8, 1e-2)}
# What 2-D tensors are stored as: one ggml type for direct types; llama.cpp's mixes keep some in Q6_K.
# Q4_0 and Q5_0 keep the output projection at Q8_0, as llama.cpp keeps it above the file type.
TENSOR_TYPES = {"f32": {"F32"}, "f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0"}, "q5_0": {"Q5_0", "Q8_0"},
                "q4_0": {"Q4_0", "Q8_0"}, "q6_k": {"Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q4_k_m": {"Q4_K", "Q6_K"},
                "q4_k_s": {"Q4_K", "Q5_K", "Q6_K"}, "iq4_xs": {"IQ4_XS", "Q6_K"}, "q3_k_m": {"Q3_K", "Q4_K", "Q5_K", "Q6_K"},
                "q3_k_s": {"Q3_K", "Q6_K"}, "q2_k": {"Q2_K", "Q3_K", "Q6_K"}, "q5_k_s": {"Q5_K", "Q6_K"},
                "iq4_nl": {"IQ4_NL", "Q6_K"}, "q3_k_l": {"Q3_K", "Q5_K", "Q6_K"}}


@pytest.fixture(scope="module")
def typed(tiny_model_factory, tmp_path_factory):
    """A tiny LLaMA whose rows are multiples of 256 (K-quant blocks), its F32 and F16 files, F32 logits."""
    from transformers import AutoTokenizer

    from lowrank.export.llama import gguf_logits, load_llama
    from lowrank.export.verify import HELD_OUT_TEXT

    src = tiny_model_factory(tokenizer="bpe", hidden_size=256, intermediate_size=512, num_layers=1)
    out = tmp_path_factory.mktemp("types")
    f32, f16 = export_gguf(src, out, ["f32", "f16"], name="m")
    ids = AutoTokenizer.from_pretrained(str(src))(HELD_OUT_TEXT)["input_ids"]
    llm = load_llama(f32, n_threads=1)
    ref = gguf_logits(llm, ids)
    llm.close()
    return {"src": src, "out": out, "f32": f32, "f16": f16, "ids": ids, "ref": ref}


@pytest.mark.parametrize("name", list(TYPE_BOUNDS))
def test_every_type_is_written_and_runs_in_llama_cpp(typed, name):
    import gguf

    from lowrank.export.gguf import TYPES, write_llama_quantized
    from lowrank.export.llama import gguf_logits, load_llama
    from lowrank.export.verify import kl_and_top1

    gtype = TYPES[name]
    if name in ("f32", "f16"):
        path = typed[name]
    elif gtype.ggml is not None:
        (path,) = export_gguf(typed["src"], typed["out"], [name], name="m")
    else:  # K-quants: llama.cpp's quantizer from the F16 file, as export_gguf does
        path = write_llama_quantized(typed["f16"], gtype, typed["out"] / f"m-{name}.gguf", threads=1)
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["general.file_type"].contents()) == int(gguf.LlamaFileType[gtype.file_type])
    stored = {gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors if len(t.shape) > 1}
    assert stored == TENSOR_TYPES[name]
    del reader
    llm = load_llama(path, n_threads=1)
    got = gguf_logits(llm, typed["ids"])
    llm.close()
    ref = typed["ref"]
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    kl, _ = kl_and_top1(ref, got)
    max_rel, max_kl = TYPE_BOUNDS[name]
    assert rel <= max_rel and kl <= max_kl, (name, rel, kl)


# ----------------------------------------------------------------------------- from base + adapter

@pytest.fixture(scope="module")
def adapter(tiny_spm, tmp_path_factory):
    from test_lora_gguf import make_adapter  # B scaled 0.2, as the LoRA GGUF tests use

    return make_adapter(tiny_spm, tmp_path_factory.mktemp("adapter") / "adapter", seed=5)


def _tensors(path) -> dict:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_cli_export_base_with_adapter_merges_then_exports(tiny_spm, adapter, tmp_path, capsys):
    from lowrank.quantize.adapters import load_lora_adapter

    # (verify of a merged export runs in the --lora test below)
    rc = main(["export", str(tiny_spm), "--adapter", str(adapter), "--type", "f32", "--out", str(tmp_path),
               "--no-verify"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-f32.Modelfile", "adapter-f32.gguf"]  # no temp dir
    # Every adapted weight in the file is base + scaling * B @ A, in llama.cpp's q/k layout.
    from safetensors.numpy import load_file

    base = load_file(str(tiny_spm / "model.safetensors"))
    got = _tensors(tmp_path / "adapter-f32.gguf")
    for hf_name, module in load_lora_adapter(adapter).modules.items():
        want = base[hf_name] + module.delta().numpy()
        if "q_proj" in hf_name or "k_proj" in hf_name:
            want = permute_qk_for_llama_cpp(want, 4, 4 if "q_proj" in hf_name else 2)
        np.testing.assert_allclose(got[gguf_tensor_name(hf_name)], want, atol=1e-6)


def test_cli_export_lora_writes_base_adapter_and_merged_and_checks_them(tiny_spm, adapter, tmp_path, capsys):
    rc = main(["export", str(tiny_spm), "--adapter", str(adapter), "--lora", "--type", "f16", "--out", str(tmp_path),
               "--name", "m", "--chat-template", "vicuna"])
    out = capsys.readouterr().out
    assert rc == 0, out
    base = f"{tiny_spm.name}-f16"
    assert {p.name for p in tmp_path.glob("*.gguf")} == {"m-f16.gguf", f"{base}.gguf", "m-lora.gguf"}
    assert out.count("PASS") == 2
    assert f"LoRA m-lora.gguf on {base}.gguf: max relative diff from this file" in out and "(tolerance 5e-03)" in out
    modelfile = (tmp_path / "m-lora.Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{base}.gguf\nADAPTER ./m-lora.gguf\nTEMPLATE")


def test_cli_export_lora_only_writes_just_the_adapter_gguf(tiny_spm, adapter, tmp_path, capsys):
    from lowrank.export.lora import export_lora_gguf

    rc = main(["export", str(tiny_spm), "--adapter", str(adapter), "--lora-only", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["adapter-lora.gguf"]
    direct = _tensors(export_lora_gguf(adapter, tiny_spm, tmp_path / "direct.gguf"))
    written = _tensors(tmp_path / "o" / "adapter-lora.gguf")
    assert written.keys() == direct.keys() and all(np.array_equal(written[k], direct[k]) for k in direct)


# ----------------------------------------------------------------------------- bad input

def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    return err


def test_not_a_model_dir(tmp_path, capsys):
    err = _cli_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert err == f"lowrank export: error: {tmp_path}: not a Hugging Face model dir (no config.json)"


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    err = _cli_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "model_type 'gpt2' is not supported" in err and "llama, mistral, qwen2" in err


def _sliding_rope_scaled(config):
    config["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0)


# Gemma configs llama.cpp would run differently from transformers: each refused, naming the config.json field.
GEMMA_REFUSED = {
    "scalar-not-head-dim": ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 is not head_dim (32)"),
    "layer-types": ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]},
                    "layer_types: layer 0 is full_attention, which is not llama.cpp's gemma2 layout (every 2nd layer "
                    "global"),
    "no-attn-softcap": ("gemma2", {"attn_logit_softcapping": None}, "attn_logit_softcapping is None; llama.cpp's gemma2 "
                                                                     "always soft-caps"),
    "no-final-softcap": ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping is None"),
    "exact-gelu": ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'; llama.cpp's gemma2 computes GELU "
                                                           "with the tanh approximation"),
    "bidirectional": ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention is true"),
    "no-window": ("gemma3", {"sliding_window": None}, "sliding_window is None"),
    "gemma3-attn-softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0; llama.cpp's gemma3 "
                                                                         "does not soft-cap attention scores"),
    "gemma3-sliding-rope-scaled": ("gemma3", _sliding_rope_scaled, "the sliding layers' rope is scaled (linear)"),
    "gemma3-multimodal": ("gemma3", {"model_type": "gemma3"}, "model_type 'gemma3' is the multimodal Gemma 3 "
                                                              "(Gemma3ForConditionalGeneration)"),
}


@pytest.mark.parametrize("case", list(GEMMA_REFUSED))
def test_gemma_config_llama_cpp_would_run_differently_is_refused(tiny_model_factory, tmp_path, capsys, case):
    arch, change, message = GEMMA_REFUSED[case]
    src = tiny_model_factory(tokenizer="spm", arch=arch, **({"num_layers": 6} if arch == "gemma3" else {}))
    model = tmp_path / "model"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    change(config) if callable(change) else config.update(change)
    (model / "config.json").write_text(json.dumps(config))
    err = _cli_error(capsys, ["export", str(model), "--out", str(tmp_path / "o")])
    assert err.startswith(f"lowrank export: error: {model / 'config.json'}: ") and message in err, err
    assert not (tmp_path / "o").exists()


# The fields check_gemma reads, as the published config.json files give them (google/gemma-2-9b; the
# text_config of google/gemma-3-12b-it, in transformers 4.x's format; the 27B models' differences).
GEMMA2_9B = dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, head_dim=256,
                 query_pre_attn_scalar=256, sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
GEMMA3_12B = dict(model_type="gemma3_text", hidden_size=3840, num_hidden_layers=48, num_attention_heads=16, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6, rope_theta=1000000.0,
                  rope_local_base_freq=10000, rope_scaling={"factor": 8.0, "rope_type": "linear"},
                  attn_logit_softcapping=None, final_logit_softcapping=None)


def test_published_gemma_configs_pass_the_llama_cpp_checks():
    from lowrank.export.hparams import check_gemma

    check_gemma(GEMMA2_9B, "gemma-2-9b")
    check_gemma(GEMMA3_12B, "gemma-3-12b")
    # The 27B models, which llama.cpp scales by 1 / sqrt(hidden / heads): query_pre_attn_scalar 144 and 168.
    check_gemma({**GEMMA2_9B, "hidden_size": 4608, "num_attention_heads": 32, "num_hidden_layers": 46,
                 "query_pre_attn_scalar": 144}, "gemma-2-27b")
    check_gemma({**GEMMA3_12B, "hidden_size": 5376, "num_attention_heads": 32, "num_hidden_layers": 62,
                 "query_pre_attn_scalar": 168}, "gemma-3-27b")


def test_unknown_type(tiny_bpe, tmp_path, capsys):
    err = _cli_error(capsys, ["export", str(tiny_bpe), "--type", "f16,q3_x", "--out", str(tmp_path)])
    assert "unknown GGUF type 'q3_x'" in err
    assert not list(tmp_path.iterdir())


def test_no_disk_room_names_path_and_bytes(tiny_bpe, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    err = _cli_error(capsys, ["export", str(tiny_bpe), "--type", "f16", "--out", str(tmp_path), "--name", "m"])
    assert f"{tmp_path / 'm-f16.gguf'}: not enough disk space: needs " in err and "1000 free" in err
    assert not list(tmp_path.glob("*.gguf"))


def test_interrupted_export_leaves_no_file_under_final_name(tiny_bpe, tmp_path, monkeypatch):
    import lowrank.export.gguf as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "convert_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_bpe, tmp_path, ["f16"], name="m")
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_are_refused(tiny_bpe, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(tiny_bpe, src)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.norm.weight has NaN"):
        export_gguf(src, tmp_path / "out", ["f16"])


@pytest.fixture(scope="module")
def wider(tiny_model_factory):
    """Another base: the adapter's shapes do not fit it (built here, so its progress bars stay out of capsys)."""
    return tiny_model_factory(tokenizer="spm", hidden_size=96)


def test_adapter_for_another_base_is_one_line_error(wider, adapter, tmp_path, capsys):
    err = _cli_error(capsys, ["export", str(wider), "--adapter", str(adapter), "--out", str(tmp_path)])
    assert err.startswith(f"lowrank export: error: {adapter}") and "another base" in err
    assert list(tmp_path.iterdir()) == []  # neither a .gguf nor the temporary merge


def test_lora_only_adapter_for_another_base_is_one_line_error(wider, adapter, tmp_path, capsys):
    err = _cli_error(capsys, ["export", str(wider), "--adapter", str(adapter), "--lora-only", "--out", str(tmp_path)])
    assert err.startswith(f"lowrank export: error: {adapter}") and "another base" in err
    assert list(tmp_path.iterdir()) == []


def test_lora_without_adapter_is_one_line_error(tiny_spm, tmp_path, capsys):
    err = _cli_error(capsys, ["export", str(tiny_spm), "--lora", "--out", str(tmp_path)])
    assert err == "lowrank export: error: --lora: give the adapter(s) with --adapter DIR"


def _estimate(name: str, file_mib: float, ram_mib: float):
    from lowrank.export.fit import MiB, FitEstimate

    return FitEstimate(f"/x/{name}", int(file_mib * MiB), int((ram_mib - file_mib) * MiB), 0, 2048)


def test_fit_recommends_the_largest_file_each_machine_takes():
    from lowrank.export.fit import format_fit

    estimates = [_estimate("m-q8_0.gguf", 7000, 7500), _estimate("m-q4_k_m.gguf", 4000, 4500),
                 _estimate("m-q2_k.gguf", 2500, 3000)]
    lines = format_fit(estimates).splitlines()
    assert "  recommended for Raspberry Pi 4 (4 GB): m-q2_k.gguf" in lines  # 3 GiB left: only q2_k
    assert "  recommended for Raspberry Pi 4 (8 GB): m-q4_k_m.gguf" in lines  # 7 GiB: q8_0 needs 7500 MiB
    assert "  recommended for 8 GB laptop: m-q4_k_m.gguf" in lines  # 5 GiB left beside a desktop


def test_fit_says_when_a_machine_takes_none():
    from lowrank.export.fit import format_fit

    lines = format_fit([_estimate("m-q8_0.gguf", 7000, 7500)]).splitlines()
    assert "  recommended for Raspberry Pi 4 (4 GB): none fits; the smallest needs 4428 MiB more" in lines


def test_cli_fit_budget_too_small_for_every_file_names_the_closest(tiny_bpe, tmp_path, capsys):
    rc = main(["export", str(tiny_bpe), "--type", "q8_0,q4_0", "--out", str(tmp_path), "--fit", "100MiB",
               "--no-verify", "--name", "m"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Log lines and progress bars aside (a bar's cursor codes may lead the line), one error line.
    (line,) = [text[text.index("lowrank export: "):] for text in err.splitlines() if "lowrank export: " in text]
    assert rc == 2 and line.startswith("lowrank export: error: --fit: no file fits 0.0977 GiB at n_ctx=")
    assert ": the closest, m-q4_0.gguf, needs " in line and "MiB more" in line
