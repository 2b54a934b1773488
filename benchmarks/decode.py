"""Decode throughput of jaxkv vs transformers on the same weights and context.

  python benchmarks/decode.py --model smollm2-135m-instruct --context 2048,4096 --repeats 2
  python benchmarks/decode.py                      # random 4-layer Llama, E=256, context 2048
  python benchmarks/decode.py --layers 8 --hidden 512 --context 4096 --no-hf
  python benchmarks/decode.py --torch-threads 1     # on a busy CPU, OpenMP spinning can hurt torch

With --model (a registered name, a HF folder or a .gguf file) both libraries load that checkpoint
(transformers reads a GGUF file with `from_pretrained(folder, gguf_file=...)`, dequantised to
float32 like jaxkv) and the prompt is real English text (Python's bundled docs) of exactly
--context tokens. Without it, a random LlamaForCausalLM is built in transformers, saved and loaded
with `jaxkv.load_hf`. Both libraries are timed after a warm-up run (so jit compilation is
excluded), median of --repeats:
  generate  end to end, greedy, no EOS, exactly --new-tokens tokens (jaxkv.generate /
            model.generate(do_sample=False, use_cache=True))
  prefill   one forward over the prompt that fills the KV cache
  decode    the new_tokens - 1 greedy steps over that cache, on their own; decode tok/s is
            batch * (new_tokens - 1) / decode s (the prompt's prefill would otherwise dominate)
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

# `python benchmarks/decode.py` puts this folder first on sys.path, and its kernels.py would shadow
# the `kernels` package that transformers probes for (its import then fails on missing metadata).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 768
    vocab: int = 4096
    context: int = 2048  # prompt tokens
    new_tokens: int = 64
    batch: int = 1
    repeats: int = 3
    seed: int = 0
    torch_threads: int = 0  # 0: torch's default (one per core)
    hf: bool = True  # also time transformers (when installed; else jaxkv alone builds the model)
    model: Optional[str] = None  # a real checkpoint instead of random weights

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and f.name not in ("seed", "torch_threads") and (
                    not isinstance(v, int) or v < 1):
                raise ValueError(f"{f.name}={v!r}: must be a positive integer")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens={self.new_tokens}: need >= 2 to separate decode from "
                             f"prefill")
        if self.heads % self.kv_heads or self.hidden % self.heads:
            raise ValueError(f"heads={self.heads}, kv_heads={self.kv_heads}, hidden={self.hidden}: "
                             f"heads must divide hidden and be a multiple of kv_heads")


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_checkpoint(cfg: BenchConfig, folder: str):
    """A random Llama of the given shape saved with save_pretrained -> the torch model."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context + cfg.new_tokens,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(cfg.seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(folder)
    return model


def bench_jaxkv(cfg: BenchConfig, model, prompts) -> dict:
    """generate end to end, plus prefill and the greedy decode loop timed on their own (the same
    Decoder.prefill / Decoder.decode calls that generate makes, each jit-compiled)."""
    import jax
    import jax.numpy as jnp
    import jaxkv
    from jaxkv.generate import pad_batch
    from jaxkv.model.decoder import Decoder

    gen = {}

    def run_generate():
        gen["out"] = jaxkv.generate(model, prompts, max_new_tokens=cfg.new_tokens, eos_ids=())

    generate_s = _timed(run_generate, cfg.repeats)

    module, steps = Decoder(model.config), cfg.new_tokens - 1
    tokens, lengths = map(jnp.asarray, pad_batch(prompts, model.config.pad_token_id))
    capacity = tokens.shape[1] + cfg.new_tokens

    @jax.jit
    def prefill(params, tokens, lengths):
        logits, caches = module.apply({"params": params}, tokens, lengths, capacity,
                                      method=Decoder.prefill)
        return jnp.argmax(logits, -1).astype(jnp.int32), caches  # [B], per-layer caches

    @jax.jit
    def decode(params, first, lengths, caches):  # `steps` greedy steps -> [B, steps]
        def body(i, state):
            last, caches, out = state
            logits, caches = module.apply({"params": params}, last, lengths + i, caches,
                                          method=Decoder.decode)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return nxt, caches, jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, 1)
        out = jnp.zeros((first.shape[0], steps), jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (first, caches, out))[2]

    state = {}

    def run_prefill():
        state["first"], state["caches"] = jax.block_until_ready(
            prefill(model.params, tokens, lengths))

    def run_decode():
        state["rest"] = jax.block_until_ready(
            decode(model.params, state["first"], lengths, state["caches"]))

    prefill_s = _timed(run_prefill, cfg.repeats)
    decode_s = _timed(run_decode, cfg.repeats)  # the caches are pytrees: reused, never mutated
    loop_tokens = jnp.concatenate([state["first"][:, None], state["rest"]], axis=1).tolist()
    return dict(generate_s=generate_s, prefill_s=prefill_s, decode_s=decode_s,
                tokens=gen["out"].tokens, loop_matches_generate=loop_tokens == gen["out"].tokens,
                device=str(jax.devices()[0].platform))


