"""Config loading: every shipped config loads; every bad key, type and value fails with the dotted key."""
from pathlib import Path

import pytest
import torch

import pretrain
from errors import ConfigError
from train.config import load_config, save_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_all_configs_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "moe_xs", "moe_small", "moe_medium", "transformer_xs", "transformer_small",
            "transformer_medium"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.num_layers > 0 and cfg.data.seq_length > 0


@pytest.mark.parametrize("size,layers,hidden,heads", [("xs", 6, 512, 8), ("small", 12, 768, 12),
                                                      ("medium", 24, 1024, 16)])
def test_paper_recipe(size, layers, hidden, heads):
    for kind in ("moe", "transformer"):
        cfg = load_config(f"configs/{kind}_{size}.yaml")
        m, t = cfg.model, cfg.train
        assert (m.num_layers, m.hidden_size, m.num_heads, m.ffn) == (layers, hidden, heads, 4 * hidden)
        assert (cfg.data.seq_length, cfg.data.vocab_divisible_by, t.global_batch_size) == (1024, 1024, 512)
        assert (t.lr, t.min_lr, t.warmup_frac, t.clip_grad, m.init_std) == (6e-4, 6e-5, 0.01, 1.0, 0.01)
        if kind == "moe":
            assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.router.aux_loss_weight) == (64, 1, 0.1)
        else:
            assert cfg.moe.num_experts == 0


def test_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-3", "moe.backend=reference", "train.compile=true",
                                            "data.paths=[a,b]"])
    assert cfg.train.lr == 1e-3 and cfg.train.compile is True and cfg.data.paths == ["a", "b"]


@pytest.mark.parametrize("overrides,key,fix", [
    (["train.lrr=1"], "train.lrr", "did you mean train.lr"),
    (["bogus.x=1"], "bogus", "known keys"),
    (["train.lr=fast"], "train.lr", "type float"),
    (["train.steps=1.5"], "train.steps", "type int"),
    (["model.num_heads=3"], "model.num_heads", "must divide model.hidden_size"),
    (["moe.top_k=5"], "moe.top_k", "between 1 and moe.num_experts"),
    (["train.micro_batch_size=3"], "train.global_batch_size", "multiple of 3"),
    (["moe.backend=magic"], "moe.backend", "use one of"),
    (["train"], "train", "dotted.key=value"),
    (["moe.router.typ=softmax"], "moe.router.typ", "did you mean moe.router.type"),
    (["moe.capacity.factor=-1"], "moe.capacity.factor", "use 0 (dynamic) or > 0"),
    (["moe.router=1"], "moe.router", "is a section"),
    (["train.cuda_graphs=true", "train.compile=false"], "train.cuda_graphs", "set train.compile=true"),
    (["train.cuda_graphs=true", "train.compile=true"], "train.cuda_graphs", "use moe.backend=scatter"),
    (["train.cuda_graphs=true", "train.compile=true", "moe.backend=padded", "moe.capacity.factor=0"],
     "train.cuda_graphs", "padded with a capacity factor > 0"),
])
def test_bad_config_names_key_and_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert err.value.key == key and fix in str(err.value)


@pytest.mark.parametrize("backend", ["scatter", "grouped", "blocksparse", "padded"])
def test_cuda_graphs_load_with_static_shape_backends(backend):
    """The backends whose shapes are static (padded with a capacity factor: tiny's is 1.0) take train.cuda_graphs;
    a dense model takes it whatever moe.backend says."""
    cfg = load_config("configs/tiny.yaml", ["train.cuda_graphs=true", "train.compile=true", f"moe.backend={backend}",
                                            "moe.capacity.factor=1.0"])
    assert cfg.train.cuda_graphs and cfg.moe.backend == backend
    assert load_config("configs/tiny.yaml", ["train.cuda_graphs=true", "train.compile=true",
                                             "moe.num_experts=0"]).train.cuda_graphs


@pytest.mark.parametrize("old,new", [("capacity_factor", "capacity.factor"), ("min_capacity", "capacity.min"),
                                     ("router_type", "router.type"), ("aux_loss_weight", "router.aux_loss_weight"),
                                     ("block_size", "kernels.block_size"), ("rectify_fill", "capacity.rectify_fill")])
