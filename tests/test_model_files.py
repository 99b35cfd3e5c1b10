"""The writer's files read back: every dtype variant, single vs split, both attn_output_a layouts, MTP, and an
independent reader (the `gguf` package) agreeing with ours on keys, tensor table and dequantized values."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import MICRO

from llama_dsv4.model.gguf_format import GGMLType
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.tensors import model_tensors
from llama_dsv4.model.writer import Init, random_values, tensor_type, write_model

# worst-case absolute error of a stored value per type, relative to the row's max |x| (block scales)
TYPE_ERROR = {GGMLType.F32: 0.0, GGMLType.F16: 1e-3, GGMLType.Q8_0: 1 / 127, GGMLType.Q5_K: 0.08, GGMLType.I32: 0.0}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8xq5"])
def test_variant_reads_back(tiny_paths: dict[str, str], dtype: str) -> None:
    with load_model(tiny_paths[dtype]) as m:
        p = m.params
        assert p == DSV4Params(n_vocab=512)  # the tiny model, docs/architecture.md §15.1
        assert len(m.tensors) == 178  # docs/architecture.md §15.2
        w = m.weights()
        assert w.zero_copy and len(w) == 178
        for spec in model_tensors(p):
            t = m.tensors[spec.name]
            assert t.type == tensor_type(spec, dtype), spec.name
            want = random_values(spec, p, 0, Init())
            got = w.numpy(spec.name)
            assert got.shape == want.shape, spec.name
            if t.type in (GGMLType.F32, GGMLType.I32):
                np.testing.assert_array_equal(got, want, err_msg=spec.name)
            elif t.type == GGMLType.F16:
                np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=spec.name)
            else:
                scale = np.abs(want).max(axis=-1, keepdims=True)
                assert (np.abs(got - want) <= TYPE_ERROR[t.type] * scale + 1e-7).all(), spec.name


def test_q8xq5_types_are_the_release_recipe(tiny_paths: dict[str, str]) -> None:
    with load_model(tiny_paths["q8xq5"]) as m:
        types = {n: GGMLType(t.type).name for n, t in m.tensors.items()}
    assert types["blk.3.ffn_gate_exps.weight"] == "Q5_K" and types["blk.3.ffn_down_exps.weight"] == "Q5_K"
    for n in (
        "blk.0.attn_q_b.weight",
        "blk.0.attn_output_a.weight",
        "blk.1.ffn_up_shexp.weight",
        "blk.2.ffn_gate_inp.weight",
        "output.weight",
    ):
        assert types[n] == "Q8_0", n
    assert types["token_embd.weight"] == "F16" and types["blk.1.indexer.attn_q_b.weight"] == "F16"
    assert types["blk.0.ffn_gate_tid2eid.weight"] == "I32" and types["blk.4.exp_probs_b.bias"] == "F32"


def test_weights_are_zero_copy_views_of_the_file(tiny_paths: dict[str, str]) -> None:
    with load_model(tiny_paths["q8xq5"]) as m:
        w = m.weights()
        for name in ("token_embd.weight", "blk.5.ffn_down_exps.weight"):
            t = m.tensors[name]
            type_id, _, nbytes, addr = w.info(name)
            assert (type_id, nbytes) == (t.type, t.nbytes)
            raw = np.frombuffer(m._maps[0], np.uint8, t.nbytes, t.offset)
            assert addr == raw.__array_interface__["data"][0]  # the ggml tensor's data IS the mapping
            del raw


def _mapped_paths() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def test_index_tensors_are_private_copies_of_what_was_validated(tiny_paths: dict[str, str]) -> None:
    """tid2eid is the one tensor the graph uses as indices (expert ids): its ggml tensor holds the bytes the loader
    checked, in memory of its own, while every other weight is the mapping."""
    with load_model(tiny_paths["q8xq5"]) as m:
        w = m.weights()
        for name in m.tensors:
            private = name.endswith("ffn_gate_tid2eid.weight")
            assert w.mapped(name) is not private, name
            if private:
                addr, _ = w.host_range(name)
                base = np.frombuffer(m._maps[0], np.uint8, 1).__array_interface__["data"][0]
                assert not base <= addr < base + len(m._maps[0])
                np.testing.assert_array_equal(w.numpy(name), m.array(name))


@pytest.mark.parametrize("dtype", ["f32", "q8xq5"])
def test_use_mmap_false_reads_the_weights_into_memory(tiny_paths: dict[str, str], model_dir: str, dtype: str) -> None:
    """use_mmap=False: the same bytes as the mapping, in memory the process owns; nothing maps the file."""
    split = write_model(os.path.join(model_dir, f"tiny-nommap-{dtype}.gguf"), dtype=dtype, n_shards=2)
    for path in (tiny_paths[dtype], split[0]):
        with load_model(path, use_mmap=False) as read:
            wr = read.weights()
            assert not read.use_mmap and not wr.zero_copy
            assert not set(read.paths) & _mapped_paths()  # the headers were parsed from mappings since closed
            with load_model(path) as mapped:
                wm = mapped.weights()
                assert mapped.use_mmap and wr.device == wm.device
                for name in wm.names():
                    assert not wr.mapped(name) and wr.host_range(name) is not None
                    np.testing.assert_array_equal(wr.raw(name), wm.raw(name), err_msg=name)
                np.testing.assert_array_equal(read.array("output.weight"), mapped.array("output.weight"))


def test_split_equals_single(model_dir: str, tiny_paths: dict[str, str]) -> None:
    paths = write_model(os.path.join(model_dir, "tiny-split.gguf"), dtype="q8xq5", n_shards=3)
    assert [os.path.basename(p) for p in paths] == [f"tiny-split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    with load_model(tiny_paths["q8xq5"]) as single, load_model(paths[2]) as split:  # any shard opens the set
        assert split.paths == paths
        assert split.params == single.params and split.vocab.tokens == single.vocab.tokens
        assert {t.shard for t in split.tensors.values()} == {0, 1, 2}
        ws, wp = single.weights(), split.weights()
        assert sorted(ws.names()) == sorted(wp.names())
        for name in ws.names():
            np.testing.assert_array_equal(ws.raw(name), wp.raw(name), err_msg=name)


def test_attn_output_a_3d_layout_loads_with_the_same_bytes(model_dir: str, micro_path: str) -> None:
    p3 = write_model(os.path.join(model_dir, "micro-o3d.gguf"), MICRO, attn_output_a_3d=True)[0]
    with load_model(p3) as m3, load_model(micro_path) as m2:
        name = "blk.0.attn_output_a.weight"
        assert m3.tensors[name].ne == (64, 16, 2) and m2.tensors[name].ne == (64, 32)
        np.testing.assert_array_equal(m3.weights().raw(name), m2.weights().raw(name))


def test_mtp_layer_is_loaded_and_counted(model_dir: str) -> None:
    p = MICRO.with_(n_nextn=1, compress_ratios=(0, 4, 128, 4, 128, 0, 0), swiglu_clamp_exp=1.0, swiglu_clamp_shexp=1.5)
    path = write_model(os.path.join(model_dir, "micro-mtp.gguf"), p)[0]
    with load_model(path) as m:
        assert (m.params.n_layer, m.params.n_nextn, m.params.block_count) == (6, 1, 7)
        assert "blk.6.nextn.eh_proj.weight" in m.tensors and len(m.tensors) == 178 + 27


def test_declared_nextn_without_mtp_tensors_means_no_mtp(model_dir: str) -> None:
    # upstream converters write nextn_predict_layers = 1 and no MTP tensors: llama.cpp then uses every block
    path = write_model(os.path.join(model_dir, "micro-declared.gguf"), MICRO.with_(declared_nextn=1))[0]
    with load_model(path) as m:
        assert (m.params.n_layer, m.params.n_nextn) == (6, 0)
        assert m.metadata["deepseek4.nextn_predict_layers"] == 1


def test_params_and_vocab_round_trip(micro_path: str) -> None:
    with load_model(micro_path) as m:
        assert m.params == MICRO.with_(n_vocab=512)
        assert m.params.clamp_shexp(3) == 1.5 and m.params.clamp_exp(3) == 1.0
        v = m.vocab
        assert v.n_tokens == 512 and v.pre == "deepseek-v3" and (v.bos_id, v.eos_id) == (0, 1)
        assert v.id_of("<｜Assistant｜>") is not None and not v.add_bos
        assert "<｜Assistant｜>" in m.chat_template


def test_swiglu_shexp_falls_back_when_absent(model_dir: str) -> None:
    path = write_model(os.path.join(model_dir, "micro-noshexp.gguf"), MICRO.with_(swiglu_clamp_shexp=None))[0]
    with load_model(path) as m:
        assert "deepseek4.swiglu_clamp_shexp" not in m.metadata
        assert m.params.swiglu_clamp_shexp is None and m.params.clamp_shexp(2) == 1.0


def test_real_vocabulary(model_dir: str) -> None:
    path = write_model(os.path.join(model_dir, "micro-real.gguf"), MICRO, vocab="real", dtype="f16")[0]
    with load_model(path) as m:
        v = m.vocab
        assert v.n_tokens == 129280 == m.params.n_vocab and len(v.merges) == 127741
        assert v.tokens[:3] == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")
        ids = {t: v.id_of(t) for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜")}
        assert ids == {
            "<｜User｜>": 128803,
            "<｜Assistant｜>": 128804,
            "<think>": 128821,
            "</think>": 128822,
            "｜DSML｜": 128825,
        }
        assert v.token_types[128803] == 3 and v.token_types[128821] == 4  # control / user-defined
        assert m.tensors["token_embd.weight"].ne == (64, 129280)


def test_no_vocab_file(model_dir: str) -> None:
    path = write_model(os.path.join(model_dir, "micro-novocab.gguf"), MICRO, vocab="none")[0]
    with load_model(path) as m:
        assert m.vocab is None and m.params.n_vocab == 512


def test_independent_reader_agrees(tiny_paths: dict[str, str]) -> None:
    """The `gguf` package (llama.cpp's own Python reader) parses our file identically."""
    gguf = pytest.importorskip("gguf")
    path = tiny_paths["q8xq5"]
    r = gguf.GGUFReader(path)
    with load_model(path) as m:
        assert r.fields["general.architecture"].contents() == "deepseek4"
        assert r.fields["deepseek4.attention.compress_ratios"].contents() == [0, 4, 128, 4, 128, 0]
        assert r.fields["deepseek4.expert_gating_func"].contents() == 4
        assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 512
        assert len(r.tensors) == len(m.tensors)
        w = m.weights()
        for t in r.tensors:
            ours = m.tensors[t.name]
            assert tuple(int(x) for x in t.shape) == ours.ne and int(t.tensor_type) == ours.type
            assert int(t.data_offset) == ours.offset
            data = np.asarray(t.data)
            ref = data if ours.type == GGMLType.I32 else gguf.quants.dequantize(data, t.tensor_type)
            np.testing.assert_array_equal(ref.reshape(-1), w.numpy(t.name).reshape(-1), err_msg=t.name)


def test_the_tensor_table_and_the_engine_name_the_same_destinations() -> None:
    """model/tensors.py gives each tensor the field the engine binds it to (engine/graph.pxd), and engine/memory.py
    each state tensor's field: both sides name the same set, and the layer kinds have the same values."""
    from llama_dsv4.engine.context import binding_fields

    from llama_dsv4.engine import graph
    from llama_dsv4.engine.memory import state_tensors
    from llama_dsv4.model.params import LayerKind
    from llama_dsv4.model.tensors import global_tensors, layer_tensors, optional_nextn_tensors

    layer_fields, global_fields, state_fields, mtp_fields = binding_fields()
    p = DSV4Params(compress_ratios=(0, 4, 128, 4, 128, 0), hash_layer_count=1, n_layer=5, n_nextn=1)
    main_layers = [s for il in range(p.n_layer) for s in layer_tensors(p, il)]
    assert {s.dest for s in main_layers} == layer_fields  # the hash layer brings tid2eid, the others probs_b
    assert {s.dest for s in global_tensors(p)} == global_fields
    assert {t.name for t in state_tensors(p, 256, 32, "f16")} == state_fields
    mtp = layer_tensors(p, p.n_layer) + optional_nextn_tensors(p, p.n_layer)  # the MTP block: a layer + its own
    mtp_dests = {s.dest for s in mtp}
    assert mtp_fields <= mtp_dests <= layer_fields | mtp_fields and "ffn.probs_b" in mtp_dests
    assert [(t.layer, t.name) for t in state_tensors(p, 256, 32, "f16", mtp=True)][-1] == (p.n_layer, "raw")
    assert {k.name: int(k) for k in LayerKind} == {k.name: int(k) for k in graph.LayerKind}