def bench_hf(cfg: BenchConfig, torch_model, prompts) -> dict:
    """model.generate end to end, plus one prefill forward and the greedy decode loop over the
    KV cache (what generate does per step, without its logits processors) on their own."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ids = torch.tensor(prompts, dtype=torch.long)
    gen = {}

    @torch.no_grad()
    def run_generate():
        out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                   eos_token_id=None, pad_token_id=0, use_cache=True)
        gen["tokens"] = out[:, ids.shape[1]:].tolist()

    generate_s = _timed(run_generate, cfg.repeats)

    @torch.no_grad()
    def run_prefill():
        out = torch_model(ids, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    @torch.no_grad()
    def decode(first, cache):
        last, pos = first, ids.shape[1]
        for _ in range(cfg.new_tokens - 1):
            out = torch_model(last[:, None], past_key_values=cache, use_cache=True,
                              position_ids=torch.full((ids.shape[0], 1), pos))
            last, cache, pos = out.logits[:, -1].argmax(-1), out.past_key_values, pos + 1

    prefill_s = _timed(run_prefill, cfg.repeats)
    times = []
    for i in range(cfg.repeats + 1):  # the cache grows in place: a fresh prefill for each run
        first, cache = run_prefill()
        start = time.perf_counter()
        decode(first, cache)
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    return dict(generate_s=generate_s, prefill_s=prefill_s, decode_s=statistics.median(times),
                tokens=gen["tokens"], threads=torch.get_num_threads())


def _rates(cfg: BenchConfig, r: dict) -> dict:
    n = cfg.batch * cfg.new_tokens
    return dict(prefill_s=round(r["prefill_s"], 4),
                prefill_tok_s=round(cfg.batch * cfg.context / r["prefill_s"], 1),
                decode_s=round(r["decode_s"], 4),
                decode_tok_s=round(cfg.batch * (cfg.new_tokens - 1) / r["decode_s"], 1),
                generate_s=round(r["generate_s"], 4),
                generate_tok_s=round(n / r["generate_s"], 1))


def build_checkpoint_jaxkv(cfg: BenchConfig, folder: str) -> None:
    """The same shape built and saved by jaxkv alone (when transformers is not installed)."""
    import jaxkv

    config = jaxkv.ModelConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, max_position_embeddings=cfg.context + cfg.new_tokens,
        rms_norm_eps=1e-5)
    jaxkv.save_hf(jaxkv.init_model(config, seed=cfg.seed), folder)


def load_real(cfg: BenchConfig, with_hf: bool):
    """(jaxkv model, torch model or None, prompts) for --model: real text of --context tokens."""
    import jaxkv
    from jaxkv.models import resolve
    model = jaxkv.load(cfg.model, dtype="float32")
    torch_model = None
    if with_hf:
        import torch
        import transformers
        _, path = resolve(cfg.model)
        if os.path.isdir(path):
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(path,
                                                                            dtype=torch.float32)
        else:
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
        torch_model.eval()
    return model, torch_model, real_text_prompts(model, cfg.batch, cfg.context, cfg.seed)


def real_text_prompts(model, batch: int, length: int, seed: int):
    """`batch` prompts of exactly `length` tokens of Python's bundled documentation (BOS first
    when the tokenizer adds one), each from a different starting topic."""
    import numpy as np
    from pydoc_data.topics import topics
    names = sorted(topics)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        start = int(rng.integers(len(names)))
        text = "\n\n".join(topics[names[(start + i) % len(names)]] for i in range(len(names)))
        ids = model.tokenizer.encode(text[:8 * length])
        if len(ids) < length:
            raise ValueError(f"context={length}: the docs give only {len(ids)} tokens here")
        out.append(ids[:length])
    return out


def main(cfg: BenchConfig) -> dict:
    import numpy as np

    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        transformers = None
    result = dict(config=dataclasses.asdict(cfg))
    if cfg.model is not None:
        model, torch_model, prompts = load_real(cfg, cfg.hf and transformers is not None)
        c = model.config
        result["model"] = dict(name=cfg.model, layers=c.num_layers, hidden=c.hidden_size,
                               heads=c.num_heads, kv_heads=c.num_kv_heads, vocab=c.vocab_size,
                               dtype=c.dtype)
        jx = bench_jaxkv(cfg, model, prompts)
    else:
        prompts = np.random.RandomState(cfg.seed).randint(3, cfg.vocab, (cfg.batch, cfg.context))
        prompts = prompts.tolist()
        with tempfile.TemporaryDirectory() as folder:
            if transformers is not None:
                torch_model = build_checkpoint(cfg, folder)
            else:
                build_checkpoint_jaxkv(cfg, folder)
            import jaxkv
            jx = bench_jaxkv(cfg, jaxkv.load_hf(folder), prompts)
    result["jaxkv"] = dict(_rates(cfg, jx), device=jx["device"],
                           decode_loop_matches_generate=jx["loop_matches_generate"])
    if cfg.hf and transformers is not None:
        hf = bench_hf(cfg, torch_model, prompts)
        result["transformers"] = dict(_rates(cfg, hf), threads=hf["threads"],
                                      version=transformers.__version__)
        result["decode_speedup"] = round(result["jaxkv"]["decode_tok_s"]
                                         / result["transformers"]["decode_tok_s"], 3)
        result["prefill_speedup"] = round(hf["prefill_s"] / jx["prefill_s"], 3)
        result["generate_speedup"] = round(hf["generate_s"] / jx["generate_s"], 3)
        result["same_greedy_tokens"] = jx["tokens"] == hf["tokens"]
    return result


def print_table(result: dict, file=sys.stdout) -> None:
    c = result["config"]
    if "model" in result:
        m = result["model"]
        shape = (f"{m['name']} L={m['layers']} E={m['hidden']} H={m['heads']} K={m['kv_heads']} "
                 f"V={m['vocab']} {m['dtype']}")
    else:
        shape = (f"Llama L={c['layers']} E={c['hidden']} H={c['heads']} K={c['kv_heads']} "
                 f"F={c['intermediate']} V={c['vocab']}")
    print(f"{shape} | batch {c['batch']}, context {c['context']}, {c['new_tokens']} new tokens, "
          f"median of {c['repeats']} after a warm-up", file=file)
    if "transformers" in result:
        print(f"transformers {result['transformers']['version']}, torch threads "
              f"{result['transformers']['threads']}", file=file)
    print(f"{'':14s}{'prefill s':>10s}{'prefill tok/s':>14s}{'decode s':>10s}{'decode tok/s':>13s}"
          f"{'generate s':>12s}{'generate tok/s':>15s}", file=file)
    for name in ("jaxkv", "transformers"):
        if name in result:
            r = result[name]
            print(f"{name:14s}{r['prefill_s']:10.3f}{r['prefill_tok_s']:14.0f}{r['decode_s']:10.3f}"
                  f"{r['decode_tok_s']:13.1f}{r['generate_s']:12.3f}{r['generate_tok_s']:15.1f}",
                  file=file)
    if "decode_speedup" in result:
        print(f"jaxkv / transformers: decode x{result['decode_speedup']}, prefill "
              f"x{result['prefill_speedup']}, generate x{result['generate_speedup']}; "
              f"same greedy tokens: {result['same_greedy_tokens']}", file=file)


def parse_args(argv: Optional[list] = None) -> list:
    """One BenchConfig per --context value (a comma-separated list)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        if f.name in ("hf", "model", "context"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=getattr(d, f.name))
    p.add_argument("--context", default=str(d.context), help="prompt tokens, e.g. 2048,4096")
    p.add_argument("--model", default=None,
                   help="registered name, HF folder or .gguf file (default: random weights)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    p.add_argument("--out", default=None, help="also write the results as a JSON list here")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    contexts = [int(x) for x in str(args.pop("context")).split(",") if x.strip()]
    return [BenchConfig(context=c, **args) for c in contexts], out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configs, out_path = parse_args()
    results = []
    for config in configs:
        res = main(config)
        print_table(res)
        print(json.dumps(res), flush=True)
        results.append(res)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
