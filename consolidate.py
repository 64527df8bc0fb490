"""
A sharded checkpoint (train.py with parallel='fsdp' writes them into out_dir/sharded) -> the usual single file:
what sample.py, serve.py, eval.py and export.py read, and what one process or DDP resumes from.

    python consolidate.py --out_dir=out/fineweb-1b-fsdp                  # sharded/last -> out/fineweb-1b-fsdp/last.pt
    python consolidate.py --out_dir=out/fineweb-1b-fsdp --which=best     # sharded/best -> best.pt
    python consolidate.py --out_dir=out/fineweb-1b-fsdp --which=best --out=best-1b.pt

train.py does this itself at the end of an FSDP run (last.pt, best.pt); this command serves every other sharded
checkpoint: a run that is still going or was stopped, the WSD run's stable one. One process, no GPU and no
torchrun: the whole model and its optimizer state pass through CPU memory (for the 1.2B config, ~15 GB).
"""
import os
from dataclasses import dataclass

from smallgpt.config import parse_args
from smallgpt.errors import ConfigError, run_main
from smallgpt.parallel import POINTERS, consolidate


@dataclass
class ConsolidateConfig:
    out_dir: str = "out"  # the run's directory (train.py's out_dir), holding sharded/
    which: str = "last"  # the sharded checkpoint: 'last' | 'best' | 'stable'
    out: str = ""  # the file to write; empty = out_dir/<which>.pt


def main(argv):
    cfg = parse_args(ConsolidateConfig, argv)
    if cfg.which not in POINTERS:
        raise ConfigError(f"which must be one of {', '.join(POINTERS)}, not {cfg.which!r}")
    out = cfg.out or os.path.join(cfg.out_dir, f"{cfg.which}.pt")
    iter_num = consolidate(cfg.out_dir, cfg.which, out)
    print(f"wrote {out}: the sharded checkpoint '{cfg.which}' of {cfg.out_dir} at iter {iter_num}")


if __name__ == "__main__":
    run_main(main)
