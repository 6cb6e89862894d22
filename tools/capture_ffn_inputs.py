"""Capture what a trained model's FFNs see, for the FFN benchmark's ``captured`` input generator.

    python tools/capture_ffn_inputs.py --load CKPT --data-path P_text_document <the run's model flags> \
        --capture-out ffn_inputs.pt [--capture-layers 1 4] [--capture-tokens 16384]

Builds the model of the package's own loop (megatron_sparse24.training.loop; the same flags as the
run that saved ``--load``, one GPU or CPU, no tensor or pipeline parallelism), loads the checkpoint's
weights, runs forward passes over the validation split and records, for each layer of
``--capture-layers`` (1-based), the FFN's input tokens X [T, D] (sequences one after another, tokens
in order), fc1's weight W1 [F, D] and bias b1 [F], and fc2's weight W2 [D, F], in bf16. Also prints
per layer how sparse its activations are (share of Y1 = X W1^T + b1 > 0, its spread over features,
and how often a token's positive features are also positive in the next token).

``benchmarks/bench_ffn.py --inputs captured:FILE[@LAYER]`` builds FFN inputs of any benchmark shape
from the file (``bench_ffn.captured_inputs``). The file holds only tensors and plain containers, so
it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sparse24.cpu_support import cuda_literals_to_cpu  # noqa: E402
from megatron_sparse24.training import loop  # noqa: E402
from megatron_sparse24.training.arguments import build_parser, validate_args  # noqa: E402
from megatron_sparse24.training.checkpointing import load_checkpoint  # noqa: E402
from megatron_sparse24.training.data import build_datasets, build_tokenizer, data_iterator  # noqa: E402


def _capture_args(argv):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--capture-out", required=True, help="file to write")
    ap.add_argument("--capture-layers", type=int, nargs="+", default=[1], help="1-based layer numbers")
    ap.add_argument("--capture-tokens", type=int, default=16384, help="tokens to record per layer")
    return ap.parse_known_args(argv)


def activation_stats(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> dict:
    """How sparse relu(X W1^T + b1) is: the share of positive entries, the spread of the per-feature
    share (10th / 50th / 90th percentile) and P(positive in token t+1 | positive in token t)."""
    pos = (x.float() @ w1.float().t() + b1.float()) > 0
    per_feature = pos.float().mean(0)
    q = torch.quantile(per_feature, torch.tensor([0.1, 0.5, 0.9]))
    both = (pos[1:] & pos[:-1]).float().sum()
    return {"density": float(pos.float().mean()), "feature_density_p10_p50_p90": [round(float(v), 4) for v in q],
            "next_token_positive_given_positive": float(both / pos[:-1].float().sum().clamp(min=1))}


def main(argv=None):
    capture, rest = _capture_args(sys.argv[1:] if argv is None else argv)
    args = validate_args(build_parser().parse_args(rest), 1)
    if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
        sys.exit("capture_ffn_inputs.py runs the model whole: pass --tensor-model-parallel-size 1 "
                 "--pipeline-model-parallel-size 1 (a checkpoint saved with other sizes loads resharded)")
    if not args.load:
        sys.exit("capture_ffn_inputs.py needs --load CKPT (the trained model to capture from)")
    loop.initialize(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    args.tokenizer = tokenizer
    model = loop.build_model(args, loop.transformer_config(args))
    iteration, _ = load_checkpoint(args.load, model, None, None, load_optim=False, load_rng=False)
    if iteration == 0:
        sys.exit(f"--load {args.load}: no checkpoint there")
    layers = unwrap_model(model).decoder.layers
    bad = [n for n in capture.capture_layers if not 1 <= n <= len(layers)]
    if bad:
        sys.exit(f"--capture-layers {bad}: the model has layers 1..{len(layers)}")
    records = {n: [] for n in capture.capture_layers}

    def hook(n):
        def record(module, inputs):
            hidden = inputs[0]  # [s, b, h]
            records[n].append(hidden.detach().transpose(0, 1).reshape(-1, hidden.shape[-1]).to("cpu", torch.bfloat16))
        return record

    handles = [layers[n - 1].mlp.register_forward_pre_hook(hook(n)) for n in capture.capture_layers]
    _, valid_ds, _ = build_datasets(args, tokenizer)
    batches = data_iterator(valid_ds, 0, args.micro_batch_size, 0, 1, 0)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    model.eval()
    with torch.no_grad(), cuda_literals_to_cpu():
        while sum(r.shape[0] for r in records[capture.capture_layers[0]]) < capture.capture_tokens:
            batch = {k: v.to(device) for k, v in next(batches).items()}
            model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    for h in handles:
        h.remove()
    out = {"iteration": iteration, "load": str(args.load), "hidden_size": args.hidden_size,
           "ffn_hidden_size": args.ffn_hidden_size, "layers": {}}
    for n in capture.capture_layers:
        mlp = layers[n - 1].mlp
        w1 = mlp.linear_fc1.weight.detach().to("cpu", torch.bfloat16)
        b1 = mlp.linear_fc1.bias
        b1 = torch.zeros(w1.shape[0], dtype=torch.bfloat16) if b1 is None else b1.detach().to("cpu", torch.bfloat16)
        x = torch.cat(records[n])[: capture.capture_tokens].contiguous()
        out["layers"][n] = {"x": x, "w1": w1.contiguous(), "b1": b1.contiguous(),
                            "w2": mlp.linear_fc2.weight.detach().to("cpu", torch.bfloat16).contiguous()}
        print(f"layer {n}: X {tuple(x.shape)}, W1 {tuple(w1.shape)}; {activation_stats(x, w1, b1)}", flush=True)
    torch.save(out, capture.capture_out)
    print(f"wrote {capture.capture_out} (iteration {iteration} of {args.load})", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