def test_renamed_moe_keys_are_refused_with_the_new_spelling(old, new):
    """The flat moe.* keys of earlier versions, on the command line and in a YAML file."""
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [f"moe.{old}=1"])
    assert err.value.key == f"moe.{old}" and f"write moe.{new}=1" in str(err.value)


def test_renamed_key_in_yaml(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("moe:\n  num_experts: 4\n  capacity_factor: 1.25\n")
    with pytest.raises(ConfigError, match="moe.capacity_factor was renamed: write moe.capacity.factor=1.25"):
        load_config(path)


def test_nested_overrides():
    cfg = load_config("configs/tiny.yaml", ["moe.capacity.factor=1.25", "moe.router.type=softmax",
                                            "moe.kernels.block_size=64"])
    assert (cfg.moe.capacity.factor, cfg.moe.router.type, cfg.moe.kernels.block_size) == (1.25, "softmax", 64)


def test_world_size_checks():
    with pytest.raises(ConfigError, match="divisible by train.micro_batch_size x data-parallel size"):
        load_config("configs/tiny.yaml", ["train.global_batch_size=16"], world_size=2)
    with pytest.raises(ConfigError, match="must divide the world size"):
        load_config("configs/tiny.yaml", ["parallel.tensor=2"], world_size=3)


def test_pretrain_exits_nonzero_before_work(tmp_path, capsys):
    code = pretrain.main(["--config", "configs/tiny.yaml", "moe.top_k=9", f"logging.run_dir={tmp_path}/run"])
    assert code == 2
    assert "moe.top_k" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_round_trips(tmp_path):
    cfg = load_config("configs/moe_xs.yaml", ["train.lr=1e-4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("overrides,key,words", [
    (["train.beta2=1.0"], "train.beta2", "betas lie in [0, 1)"),
    (["train.beta1=-0.1"], "train.beta1", "betas lie in [0, 1)"),
    (["train.lr=.nan"], "train.lr", "finite number"),
    (["train.clip_grad=inf"], "train.clip_grad", "finite number"),
    (["train.adam_eps=0"], "train.adam_eps", "out of range"),
    (["model.num_layers=1", "moe.layers=3"], "moe.layers", "names blocks [3] but the model has 1"),
    (["moe.layers=' , '"], "moe.layers", "lists no block"),
    (["moe.kernels.block_size=8"], "moe.kernels.block_size", "at least 16"),
    (["train.lr=[1"], "train.lr", "not valid YAML"),
])
def test_more_bad_values_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: [128\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+, column \d+"):
        load_config(path)


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a GPU")


@pytest.mark.parametrize("overrides, words", [
    (["logging.run_dir=/proc/nope/run"], "cannot be written"),
    (["data.tokenizer=TOKENIZER_OTHER"], "does not match the data"),
    (["data.paths=[nowhere/data]"], "data.paths names nowhere/data"),
    (["data.tokenizer=nowhere.model"], "data.tokenizer"),
    pytest.param(["train.device=cuda"], "no CUDA device is visible", marks=CPU_ONLY),
    pytest.param(["moe.backend=scatter"], "Triton kernels need a GPU", marks=CPU_ONLY),
])
def test_start_up_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch, overrides, words):
    """Errors that only show once the data, the tokenizer or the device is looked at: exit 2, one line."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "TOKENIZER_OTHER" in overrides[0]:  # a tokenizer other than the one the data was made with
        from data.tokenizer import train_sentencepiece
        other = train_sentencepiece([f"the quick brown fox {i} jumps" for i in range(300)], str(tmp_path / "o.model"),
                                    vocab_size=320, num_threads=1)
        overrides = [f"data.tokenizer={other.info.path}"]
    code = pretrain.main(["--config", "configs/tiny.yaml", f"logging.run_dir={tmp_path}/run", *overrides,
                          "checkpoint.save=false", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_triton_interpreter_refuses_bf16(monkeypatch):
    from train.plan import check_device
    cfg = load_config("configs/tiny.yaml", ["moe.backend=blocksparse", "train.dtype=bf16"])
    with pytest.raises(ConfigError, match="computes wrongly"):
        check_device(cfg, "cpu", interpreted=True)
    check_device(cfg, "cuda", interpreted=False)  # fine on a GPU


BLEND = (["a_text_document", "b/c_text_document"], [0.7, 0.3])


@pytest.mark.parametrize("spelling", [
    ["data.paths=0.7 a_text_document 0.3 b/c_text_document"],  # Megatron's blend string, as an override
    ['data.paths="0.7 a_text_document 0.3 b/c_text_document"'],  # quoted inside (YAML reads the quotes)
    ["data.paths=[0.7, a_text_document, 0.3, b/c_text_document]"],  # a YAML list: numbers become strings
    ["data.paths=0.7,a_text_document,0.3,b/c_text_document"],  # commas
    ["data.paths=['0.7 a_text_document', '0.3 b/c_text_document']"],  # pairs as list items
    "yaml-string", "yaml-list",
])
def test_blend_string_and_list_give_the_same_blend(tmp_path, spelling):
    if isinstance(spelling, str):  # in a config file
        value = ('"0.7 a_text_document 0.3 b/c_text_document"' if spelling == "yaml-string"
                 else "[0.7, a_text_document, 0.3, b/c_text_document]")
        path = tmp_path / "c.yaml"
        tiny = Path("configs/tiny.yaml").read_text()
        assert "  paths: [corpus/shakespeare_text_document]\n" in tiny
        path.write_text(tiny.replace("  paths: [corpus/shakespeare_text_document]\n", f"  paths: {value}\n"))
        cfg = load_config(path)
    else:
        cfg = load_config("configs/tiny.yaml", spelling)
    assert cfg.data.blend() == BLEND


def test_prefixes_without_weights_are_a_blend_without_weights():
    assert load_config("configs/tiny.yaml", ["data.paths=a b c"]).data.blend() == (["a", "b", "c"], None)
    assert load_config("configs/tiny.yaml", ["data.paths=[a]"]).data.blend() == (["a"], None)
    # weights are shares (normalised later), any scale; a weight of 0 leaves its dataset out
    assert load_config("configs/tiny.yaml", ["data.paths=70 a 30 b 0 c"]).data.blend() == (["a", "b"], [70, 30])


@pytest.mark.parametrize("value, words", [
    ("0.7 a 0.3", "3 entries, but a weighted blend alternates weight and prefix (an even count)"),
    ("0.7 a heavy b", "'heavy' stands where a weight belongs (before 'b')"),
    ("-0.7 a 0.3 b", "the weight -0.7 of a is not a finite non-negative number"),
    ("0.7 a inf b", "the weight inf of b is not a finite non-negative number"),
    ("0.5 0.5 a b", "'0.5' stands where a prefix belongs (after weight 0.5)"),
    ("a 0.3 b", "'0.3' looks like a weight, but the list does not start with one"),
    ("0 a 0 b", "every weight is zero"),
    ("''", "is empty"),
])
def test_malformed_blend_is_one_error_naming_the_fix(value, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [f"data.paths={value}"])
    message = str(err.value)
    assert err.value.key == "data.paths" and words in message and len(message.splitlines()) == 1, message
    if "empty" not in words and "zero" not in words:
        assert "0.7 corpus_a_text_document 0.3 corpus_b_text_document" in message or "shares" in message


def test_gpt2_bpe_needs_its_merge_file():
    cfg = load_config("configs/tiny.yaml", ["data.tokenizer_type=GPT2BPETokenizer", "data.tokenizer=v.json",
                                            "data.merge_file=m.txt"])
    assert cfg.data.merge_file == "m.txt"
    for overrides in (["data.tokenizer_type=gpt2bpe"], ["data.merge_file=m.txt"]):
        with pytest.raises(ConfigError, match="data.merge_file .*needs its merges.txt"):
            load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ConfigError, match="data.tokenizer_type is 'BertWordPieceCase'; use one of"):
        load_config("configs/tiny.yaml", ["data.tokenizer_type=BertWordPieceCase"])
