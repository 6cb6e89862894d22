"""pretrain_gpt_sparse.py's command line: Megatron-LM names/defaults, derived values, clear errors."""

import pytest

from megatron_sparse24.arguments import ffn_width_from_swiglu
from megatron_sparse24.training.arguments import build_parser, parse_args

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--squared-relu", "--mock-data",
        "--vocab-size", "256", "--distributed-backend", "gloo"]


def test_megatron_defaults():
    a = parse_args(BASE)
    assert (a.lr_decay_style, a.min_lr, a.weight_decay, a.clip_grad, a.split, a.log_interval, a.eval_interval,
            a.eval_iters, a.seed, a.init_method_std) == ("linear", 0.0, 0.01, 1.0, "969, 30, 1", 100, 1000, 100,
                                                          1234, 0.02)
    assert a.ffn_hidden_size == 256 and a.global_batch_size == 2 and a.max_position_embeddings == 64
    assert a.tokenizer_type == "NullTokenizer" and a.lr_decay_iters == 10
    assert (a.sparse24, a.activation_sparse_method, a.activation_dense_warmup_steps,
            a.activation_dense_feature_fraction, a.token_permutation, a.sparse24_backend) == (
        True, "naive", 1000, 0.05, True, "auto")


def test_derived_values():
    a = parse_args(BASE + ["--global-batch-size", "8", "--tensor-model-parallel-size", "2"], world_size=4)
    assert a.data_parallel_size == 2 and a.global_batch_size == 8
    a = parse_args(BASE + ["--ffn-hidden-size-from-swiglu", "2730"])
    assert a.ffn_hidden_size == ffn_width_from_swiglu(2730) == 4096
    assert ffn_width_from_swiglu(2730, tensor_parallel_size=8) == 4096  # 4095 -> multiple of 512
    a = parse_args(BASE + ["--no-sparse24", "--no-token-permutation", "--activation-sparse-method", "mvue"])
    assert not a.sparse24 and not a.token_permutation and a.activation_sparse_method == "mvue"
    assert a.forward_mask_in_backward and not parse_args(BASE + ["--no-forward-mask-in-backward"]).forward_mask_in_backward
    from megatron_sparse24.arguments import sparse24_config_from_args

    cfg = sparse24_config_from_args(parse_args(BASE + ["--no-forward-mask-in-backward"]))
    assert cfg.forward_mask_in_backward is False and cfg.token_permutation is True


@pytest.mark.parametrize("extra,match", [
    (["--swiglu"], "--swiglu conflicts with 2:4"),
    (["--ffn-hidden-size", "258"], "multiple of 4"),
    (["--micro-batch-size", "1", "--seq-length", "63"], "multiple of 4"),
    (["--data-path", "x"], "exactly one of --mock-data or --data-path"),
    (["--global-batch-size", "3"], "multiple of --micro-batch-size"),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--ffn-hidden-size", "256", "--ffn-hidden-size-from-swiglu", "100"], "not both"),
    (["--distributed-backend", "nccl"], "--distributed-backend gloo"),
    (["--bf16"], "need a GPU"),
    (["--use-distributed-optimizer"], "needs GPUs"),
    (["--lr-warmup-iters", "10"], "must be below --lr-decay-iters"),
])
def test_conflicts_name_the_fix(extra, match):
    argv = list(BASE)
    if "--distributed-backend" in extra:
        argv = argv[:-2]
    with pytest.raises(ValueError, match=match):
        parse_args(argv + extra)


def test_missing_required_and_squared_relu():
    with pytest.raises(ValueError, match="--lr is required"):
        parse_args([x for x in BASE if x not in ("--lr", "1e-3")])
    with pytest.raises(ValueError, match="needs --squared-relu"):
        parse_args([x for x in BASE if x != "--squared-relu"])
    parse_args([x for x in BASE if x != "--squared-relu"] + ["--no-sparse24"])  # dense GELU is fine


def test_unknown_flags_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(BASE + ["--use-flash-attn-v9"])
    assert "unrecognized arguments" in capsys.readouterr().err
