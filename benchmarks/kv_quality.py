"""KV-cache quantization: perplexity THROUGH the cache and cache memory, side by side with the fp cache.

    nice -n 10 python benchmarks/kv_quality.py --max-windows 4 --chunk 64 --presets kv4 kv4-block kv3 kv2 kv2-gear

How perplexity is measured: non-overlapping 512-token windows of the evaluation text (Lee news); each
window is fed through the decoder in chunks of `--chunk` tokens at their positions, so the queries of
every chunk attend to all earlier tokens as the cache stores them (quantized once they leave the fp
window) and to their own chunk exactly (a chunk is attended before it is quantized into the cache, as a
prefill is; `QuantKVCache.attend`); all 511 predictions per window are scored. The fp row uses edgetk's
dense fp32 cache the same way.
Memory: bytes of every cache buffer (codes, statistics, sparse entries, low-rank terms, fp region) at
context 2048 for smollm2-135m's geometry (30 layers x 3 KV heads x 64), against an fp16 dense cache;
no draft room for speculative decoding is reserved (LLM.load adds the draft tree's slots to the fp region).
Prints one JSON line per case, then a table.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def cache_bytes_2048(cfg, layers: int, heads: int, head_dim: int, extra: int = 0) -> int:
    from edgetk.runtimes.kv_cache import LayerCalibration, QuantKVCache, default_levels

    calib = LayerCalibration(torch.ones(heads, 2, head_dim), default_levels(cfg))
    return layers * QuantKVCache(cfg, 1, heads, 2048, head_dim, calib, extra).nbytes


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["kv4", "kv4-block", "kv3", "kv2", "kv2-gear"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from edgetk.data import calibration_windows, eval_text, token_windows
    from edgetk.models import load
    from edgetk.runtimes.kv_cache import cache_factory, cached_perplexity, calibrate, preset

    lm = load(a.model)
    c = lm.model.cfg
    wins = token_windows(lm.tokenizer, eval_text(), 512, a.max_windows)
    fp16_2048 = c.num_layers * 2 * c.num_kv_heads * 2048 * c.head_dim * 2
    rows = []
    t0 = time.perf_counter()
    fp = cached_perplexity(lm.model, wins, None, a.chunk)
    rows.append({"case": "fp32 cache", "perplexity": fp["perplexity"], "delta_ppl": 0.0,
                 "bytes_2048": fp16_2048, "x_smaller_than_fp16": 1.0, "seconds": time.perf_counter() - t0})
    for name in a.presets:
        cfg = preset(name)
        t0 = time.perf_counter()
        calib = None
        if cfg.needs_calibration:  # calibration text (Wikipedia), never the evaluation text
            calib = calibrate(lm.model, calibration_windows(lm.tokenizer, cfg.calib_windows, cfg.calib_seq_len), cfg)
        r = cached_perplexity(lm.model, wins, cache_factory(cfg, calib), a.chunk)
        b = cache_bytes_2048(cfg, c.num_layers, c.num_kv_heads, c.head_dim)
        rows.append({"case": name, "bits": cfg.bits, "key_bits": cfg.kbits, "value_bits": cfg.vbits,
                     "perplexity": r["perplexity"],
                     "delta_ppl": r["perplexity"] - fp["perplexity"], "bytes_2048": b,
                     "x_smaller_than_fp16": fp16_2048 / b, "seconds": time.perf_counter() - t0,
                     "config": cfg.to_dict()})
    for r in rows:
        print(json.dumps({"bench": "kv_quality", "model": a.model, "windows": int(wins.shape[0]), "window": 512,
                          "chunk": a.chunk, "scoring": "all", **r}, sort_keys=True))
    print(f"\n{'case':<12} {'K/V bits':>8} {'ppl':>8} {'delta':>8} {'MiB@2048':>9} {'x vs fp16':>9}")
    for r in rows:
        kv = f"{r['key_bits']}/{r['value_bits']}" if "key_bits" in r else "fp"
        print(f"{r['case']:<12} {kv:>8} {r['perplexity']:>8.3f} {r['delta_ppl']:>+8.3f} "
              f"{r['bytes_2048'] / 2**20:>9.2f} {r['x_smaller_than_fp16']:>9.2f}")
    return rows


if __name__ == "__main__":
    main()
