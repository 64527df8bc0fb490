"""
Measurements, run from the repository root as modules (`python -m bench.<name>`), so that they import the
project's package and scripts like the scripts at the root do:

    python -m bench.bench_train     training step time, tokens/s, MFU and peak memory of any config
    python -m bench.bench_sample    KV-cache generation speed
    python -m bench.bench_prepare   data/fineweb/prepare.py's throughput and peak memory
    python -m bench.load_serve      a bounded load test of serve.py on 127.0.0.1
    python -m bench.gpu_suite       every GPU figure of BENCHMARKS.md in one command (--dry_run on a CPU)
    python -m bench.gpu_ablation    the research question at 40M on a GPU: four variants at equal tokens (~8 min)
    python -m bench.recipe          the 2026-recipe comparison (GPT-2 or modern block x AdamW or Muon)
"""
