"""
Benchmark data/fineweb/prepare.py against a plain single-process loop over the same parquet input
(read with pyarrow, encode_ordinary each document, write EOT + tokens as uint16), on 1x and Nx the
shared sample (the Nx file repeats the sample's row groups). Measures, per run, in a fresh process:
- wall time of the whole command (imports and pool start-up included) and tokens/s from it,
- tokens/s of the processing loop alone, as each program reports it,
- peak RSS of the largest process (wait4's ru_maxrss, what /usr/bin/time -v reports), and the peak
  PSS summed over the process tree (main + workers, shared pages counted once; sampled every 0.25 s).
Runs alternate (baseline, prepare, baseline, ...) so that drift in machine speed hits both alike, and
each run waits for a quiet machine and is retried if other processes took more than --max_other CPUs.

  python -m bench.bench_prepare                       # 1x and 10x of ../shared/data/english-sample.parquet
                                                # (waits for quiet moments on a shared machine)
  python -m bench.bench_prepare --repeat=5 --scale=10 --parquet=path/to/shard.parquet
  python -m bench.bench_prepare --other=../main/data/fineweb/prepare.py   # also another version, interleaved
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time


if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

from smallgpt.tokenizer import seed_tiktoken_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO, "data", "fineweb", "prepare.py")
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")

# The baseline, run as `python -c BASELINE parquet out.bin`: what a simple fork of nanoGPT would do,
# but streaming (iter_batches), so its memory is bounded too.
BASELINE = r"""
import json, sys, time
import numpy as np, pyarrow.parquet as pq, tiktoken
enc = tiktoken.get_encoding("gpt2")
t0, n = time.perf_counter(), 0
with open(sys.argv[2], "wb") as f:
    for batch in pq.ParquetFile(sys.argv[1]).iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                ids = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)
                f.write(ids.tobytes())
                n += len(ids)
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))
"""


def tree_pss_kb(pid):
    """PSS of pid and all its descendants, in kB (0 if it has gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += int(re.search(r"^Pss:\s+(\d+)", f.read(), re.M).group(1))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, AttributeError):
            pass
    return total


def busy_seconds():
    """CPU seconds the whole machine has spent busy (all processes, all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_busy_cpus, timeout):
    """This machine is shared: wait (up to timeout s) until the others use under max_busy_cpus CPUs for 2 s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy0 = busy_seconds()
        time.sleep(2)
        if (busy_seconds() - busy0) / 2 < max_busy_cpus:
            return


def measure(cmd):
    """Run cmd once. Returns its stdout, wall seconds, peak RSS of its largest process (MB), peak PSS of the
    whole process tree (MB), its CPU seconds, and the other processes' mean CPU use meanwhile (CPUs)."""
    self0 = time.process_time()  # this process's sampling, not to be counted as "other load"
    busy0, t0 = busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    peak_pss, done = [0], threading.Event()

    def sample():
        while not done.wait(0.25):  # reading smaps costs ~2 ms of CPU per process
            peak_pss[0] = max(peak_pss[0], tree_pss_kb(proc.pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child and of the workers it reaped
    wall, busy = time.perf_counter() - t0, busy_seconds() - busy0
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench_prepare.py: {' '.join(cmd)} failed")
    cpu = usage.ru_utime + usage.ru_stime
    other = max(0.0, busy - cpu - (time.process_time() - self0)) / wall
    return dict(out=out, wall=wall, rss=usage.ru_maxrss / 1024, pss=peak_pss[0] / 1024, cpu=cpu, other=other)


def measure_quiet(make_cmd, args):
    """measure(make_cmd()) when the machine is quiet; a run disturbed by other processes (mean use above
    --max_other CPUs) is retried, up to --tries times, each with a new command (prepare.py into a new directory:
    into the same one, it would find its input done); the least disturbed run is kept."""
    runs = []
    for _ in range(args.tries):
        wait_for_quiet(args.max_other / 2, args.quiet_timeout)
        runs.append(measure(make_cmd()))
        if runs[-1]["other"] <= args.max_other:
            break
    return min(runs, key=lambda r: r["other"])


def run_baseline(parquet, tmp, args):
    r = measure_quiet(lambda: [sys.executable, "-c", BASELINE, parquet, os.path.join(tmp, "baseline.bin")], args)
    loop = json.loads(r["out"])
    return dict(r, tokens=loop["tokens"], loop_tok_s=loop["tokens"] / loop["seconds"])


def run_prepare(parquet, tmp, num_proc, args, script=PREPARE):
    r = measure_quiet(lambda: [sys.executable, script, parquet, f"--out_dir={tempfile.mkdtemp(dir=tmp)}",
                               f"--num_proc={num_proc}"], args)
    m = re.search(r"([\d,]+) tokens in ([\d.]+) s", r["out"])  # prepare.py's summary line
    tokens = int(m.group(1).replace(",", ""))
    return dict(r, tokens=tokens, loop_tok_s=tokens / float(m.group(2)))


def machine_parallelism(parquet, tmp, args):
    """How much faster two CPU-bound processes (the baseline) finish together than one after the other:
    the ceiling for any speed-up from 2 processes (2.0 on two idle cores; less with SMT or neighbours)."""
    one = run_baseline(parquet, tmp, args)["wall"]
    cmds = [[sys.executable, "-c", BASELINE, parquet, os.path.join(tmp, f"par{i}.bin")] for i in range(2)]
    wait_for_quiet(args.max_other / 2, args.quiet_timeout)
    t0 = time.perf_counter()
    for proc in [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in cmds]:
        proc.wait()
    return 2 * one / (time.perf_counter() - t0)


def make_scaled(parquet, scale, path):
    """Write `scale` copies of parquet's row groups, one row group at a time (the bench stays small too)."""
    import pyarrow.parquet as pq
    src = pq.ParquetFile(parquet)
    with pq.ParquetWriter(path, src.schema_arrow, compression="zstd") as w:
        for _ in range(scale):
            for i in range(src.num_row_groups):
                w.write_table(src.read_row_group(i))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--parquet", default=os.path.join(SHARED_DATA, "english-sample.parquet"))
    p.add_argument("--scale", type=int, default=10, help="size of the large input, in copies of --parquet")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command on the 1x input (medians reported)")
    p.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--max_other", type=float, default=0.2, help="retry a run if other processes used more CPUs")
    p.add_argument("--tries", type=int, default=5, help="attempts per run at a quiet measurement")
    p.add_argument("--quiet_timeout", type=float, default=600, help="seconds to wait for a quiet machine, per attempt")
    p.add_argument("--other", default=None, help="another prepare.py (e.g. an older checkout's), run interleaved too")
    args = p.parse_args()
    seed_tiktoken_cache(SHARED_DATA)
    print(f"machine: {len(os.sched_getaffinity(0))} CPUs, {os.uname().machine}, python {sys.version.split()[0]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"parallel capacity of 2 processes now: {machine_parallelism(args.parquet, tmp, args):.2f}x")
        inputs = [("1x", args.parquet, args.repeat),
                  (f"{args.scale}x", make_scaled(args.parquet, args.scale, os.path.join(tmp, "big.parquet")), 1)]
        for label, parquet, repeat in inputs:
            programs = [("prepare", PREPARE)] + ([("other", args.other)] if args.other else [])
            runs = {"baseline (1 process)": []}
            for _ in range(repeat):  # interleaved, so that drift in machine speed hits all programs alike
                runs["baseline (1 process)"].append(run_baseline(parquet, tmp, args))
                for name, script in programs:
                    for n in (1, args.num_proc):
                        runs.setdefault(f"{name} --num_proc={n}", []).append(run_prepare(parquet, tmp, n, args, script))
            med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "out"} for name, rs in runs.items()}
            base = med["baseline (1 process)"]
            for name, m in med.items():
                rows.append((label, name, f"{m['tokens']:,.0f}", f"{m['wall']:.1f}", f"{m['tokens'] / m['wall'] / 1e6:.2f}M",
                             f"{m['tokens'] / m['wall'] / (base['tokens'] / base['wall']):.2f}x",
                             f"{m['loop_tok_s'] / 1e6:.2f}M", f"{m['loop_tok_s'] / base['loop_tok_s']:.2f}x",
                             f"{m['cpu']:.1f}", f"{m['other']:.2f}", f"{m['rss']:.0f}", f"{m['pss']:.0f}"))
    header = ("input", "program", "tokens", "wall s", "tokens/s (wall)", "vs baseline", "tokens/s (loop)", "vs baseline",
              "CPU s", "others' load (CPUs)", "peak RSS MB (largest process)", "peak PSS MB (all processes)")
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|" + "--:|" * (len(header) - 2))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
